"""``astrolabe bench gpu``: the one-shot benchmark a user with one CUDA device runs first; one JSON.

Sections, each logged as it starts and ends (a section that would start after ``budget_s`` seconds is
skipped with a note, so the whole command stays within its budget):

1. ``rollout``: Wan2.1 1.3B with random weights in bf16 at 480x832 (60x104 latents), the distilled 4-step
   block-AR sampler (3-frame blocks, context pass per block), rolling KV window 12 + sink 3, over
   ``rollout_frames`` = 240 latent frames, denoise only: latent and pixel frames per second (a block of 3
   latent frames = 12 pixel frames), median time of the first and last blocks, peak memory, KV cache bytes.
2. ``rollout_decode``: the same sampler with every block decoded as it is produced by the Wan2.1 VAE (random
   weights, :class:`~astrolabe.models.wan.vae.StreamingDecoder`), over ``decode_frames`` latent frames.
3. ``update``: a LoRA (rank = alpha = ``lora_rank``, fp32 LoRA weights on the bf16 DiT, bf16 autocast,
   gradient checkpointing) NFT update step of a ``update_window_frames`` clip window after a
   ``update_prefix_frames`` prefix (prefix cache rebuilt without gradient; :mod:`astrolabe.bench.update`'s
   step) vs the whole clip (prefix + window trained at once): seconds per step (median), peak memory.
4. ``rollout_14b``: section 1 for Wan2.1 14B over ``big_frames`` latent frames when the free device memory
   exceeds an estimate of its need (weights + KV cache + margin); otherwise skipped with a note.

Models are built directly on the device with random weights (meta -> empty -> PyTorch's default init), so
the 14B needs no host copy. Attention backend and ``torch.compile`` follow the ``model.attention_backend``
and ``model.compile_blocks`` semantics. On CPU (``tiny=True``, automatic without CUDA) the same sections
run at tiny size, and the 14B section is skipped.
"""

from __future__ import annotations

import contextlib
import logging
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from astrolabe.bench import StreamSetup, build_model, measure, sync
from astrolabe.bench.rollout import make_stream
from astrolabe.bench.update import _batch, _step
from astrolabe.models.wan.attention import resolve_backend
from astrolabe.models.wan.config import build_config
from astrolabe.models.wan.dit import WanDiT
from astrolabe.parallel import set_activation_checkpointing
from astrolabe.rl.nft import NFTConfig
from astrolabe.sampling.streaming import BlockStreamer, SampleNoise, StreamConfig

log = logging.getLogger(__name__)

GIB = 2**30
PIXEL_FRAMES_PER_LATENT = 4  # the Wan VAE's temporal stride


@dataclass(frozen=True)
class GpuBenchPlan:
    """What ``bench gpu`` measures; :func:`gpu_plan` (one H200, < 6 min) and :func:`tiny_plan` (CPU test)."""

    setup: StreamSetup
    vae: str = "wan21"  # "wan21" (real architecture, random weights) or "tiny"
    rollout_frames: int = 240
    decode_frames: int = 48
    update_prefix_frames: int = 21
    update_window_frames: int = 6
    update_repeats: int = 2
    lora_rank: int = 256
    big_size: str | None = "wan21_t2v_14b"
    big_frames: int = 24
    attention_backend: str = "auto"
    compile_blocks: bool = False
    budget_s: float = 330.0  # sections that would start later are skipped (the command must end < 6 min)


def gpu_plan(**overrides: Any) -> GpuBenchPlan:
    setup = StreamSetup(size="wan21_t2v_1_3b", device="cuda", dtype="bfloat16", latent_hw=(60, 104))
    return replace(GpuBenchPlan(setup=setup), **overrides)


def tiny_plan(**overrides: Any) -> GpuBenchPlan:
    """CPU smoke size: tiny DiT and VAE, 4x4 latents, window 6 + sink 3, a few blocks, LoRA rank 4, no 14B."""
    setup = StreamSetup(size="tiny", device="cpu", dtype="float32", latent_hw=(4, 4), window=6, sink=3)
    plan = GpuBenchPlan(setup=setup, vae="tiny", rollout_frames=12, decode_frames=3, update_prefix_frames=3,
                        update_window_frames=3, update_repeats=1, lora_rank=4, big_size=None, budget_s=120.0)  # fmt: skip
    return replace(plan, **overrides)


# ----------------------------------------------------------------------------------- models


def _init_on_device_(module: torch.nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default init for every module that has one; other parameters (modulation tables, RMS norm
    weights) get ones (1-D) or N(0, 0.02^2) — random weights for timing, not a meaningful model."""
    covered: set[int] = set()
    for m in module.modules():
        if hasattr(m, "reset_parameters") and m is not module:
            m.reset_parameters()
            covered.update(id(p) for p in m.parameters(recurse=False))
    with torch.no_grad():
        for p in module.parameters():
            if id(p) in covered:
                continue
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)


def random_model(factory: Callable[[], torch.nn.Module], device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Build ``factory()`` on the meta device, allocate it on ``device`` in ``dtype`` and init it there."""
    with torch.device("meta"):
        model = factory()
    model = model.to(dtype=dtype).to_empty(device=device)
    _init_on_device_(model, torch.Generator(device=device).manual_seed(0))
    return model


def bench_dit(plan: GpuBenchPlan, size: str) -> WanDiT:
    s = plan.setup
    dtype = getattr(torch, s.dtype)
    backend = resolve_backend(plan.attention_backend, s.device, dtype)  # type: ignore[arg-type]
    if s.device == "cpu":
        model = build_model(size, s.device, s.dtype)
    else:
        model = random_model(lambda: WanDiT(build_config(size)), s.device, dtype)
    model.attention_backend = backend
    if plan.compile_blocks:
        model.compile_blocks()
    return model.eval().requires_grad_(False)


def bench_vae(plan: GpuBenchPlan):
    from astrolabe.models.wan.vae import WanVAE, tiny_vae, wan21_vae

    s = plan.setup
    cfg = tiny_vae() if plan.vae == "tiny" else wan21_vae()
    if s.device == "cpu":
        return WanVAE(cfg).eval().requires_grad_(False)
    return random_model(lambda: WanVAE(cfg), s.device, getattr(torch, s.dtype)).eval().requires_grad_(False)


def _context(model: WanDiT, device: str, dtype: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 16, model.config.text_dim, generator=g).to(device=device, dtype=getattr(torch, dtype))


# ----------------------------------------------------------------------------------- sections


def _stream(model: WanDiT, stream: StreamConfig, context: torch.Tensor, frames: int, decode=None) -> dict[str, Any]:
    """Generate ``frames`` latent frames (optionally decoding each block); per-block times and peak memory."""
    dev = context.device
    streamer = BlockStreamer(model, stream, context, SampleNoise([0], dev))
    decoder = None
    if decode is not None:
        from astrolabe.models.wan.vae import StreamingDecoder

        decoder = StreamingDecoder(decode)
    times: list[float] = []
    with measure(dev, track_tensors=False) as m:
        for b in range(frames // stream.block_frames):
            t0 = time.perf_counter()
            x0 = streamer.step()
            if decoder is not None:
                with torch.no_grad():
                    decoder.decode_block(x0.permute(0, 2, 1, 3, 4).to(decode.dtype))
            sync(dev)
            times.append(time.perf_counter() - t0)
            if b % 10 == 0:
                log.info("  block %d/%d: %.3f s", b + 1, frames // stream.block_frames, times[-1])
    total = sum(times)
    edge = max(1, min(4, len(times) // 4))
    return {
        "latent_frames": frames,
        "seconds": total,
        "latent_fps": frames / total,
        "pixel_fps": PIXEL_FRAMES_PER_LATENT * frames / total,
        "first_blocks_s": statistics.median(times[:edge]),
        "last_blocks_s": statistics.median(times[-edge:]),
        "peak_memory_bytes": m.get("cuda_peak_bytes", m.get("rss_peak_bytes", 0.0)),
        "kv_cache_bytes": streamer.cache.nbytes(),
        "block_times_s": times,
    }


def rollout_section(plan: GpuBenchPlan, size: str, frames: int, with_decode: bool) -> dict[str, Any]:
    s = plan.setup
    model = bench_dit(plan, size)
    stream = make_stream(s.latent_hw, s.window, s.sink, s.block, model.config.in_dim)
    context = _context(model, s.device, s.dtype)
    vae = bench_vae(plan) if with_decode else None
    _stream(model, stream, context, s.block, decode=vae)  # warm-up (kernels, allocator, compile)
    out = _stream(model, stream, context, frames, decode=vae)
    out.update(size=size, attention_backend=model.attention_backend, window=s.window, sink=s.sink)
    return out


def update_section(plan: GpuBenchPlan) -> dict[str, Any]:
    """LoRA update step, clip window (prefix cache without grad) vs whole clip; astrolabe.bench.update's step."""
    from astrolabe.rl.lora import LoRAConfig, apply_lora

    s = plan.setup
    dev = torch.device(s.device)
    base = bench_dit(plan, s.size)
    stream = make_stream(s.latent_hw, s.window, s.sink, s.block, base.config.in_dim)
    data = _batch(base, plan.update_prefix_frames, plan.update_window_frames, s.latent_hw, 1, s.device, s.dtype)
    model = apply_lora(base, LoRAConfig(rank=plan.lora_rank, alpha=float(plan.lora_rank)),
                       generator=torch.Generator().manual_seed(0)).train()  # fmt: skip
    set_activation_checkpointing(model, True)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    def amp() -> contextlib.AbstractContextManager:
        """bf16 autocast of the training forwards, as rl.optim.precision=bf16 does."""
        return torch.autocast(dev.type, dtype=torch.bfloat16) if s.dtype == "bfloat16" else contextlib.nullcontext()

    nft = NFTConfig()
    rows: dict[str, Any] = {}
    for mode in ("window", "whole"):
        log.info("  update step, %s", mode)
        row: dict[str, Any] = {"oom": False}
        try:
            with amp():
                _step(mode, model, stream, data, nft)  # warm-up; gradients allocated
            times = []
            for _ in range(plan.update_repeats):
                with measure(dev, track_tensors=False) as m, amp():
                    row["loss"] = _step(mode, model, stream, data, nft)
                times.append(m["time_s"])
            row["s_per_step"] = statistics.median(times)
            row["peak_memory_bytes"] = m.get("cuda_peak_bytes", m.get("rss_peak_bytes", 0.0))
        except torch.cuda.OutOfMemoryError:
            row["oom"] = True
            torch.cuda.empty_cache()
        rows[mode] = row
    return {
        "lora_rank": plan.lora_rank,
        "trainable_parameters": trainable,
        "prefix_frames": plan.update_prefix_frames,
        "window_frames": plan.update_window_frames,
        "gradient_checkpointing": True,
        "autocast": "bf16" if s.dtype == "bfloat16" else "off",
        **rows,
    }


def big_model_need_bytes(plan: GpuBenchPlan, size: str) -> int:
    """Rough need of the 14B rollout: bf16 weights + the KV cache of the window + 25% margin for activations."""
    cfg = build_config(size)
    weights = 2 * sum(p.numel() for p in random_param_shapes(cfg))
    tokens = (plan.setup.window or plan.big_frames) * cfg.tokens_per_frame(*plan.setup.latent_hw)
    kv = 2 * 2 * cfg.dim * cfg.num_layers * tokens
    return int(1.25 * (weights + kv))


def random_param_shapes(cfg) -> list[torch.Tensor]:
    with torch.device("meta"):
        return list(WanDiT(cfg).parameters())


# ----------------------------------------------------------------------------------- driver


@dataclass
class _Runner:
    plan: GpuBenchPlan
    t0: float = field(default_factory=time.perf_counter)
    result: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def section(self, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        elapsed = time.perf_counter() - self.t0
        if elapsed > self.plan.budget_s:
            self.notes.append(f"{name}: skipped, {elapsed:.0f} s elapsed > budget {self.plan.budget_s:.0f} s")
            log.warning(self.notes[-1])
            return
        log.info("[%.0f s] %s ...", elapsed, name)
        t = time.perf_counter()
        try:
            self.result[name] = {**fn(), "section_seconds": time.perf_counter() - t}
        except torch.cuda.OutOfMemoryError as e:
            self.notes.append(f"{name}: out of memory ({str(e).splitlines()[0]})")
            log.warning(self.notes[-1])
        finally:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        log.info("[%.0f s] %s done", time.perf_counter() - self.t0, name)


def run(plan: GpuBenchPlan) -> dict[str, Any]:
    """Run every section of ``plan``; returns the JSON-able result (settings, sections, notes, total time)."""
    s = plan.setup
    if s.device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("bench gpu needs a CUDA device; on CPU run `astrolabe bench gpu --tiny`")
    r = _Runner(plan)
    r.section("rollout", lambda: rollout_section(plan, s.size, plan.rollout_frames, with_decode=False))
    r.section("rollout_decode", lambda: rollout_section(plan, s.size, plan.decode_frames, with_decode=True))
    r.section("update", lambda: update_section(plan))
    if plan.big_size is None:
        r.notes.append("rollout_14b: skipped (tiny run)")
    else:
        free = torch.cuda.mem_get_info(s.device)[0] if s.device.startswith("cuda") else 0
        need = big_model_need_bytes(plan, plan.big_size)
        if free < need:
            r.notes.append(f"rollout_14b: skipped, {free / GIB:.1f} GiB free < {need / GIB:.1f} GiB needed")
        else:
            r.section("rollout_14b", lambda: rollout_section(plan, plan.big_size, plan.big_frames, with_decode=False))
    device_name = torch.cuda.get_device_name(s.device) if s.device.startswith("cuda") else platform.processor()
    return {
        "settings": {**asdict(plan), "setup": s.worker_kwargs()},
        "device": device_name or s.device,
        "torch": torch.__version__,
        **r.result,
        "notes": r.notes,
        "total_seconds": time.perf_counter() - r.t0,
    }


def format_table(result: dict[str, Any]):
    """A rich table of the headline numbers."""
    from rich.table import Table

    table = Table(title=f"bench gpu ({result['device']}, {result['total_seconds']:.0f} s)")
    for col in ("section", "measure", "value"):
        table.add_column(col)
    for name in ("rollout", "rollout_decode", "rollout_14b"):
        if name in result:
            sec = result[name]
            table.add_row(name, f"{sec['size']}, {sec['latent_frames']} latent frames, {sec['attention_backend']}",
                          f"{sec['pixel_fps']:.1f} px-fps, peak {sec['peak_memory_bytes'] / GIB:.2f} GiB")  # fmt: skip
    if "update" in result:
        u = result["update"]
        for mode in ("window", "whole"):
            row = u[mode]
            value = "oom" if row["oom"] else f"{row['s_per_step']:.3f} s/step, peak {row['peak_memory_bytes'] / GIB:.2f} GiB"
            table.add_row("update", f"LoRA {u['lora_rank']}, {mode}", value)
    for note in result["notes"]:
        table.add_row("note", note, "")
    return table
