"""Update benchmark: clip-window NFT update vs a whole-sequence update as the prefix grows.

For each prefix length P (latent frames, multiples of the block size) and a fixed window of W frames:

- ``window``: :func:`astrolabe.rl.streaming_update.window_nft_step`: prefix cache rebuilt without gradient
  (bounded by the attention window), three window forwards (old and ref without grad, current with grad),
  NFT loss, backward. Its memory should be flat in P (target: peak(P_max) / peak(P_min) <= 1.15); its time
  grows linearly in P only through the gradient-free prefix replay.
- ``whole``: the same P + W frames trained in one block-causal forward with gradient on every frame
  (:func:`astrolabe.rl.streaming_update.clip_nft_loss`): memory and time grow with P + W.

Each (P, mode) runs in a fresh process (see :mod:`astrolabe.bench` for the memory method): one warm-up
step, then the measured step. All parameters are trained (no LoRA), the three policies share the weights
(the cost does not depend on which weights a policy uses). ``size="wan21_t2v_1_3b", device="cuda",
dtype="bfloat16", latent_hw=(60, 104), gradient_checkpointing=True`` is the GPU variant; an out-of-memory
configuration is reported as ``oom`` rather than failing the run.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
from typing import Any

import torch

from astrolabe.bench import GPU_SETUP, StreamSetup, build_model, call, measure, mib, peak_key, ratio, set_threads
from astrolabe.bench.rollout import make_stream
from astrolabe.parallel import set_activation_checkpointing
from astrolabe.rl.nft import NFTConfig
from astrolabe.rl.streaming_update import WindowBatch, clip_nft_loss, draw_training_noise, window_nft_step

log = logging.getLogger(__name__)

MODES = ("window", "whole")


def _batch(model, prefix: int, window: int, latent_hw, batch: int, device: str, dtype: str) -> WindowBatch:
    g = torch.Generator().manual_seed(2)
    c, (h, w) = model.config.in_dim, latent_hw
    kw = dict(device=device, dtype=getattr(torch, dtype))
    return WindowBatch(
        context=torch.randn(batch, 16, model.config.text_dim, generator=g).to(**kw),
        prefix_latents=torch.randn(batch, prefix, c, h, w, generator=g).to(**kw),
        window_x0=torch.randn(batch, window, c, h, w, generator=g).to(**kw),
        r=torch.linspace(0.2, 0.8, batch, dtype=torch.float64).to(device),
        kl_mask=torch.ones(batch, dtype=torch.bool, device=device),
    )


def _step(mode: str, model, stream, batch: WindowBatch, nft: NFTConfig) -> float:
    """One update step (forward + backward) of ``mode``; returns the loss."""
    policies = {"default": contextlib.nullcontext, "old": contextlib.nullcontext, "ref": contextlib.nullcontext}
    gens = (torch.Generator().manual_seed(0), torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=False)
    if mode == "window":
        loss, _ = window_nft_step(policies, model, stream, batch, nft, *gens)
        return float(loss.detach())
    x0 = torch.cat([batch.prefix_latents, batch.window_x0], dim=1)  # (B, P + W, C, h, w)
    sigma, eps = draw_training_noise(x0, stream, nft, *gens)
    loss, _ = clip_nft_loss(policies, model, stream.causal, batch.context, x0, batch.r, sigma, eps, nft, batch.kl_mask)
    loss.backward()
    return float(loss.detach())


def step_worker(
    mode: str, prefix_frames: int, window_frames: int, size: str, device: str, dtype: str, latent_hw: list[int],
    window: int | None, sink: int, block: int, batch: int, gradient_checkpointing: bool, threads: int | None,
    repeats: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """Peak memory of one update step and its median time over ``repeats`` steps (run in a fresh process)."""
    set_threads(threads)
    dev = torch.device(device)
    model = build_model(size, device, dtype).train()
    set_activation_checkpointing(model, gradient_checkpointing)
    stream = make_stream(tuple(latent_hw), window, sink, block, model.config.in_dim)
    data = _batch(model, prefix_frames, window_frames, latent_hw, batch, device, dtype)
    nft = NFTConfig()
    out: dict[str, Any] = {"mode": mode, "prefix_frames": prefix_frames, "oom": False}
    try:
        _step(mode, model, stream, data, nft)  # warm-up; gradients allocated
        with measure(dev, track_tensors=False) as m:
            out["loss"] = _step(mode, model, stream, data, nft)
        out.update(m)
        times = []
        for _ in range(repeats - 1):
            with measure(dev, track_tensors=False) as mr:
                _step(mode, model, stream, data, nft)
            times.append(mr["time_s"])
        out["time_s"] = statistics.median([m["time_s"], *times])
        if dev.type == "cpu":
            with measure(dev, track_tensors=True) as mt:
                _step(mode, model, stream, data, nft)
            out["tensor_peak_bytes"] = mt["tensor_peak_bytes"]
    except torch.cuda.OutOfMemoryError:
        out["oom"] = True
    return out


def run(
    prefix_frames: tuple[int, ...] = (21, 60, 120, 180, 240),
    window_frames: int = 21,
    batch: int = 1,
    gradient_checkpointing: bool = False,
    repeats: int = 3,
    setup: StreamSetup = StreamSetup(),
    fresh_process: bool = True,
) -> dict[str, Any]:
    """Run the update benchmark; returns settings, per-(mode, prefix) rows and the headline ratios."""
    block = setup.block
    for n in (*prefix_frames, window_frames):
        if n % block or n < 0:
            raise ValueError(f"frame count {n} must be a non-negative multiple of block={block}; round it")
    if len(prefix_frames) < 2:
        raise ValueError("give at least two prefix lengths, e.g. (21, 240)")
    common = dict(window_frames=window_frames, batch=batch, gradient_checkpointing=gradient_checkpointing,
                  repeats=repeats, **setup.worker_kwargs())  # fmt: skip
    rows = {mode: [call(step_worker, fresh_process, mode=mode, prefix_frames=p, **common) for p in prefix_frames]
            for mode in MODES}  # fmt: skip
    key = peak_key(setup.device)

    def peak(mode: str, i: int, k: str = key) -> float:
        row = rows[mode][i]
        return float("nan") if row["oom"] else row[k]

    result: dict[str, Any] = {
        "settings": {**common, "prefix_frames": list(prefix_frames)},
        "rows": rows,
        "window_memory_ratio": ratio(peak("window", -1), peak("window", 0)),
        "whole_memory_ratio": ratio(peak("whole", -1), peak("whole", 0)),
        "window_vs_whole_memory_at_max": ratio(peak("window", -1), peak("whole", -1)),
        "window_time_ratio": ratio(rows["window"][-1].get("time_s", float("nan")), rows["window"][0].get("time_s", 0)),
    }
    if setup.device == "cpu":
        result["window_tensor_peak_ratio"] = ratio(peak("window", -1, "tensor_peak_bytes"),
                                                   peak("window", 0, "tensor_peak_bytes"))  # fmt: skip
        result["window_vs_whole_tensor_peak_at_max"] = ratio(peak("window", -1, "tensor_peak_bytes"),
                                                             peak("whole", -1, "tensor_peak_bytes"))  # fmt: skip
    log.info("update bench: %s", {k: v for k, v in result.items() if isinstance(v, float)})
    return result


def format_table(result: dict[str, Any]):
    """A rich table: one row per prefix length, window vs whole-sequence memory and step time."""
    from rich.table import Table

    s = result["settings"]
    key = peak_key(s["device"])
    cpu = s["device"] == "cpu"
    table = Table(title=f"update bench ({s['size']}, {s['device']}, window {s['window_frames']} frames, attention "
                        f"window {s['window']} + sink {s['sink']}); window memory ratio "
                        f"{result['window_memory_ratio']:.3f} (target <= 1.15)")  # fmt: skip
    cols = ["prefix", "window peak MiB", "whole peak MiB"]
    cols += ["window tensors MiB", "whole tensors MiB"] if cpu else []
    cols += ["window step s", "whole step s"]
    for col in cols:
        table.add_column(col)

    def fmt(row: dict[str, Any], k: str, scale=mib, number_format: str = ".2f") -> str:
        return "oom" if row["oom"] else format(scale(row[k]), number_format)

    for w, h in zip(result["rows"]["window"], result["rows"]["whole"]):
        cells = [str(w["prefix_frames"]), fmt(w, key), fmt(h, key)]
        if cpu:
            cells += [fmt(w, "tensor_peak_bytes", number_format=".3f"),
                      fmt(h, "tensor_peak_bytes", number_format=".3f")]
        cells += [fmt(w, "time_s", float, ".3f"), fmt(h, "time_s", float, ".3f")]
        table.add_row(*cells)
    return table


def run_gpu(**overrides: Any) -> dict[str, Any]:
    """The GPU variant (:data:`astrolabe.bench.GPU_SETUP`: Wan2.1 1.3B, bf16, 480x832) with gradient
    checkpointing; needs CUDA."""
    GPU_SETUP.require_cuda("update")
    return run(**{"setup": GPU_SETUP, "gradient_checkpointing": True, **overrides})


# ----------------------------------------------------------------------------------- data-parallel scaling


def scaling_worker(
    rank: int, world_size: int, port: int, out_path: str, steps: int, batch: int, prefix_frames: int,
    window_frames: int, strategy: str, size: str, device: str, dtype: str, latent_hw: list[int], window: int | None,
    sink: int, block: int, threads: int | None,
) -> None:  # fmt: skip
    """One rank of the scaling bench: the production update path (LoRA policies, DDP in ``no_sync``, the
    sample-weighted cross-rank accumulation, one optimizer step) on ``batch`` samples per rank and step;
    writes ``{"time_s", "samples"}`` (the measured steps, after one warm-up step) to ``out_path``."""
    import json
    import os

    import torch.distributed as dist

    from astrolabe.parallel import ParallelConfig, parallelize
    from astrolabe.rl.accumulation import accumulate_step
    from astrolabe.rl.lora import LoRAConfig
    from astrolabe.rl.optim import OptimConfig
    from astrolabe.rl.policies import PolicyConfig, PolicySet
    from astrolabe.rl.state import TrainingState

    set_threads(threads)
    distributed = world_size > 1
    if distributed:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo", rank=rank, world_size=world_size)
    if device.startswith("cuda"):
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    try:
        model = build_model(size, device, dtype)
        ps = PolicySet.build(model.requires_grad_(False), LoRAConfig(rank=4, alpha=4.0), PolicyConfig(),
                             generator=torch.Generator().manual_seed(0))
        state = TrainingState(ps, OptimConfig(lr=1e-4, precision="fp32"))
        wrapped = parallelize(ps.model, ParallelConfig(strategy=strategy if distributed else "none"))  # type: ignore[arg-type]
        no_sync = wrapped.no_sync if hasattr(wrapped, "no_sync") else contextlib.nullcontext
        stream = make_stream(tuple(latent_hw), window, sink, block, model.config.in_dim)
        data = _batch(model, prefix_frames, window_frames, latent_hw, batch, device, dtype)
        policies = {"default": lambda: ps.use("default"), "old": lambda: ps.use("old")}
        gens = (torch.Generator().manual_seed(rank), torch.Generator().manual_seed(100 + rank))
        nft = NFTConfig()

        def step() -> None:
            with no_sync():
                accumulate_step(state, lambda b: window_nft_step(policies, wrapped, stream, b, nft, *gens,
                                                                 backward=False)[0],
                                [data], [batch], across_ranks=distributed)

        step()  # warm-up
        if distributed:
            dist.barrier()
        with measure(torch.device(device), track_tensors=False) as m:
            for _ in range(steps):
                step()
            if distributed:
                dist.barrier()
        with open(out_path, "w", encoding="utf-8") as f:
            json.dump({"time_s": m["time_s"], "samples": steps * batch}, f)
    finally:
        if distributed:
            dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _measure_world(world_size: int, timeout_s: float, **kwargs: Any) -> dict[str, Any]:
    """Run :func:`scaling_worker` on ``world_size`` spawned processes; samples/s of the slowest rank's time."""
    import json
    import multiprocessing
    import tempfile
    from pathlib import Path

    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="astrolabe-bench-scaling-") as tmp:
        outs = [str(Path(tmp) / f"r{r}.json") for r in range(world_size)]
        procs = [ctx.Process(target=scaling_worker, args=(r, world_size, port, outs[r]), kwargs=kwargs)
                 for r in range(world_size)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=timeout_s)
        for p in procs:
            if p.is_alive():
                p.kill()
        failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
        if failed:
            raise RuntimeError(f"scaling bench at world size {world_size}: rank(s) {failed} failed or hung "
                               f"(exit codes {[p.exitcode for p in procs]}); see their output above")
        rows = [json.loads(Path(o).read_text()) for o in outs]
    time_s = max(r["time_s"] for r in rows)
    samples = sum(r["samples"] for r in rows)
    return {"world_size": world_size, "time_s": time_s, "samples": samples, "samples_per_s": samples / time_s}


def run_scaling(
    world_size: int = 2,
    steps: int = 3,
    batch: int = 1,
    prefix_frames: int = 3,
    window_frames: int = 3,
    strategy: str = "ddp",
    setup: StreamSetup = StreamSetup(latent_hw=(4, 4), window=6),
    timeout_s: float = 600.0,
) -> dict[str, Any]:
    """Data-parallel update throughput at world size 1 and ``world_size`` (weak scaling: ``batch`` samples per
    rank and step), measured in one run (gloo on CPU, nccl on CUDA)::

        samples/s(N) = N * steps * batch / (slowest rank's time for ``steps`` steps)
        efficiency(N) = samples/s(N) / (N * samples/s(1))

    On a CPU machine the ranks share its cores, so the efficiency measures the communication and the
    contention, not what N GPUs give.
    """
    if world_size < 2:
        raise ValueError(f"world_size must be >= 2 (it is compared with world size 1), got {world_size}")
    common = dict(steps=steps, batch=batch, prefix_frames=prefix_frames, window_frames=window_frames,
                  strategy=strategy, **setup.worker_kwargs())  # fmt: skip
    rows = [_measure_world(n, timeout_s, **common) for n in (1, world_size)]
    one, many = rows
    result = {
        "settings": {**common, "world_size": world_size,
                     "backend": "nccl" if setup.device.startswith("cuda") else "gloo"},
        "rows": rows,
        "speedup": ratio(many["samples_per_s"], one["samples_per_s"]),
        "scaling_efficiency": ratio(many["samples_per_s"], world_size * one["samples_per_s"]),
    }
    log.info("update scaling bench: %s", {k: result[k] for k in ("speedup", "scaling_efficiency")})
    return result


def format_scaling_table(result: dict[str, Any]):
    """A rich table: samples/s per world size, speed-up and scaling efficiency."""
    from rich.table import Table

    s = result["settings"]
    table = Table(title=f"update scaling bench ({s['size']}, {s['device']}/{s['backend']}, {s['strategy']}, "
                        f"{s['batch']} sample(s) per rank and step); efficiency at {s['world_size']}: "
                        f"{result['scaling_efficiency']:.3f}")  # fmt: skip
    for col in ("world size", "samples", "time s", "samples/s"):
        table.add_column(col)
    for row in result["rows"]:
        table.add_row(str(row["world_size"]), str(row["samples"]), f"{row['time_s']:.3f}",
                      f"{row['samples_per_s']:.3f}")
    return table
