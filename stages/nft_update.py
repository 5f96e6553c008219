"""Stage ``nft_update``: rollout shards + labels + checkpoint k -> training-state checkpoint k + 1.

Inputs: ``rollout`` (shards), ``labels`` (``labels.zarr``: ``r``, ``kl_mask``), and ``checkpoint`` (the
previous iteration's nft_update directory) for every iteration but the first; without it the policies
start from a fresh LoRA (``rl.lora``, seeded by ``rl.lora_seed``). The output holds ``state/``, a
complete :class:`astrolabe.rl.state.TrainingState` checkpoint (``state/lora/`` is a standard PEFT adapter,
``state/adapters/old.safetensors`` the sampling policy of the next rollout).

One stage run is one training phase of NFT (paper part 1, DESIGN.md):

1. Records are grouped by ``meta["group"]`` (candidates branched from one prefix). A micro-batch is up to
   ``rl.micro_batch_size`` candidates of one group, so they share their prefix cache (built once, forked).
   Records whose ``r`` is NaN (no valid reward) are skipped and counted.
2. The model goes through :func:`astrolabe.parallel.parallelize` (``cfg.parallel``: activation
   checkpointing, DDP or FSDP). For each of ``rl.epochs`` passes the micro-batches are shuffled by the ``shuffle``
   generator; every ``rl.accumulation_steps`` micro-batches (and the rest at the end of a pass) make one
   optimizer step, their gradients accumulated by :func:`astrolabe.rl.accumulation.accumulate_gradients`
   (each micro-batch's :func:`astrolabe.rl.streaming_update.window_nft_step` loss weighted by its sample
   count: the step's gradient is that of the mean loss over its samples).

On N ranks (torchrun; a ``"sliced"`` stage) every rank reads the same candidates, builds the same state and
draws the same shuffle; rank ``k`` trains the contiguous share :func:`rank_slice` of each step's
micro-batches, and the sample-weighted gradients are summed across ranks (``across_ranks``), so every
rank takes the single-process step over the union of the samples. The sigma / noise generators are advanced
for the other ranks' micro-batches too (:func:`skip_noise`), so each micro-batch gets the noise it gets in
one process and the generators stay identical on every rank. Under DDP the backward runs in ``no_sync``:
the one reduction is the accumulation's (a rank with no micro-batch in a step still takes part). Per
micro-batch metrics are all-gathered and averaged in the single-process order. Rank 0 alone writes
``state/``; the manifest's ``extra`` holds ``world_size`` and ``samples_per_rank``.

``parallel.strategy=fsdp`` (the 14B model; :func:`shard_state`). The model is sharded by FSDP2 (``fully_shard``
per DiT block, ``parallel.fsdp_param_dtype`` params, fp32 reduce-scatter made a SUM) *before* the checkpoint
is loaded, and the state is taken over to the shards. The old / ref adapters are sharded like the trained
one: they are LoRA parameters of the same layers, so ``fully_shard`` shards them anyway, and every blend
(old policy, EMA, reference refresh) is elementwise, hence local to each rank's shard with no collective;
replicated copies would need a gather and a scatter per blend and the memory of whole adapters on every rank.
The EMA is sharded the same way. The slicing, the noise and the sample weights are those of DDP; the
cross-rank sum is FSDP's own reduce-scatter in each backward (``model_sums_gradients``). Every forward and
backward of an FSDP model is a collective, so the ranks run in lockstep
(:func:`astrolabe.rl.lockstep.lockstep_plan`): a rank with fewer micro-batches in a step runs zero-weight padding
micro-batches (on copies of the generators), and a rank whose micro-batch has a shorter prefix runs idle no-grad
forwards first, so that every rank runs the same sequence of forwards and backwards. The checkpoint is written by every rank
(:meth:`TrainingState.save` with ``distributed_checkpoint``): rank 0 writes the PEFT ``lora/`` and
``adapters/*.safetensors`` from the gathered adapters (what rollout / evaluate read), and the resumable state
(every adapter, the EMA, the optimizer) goes through ``torch.distributed.checkpoint`` into ``state/dcp/``,
loadable at any world size (the next iteration may run on fewer or more ranks, or in one process). In one
process ``fsdp`` shards nothing (one rank) but still writes ``dcp/``.
3. End of phase: ``theta_old <- d theta_old + (1 - d) theta`` (:meth:`TrainingState.update_old`), and the
   lagging KL reference is refreshed when the mean KL of the phase says so. Both schedules count
   iterations (``iteration + 1`` completed), not optimizer steps.

With ``rl.algorithm: arcopo`` the stage runs :func:`run_arcopo` instead: the AR-CoPO loss on the pivot chunk
(:func:`astrolabe.rl.arcopo_update.arcopo_phase`; ``labels.zarr`` holds the per-group ``advantage``) and, with
``arcopo.semi`` set and the ``buffer`` input (the :mod:`stages.arcopo_buffer` output), the semi-on-policy
adapter in ``state_semi/``, trained on ``arcopo.semi.groups_per_iteration`` buffer groups drawn by its
``buffer`` generator. ``state/``'s ``old`` adapter is the trained one after the phase (the next rollout's
sampling policy; the states are built, trained and saved by :mod:`astrolabe.rl.update_states`). Under torchrun both
adapters train sliced like NFT: every rank holds the same groups, state and
generators, trains its share of each optimizer step's (group, denoising step) micro-batches, and the
sample-weighted gradients are summed across ranks (:mod:`astrolabe.rl.arcopo_update`); rank 0 writes the states.

Every generator (LoRA init, sigma, noise, shuffle) is part of the checkpoint, so iteration k + 1 continues
the streams of iteration k: a resumed run equals an uninterrupted one. With selective KL the checkpoint also
holds the KL fraction controller: the state ``label_uncertainty`` k computed from checkpoint k - 1 and handed
on in ``labels/controller.json`` (a labels output without it is an error).
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from astrolabe.artifacts.ranks import rank_slice
from astrolabe.artifacts.stage import StageInfo, StageResult, finite_metrics
from astrolabe.build import build_dit, build_text, stream_config
from astrolabe.config import RunConfig, config_to_dict
from astrolabe.data.arrays import check_keys_aligned, read_columns
from astrolabe.data.shards import list_shards, read_rollout_shards
from astrolabe.distributed import dist_rank_world, gather_objects
from astrolabe.models.registry import get_base_model
from astrolabe.parallel import parallelize, sum_gradients_across_ranks
from astrolabe.rl.accumulation import accumulate_gradients, shuffled_steps
from astrolabe.rl.arcopo_semi import SEMI_STATE_SUBDIR
from astrolabe.rl.arcopo_update import PivotGroupData, read_pivot_groups
from astrolabe.rl.lockstep import idle_forwards, lockstep_plan
from astrolabe.rl.rng import CheckpointError
from astrolabe.rl.state import TrainingState
from astrolabe.rl.streaming_update import WindowBatch, draw_training_noise, scene_prefix, window_nft_step
from astrolabe.rl.update_states import build_training_state, train_arcopo_adapter
from astrolabe.sampling.scenes import SceneSegment, replay_forwards
from stages.arcopo_buffer import read_parts
from stages.label_uncertainty import CONTROLLER_FILE, LABELS_FILE, read_handed_controller

log = logging.getLogger(__name__)

STATE_SUBDIR = "state"


def _config_subset(cfg: RunConfig) -> dict[str, Any]:
    subset = {"model": config_to_dict(cfg.model), "rl": config_to_dict(cfg.rl),
              "parallel": config_to_dict(cfg.parallel)}
    if cfg.rl.update.noise_per == "sample":  # the release's noise, and the keys of runs made before the option
        del subset["rl"]["update"]["noise_per"]
    if cfg.rl.algorithm == "arcopo":  # NFT keys stay unchanged
        subset["arcopo"] = cfg.arcopo.model_dump(mode="json", exclude={"merge"})
    return subset


# Under torchrun every rank trains its share of each step (module docstring); every count is the same on
# every rank (the per-rank samples are in ``extra["samples_per_rank"]``).
_COUNTS = ("records", "trained", "skipped_nan_r", "optimizer_steps", "step")
_ARCOPO_COUNTS = ("groups", "trained_groups", "skipped_nan_groups", "buffer_groups")  # run_arcopo's, also equal
STAGE = StageInfo(name="nft_update", code_version="2", config_subset=_config_subset, per_iteration=True,
                  distribution="sliced", rank_invariant_counts=_COUNTS + _ARCOPO_COUNTS)


def checkpoint_state_dir(stage_dir: str | Path) -> Path:
    """The TrainingState directory inside an nft_update output directory."""
    return Path(stage_dir) / STATE_SUBDIR


# ----------------------------------------------------------------------------------- data


@dataclass
class Candidate:
    key: str
    group: str
    prompt: str  # the text of the window's scene (the prompt line for a one-scene prompt)
    prefix: np.ndarray  # (P, C, h, w) float32
    window: np.ndarray  # (W, C, h, w) float32
    r: float
    kl_mask: bool
    scenes: tuple[SceneSegment, ...] = ()  # the rollout's scene plan; () = one scene, ``prompt``


def scenes_of(meta: Mapping[str, Any]) -> tuple[SceneSegment, ...]:
    """The scene plan a rollout record was generated with (``meta["scenes"]``); () for one scene."""
    plan = tuple(SceneSegment(str(p), int(a), int(b), bool(h)) for p, a, b, h in meta.get("scenes", ()))
    return plan if len(plan) > 1 else ()


def read_candidates(rollout: Path, labels: Path) -> tuple[list[Candidate], int]:
    """Every record with a finite ``r``, in shard order, and the number skipped for a NaN ``r``."""
    keys, cols, _ = read_columns(Path(labels) / LABELS_FILE)
    for name in ("r", "kl_mask"):
        if name not in cols:
            raise KeyError(f"{labels}/{LABELS_FILE} has no column {name!r}; rerun the label_uncertainty stage")
    paths = list_shards(rollout)
    if not paths:
        raise ValueError(f"no rollout shards (*.tar) in {rollout}; run the rollout stage first")
    records = list(read_rollout_shards(paths))
    check_keys_aligned(keys, [rec["__key__"] for rec in records], what=f"{labels}/{LABELS_FILE}")
    out: list[Candidate] = []
    skipped = 0
    for rec, r, m in zip(records, cols["r"], cols["kl_mask"], strict=True):
        if not math.isfinite(float(r)):
            skipped += 1
            continue
        if "prefix" not in rec:
            raise KeyError(f"record {rec['__key__']!r} in {rec['__shard__']} has no prefix latents; rerun rollout")
        meta = rec["meta"]
        out.append(Candidate(rec["__key__"], str(meta["group"]), str(meta.get("window_prompt", meta["prompt"])),
                             rec["prefix"], rec["latents"], float(r), bool(m > 0.5), scenes_of(meta)))
    return out, skipped


def plan_micro_batches(cands: list[Candidate], micro_batch_size: int) -> list[list[int]]:
    """Indices of ``cands`` cut into micro-batches of at most ``micro_batch_size`` from one group each."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(cands):
        by_group[c.group].append(i)
    return [idx[s : s + micro_batch_size] for idx in by_group.values() for s in range(0, len(idx), micro_batch_size)]


def make_batch(cands: list[Candidate], idx: list[int], contexts: Mapping[str, torch.Tensor], device: torch.device,
               dtype: torch.dtype, block_frames: int) -> WindowBatch:  # fmt: skip
    """A :class:`WindowBatch` of candidates of one group (one prompt line, one prefix); ``contexts`` maps each
    text to its (1, L, D) features. A scene prompt's batch carries the prefix's prompt switches."""
    def stack(xs: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(xs)).to(device=device, dtype=dtype)

    head = cands[idx[0]]
    prefix_context, switches = None, ()
    if head.scenes:
        start_block = head.prefix.shape[0] // block_frames
        prefix_context, switches = scene_prefix(head.scenes, start_block, block_frames, contexts, len(idx))
    return WindowBatch(
        context=contexts[head.prompt].expand(len(idx), -1, -1),
        prefix_latents=stack([cands[i].prefix for i in idx]),  # (B, P, C, h, w)
        window_x0=stack([cands[i].window for i in idx]),  # (B, W, C, h, w)
        r=torch.tensor([cands[i].r for i in idx], dtype=torch.float64, device=device),
        kl_mask=torch.tensor([cands[i].kl_mask for i in idx], dtype=torch.bool, device=device),
        prefix_context=prefix_context,
        switches=switches,
    )


# ----------------------------------------------------------------------------------- state


def restore_or_start(cfg: RunConfig, state: TrainingState, checkpoint: Path | None, iteration: int) -> None:
    if checkpoint is None:
        if iteration > 0:
            raise FileNotFoundError(
                f"nft_update at iteration {iteration} needs inputs['checkpoint'] (the nft_update output of "
                f"iteration {iteration - 1}); run the earlier iterations first (astrolabe train)"
            )
        log.info("nft_update it%d: fresh LoRA (rank %d, seed %d)", iteration, cfg.rl.lora.rank, cfg.rl.lora_seed)
        return
    state.load(checkpoint_state_dir(checkpoint))


def adopt_controller(state: TrainingState, labels: Path) -> None:
    """Take the KL controller state ``label_uncertainty`` computed for this iteration (saved with the state)."""
    handed = read_handed_controller(labels)
    if state.controller is None:
        if handed is not None:
            raise CheckpointError(f"{labels} holds a {CONTROLLER_FILE} but rl.selective_kl is off; the labels were "
                                  "made with another config: rerun label_uncertainty with the current one")
        return
    if handed is None:
        raise CheckpointError(f"{labels}/{CONTROLLER_FILE} is missing: the labels were made without selective KL; "
                              "rerun label_uncertainty with the current config")
    state.controller.load_state_dict(handed)


def _policies(state: TrainingState, with_ref: bool) -> dict[str, Callable[[], Any]]:
    ps = state.policies
    out: dict[str, Callable[[], Any]] = {"default": lambda: ps.use("default"), "old": lambda: ps.use("old")}
    if with_ref:
        out["ref"] = lambda: ps.use("ref")
    return out


# ----------------------------------------------------------------------------------- training


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


def skip_noise(cands: list[Candidate], idx: list[int], dtype: torch.dtype, stream: Any, cfg: RunConfig,
               gens: Mapping[str, torch.Generator], shift: float) -> None:  # fmt: skip
    """Advance the sigma / noise generators exactly as training the micro-batch ``idx`` would (another rank does)."""
    x0 = torch.zeros((len(idx), *cands[idx[0]].window.shape), dtype=dtype)  # (B, W, C, h, w)
    draw_training_noise(x0, stream, cfg.rl.nft, gens["sigma"], gens["noise"], cfg.rl.update.sigma_per, shift,
                        cfg.rl.update.noise_per)


def _gathered_means(sums: Mapping[str, list[tuple[int, float]]]) -> dict[str, float]:
    """Mean of every metric over the micro-batches of all ranks, summed in the single-process order."""
    merged: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for part in gather_objects(dict(sums)):
        for k, v in part.items():
            merged[k].extend(v)
    return {k: _mean([x for _, x in sorted(v)]) for k, v in merged.items()}


def shard_state(cfg: RunConfig, state: TrainingState) -> torch.nn.Module:
    """``parallel.strategy=fsdp``: shard the policies' model (before the checkpoint is loaded into the shards).

    On N ranks: :func:`parallelize` (FSDP2 ``fully_shard`` per block, ``parallel.fsdp_param_dtype`` params,
    fp32 reduction), the reduction made a SUM (the accumulation weights by ``n_m / N`` over all ranks) and the
    state taken over to the shards (:meth:`TrainingState.rebind_parameters`). In one process (no process group)
    a one-rank FSDP is the identity: only activation checkpointing is applied. Either way the state is saved
    through DCP (``distributed_checkpoint``), so a run can change its world size between iterations.
    """
    state.distributed_checkpoint = True
    if dist_rank_world()[1] == 1:
        return parallelize(state.policies.model, cfg.parallel.model_copy(update={"strategy": "none"}))
    model = parallelize(state.policies.model, cfg.parallel)
    sum_gradients_across_ranks(model)
    state.rebind_parameters()
    return model


def context_passes(cands: list[Candidate], idx: list[int], cfg: RunConfig, stream: Any) -> int:
    """No-grad forwards that building micro-batch ``idx``'s prefix cache takes (one context pass per prefix block,
    and one re-cache per soft scene switch: :func:`~astrolabe.sampling.scenes.replay_forwards`)."""
    if cfg.rl.update.mode != "window":
        return 0
    head = cands[idx[0]]
    return replay_forwards(list(head.scenes), head.prefix.shape[0] // stream.block_frames)


def _copy_generator(g: torch.Generator) -> torch.Generator:
    copy = torch.Generator(device=g.device)
    copy.set_state(g.get_state())
    return copy


def train_phase(cfg: RunConfig, state: TrainingState, cands: list[Candidate], contexts: Mapping[str, torch.Tensor],
                stream: Any, shift: float, on_step: Callable[[int, int], None] | None = None,
                model: torch.nn.Module | None = None) -> dict[str, float]:  # fmt: skip
    """``rl.epochs`` shuffled passes of sample-weighted accumulated window NFT steps; returns averaged metrics.

    On N ranks each step's micro-batches are sliced by rank (module docstring); ``update/samples`` is the
    number of samples this rank trained (every pass). ``model``: already parallelized (:func:`shard_state`);
    None = :func:`parallelize` with ``cfg.parallel`` here.
    """
    rl = cfg.rl
    rank, world = dist_rank_world()
    device, dtype = torch.device(cfg.model.device), next(state.policies.model.parameters()).dtype
    batches = plan_micro_batches(cands, rl.micro_batch_size)
    policies = _policies(state, with_ref=rl.nft.kl_weight > 0)
    model = parallelize(state.policies.model, cfg.parallel) if model is None else model
    no_sync = model.no_sync if hasattr(model, "no_sync") else contextlib.nullcontext  # the accumulation reduces
    lockstep = state.is_sharded  # FSDP on N ranks
    gens = state.generators
    sums: dict[str, list[tuple[int, float]]] = defaultdict(list)  # metric -> [(global micro-batch no., value)]
    position = [0]  # the global number of loss_of's next micro-batch (single-process order)

    def nft_loss(idx: list[int], idle: int, sigma: torch.Generator,
                 noise: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:  # fmt: skip
        idle_forwards(model, idle, cands[idx[0]].window, contexts[cands[idx[0]].prompt], stream)
        batch = make_batch(cands, idx, contexts, device, dtype, stream.block_frames)
        return window_nft_step(policies, model, stream, batch, rl.nft, sigma, noise, rl.update, shift=shift,
                               group_size=len(idx), backward=False)

    def loss_of(mb: tuple[list[int], int]) -> torch.Tensor:
        loss, metrics = nft_loss(*mb, gens["sigma"], gens["noise"])
        for k, v in metrics.items():
            sums[k].append((position[0], float(v)))
        position[0] += 1
        return loss

    def padding(idx: list[int], idle: int) -> Callable[[], torch.Tensor]:  # on copies: the streams stay untouched
        return lambda: nft_loss(idx, idle, _copy_generator(gens["sigma"]), _copy_generator(gens["noise"]))[0]

    def skip(idxs: list[list[int]]) -> None:
        for idx in idxs:
            skip_noise(cands, idx, dtype, stream, cfg, gens, shift)

    total_steps = rl.epochs * math.ceil(len(batches) / rl.accumulation_steps)
    trained = offset = 0  # offset: the global number of the step's first micro-batch
    for done, step in enumerate(shuffled_steps(len(batches), rl.epochs, rl.accumulation_steps, gens["shuffle"]), 1):
        chunk = [batches[b] for b in step]
        mine = rank_slice(len(chunk), rank, world)
        plan = lockstep_plan(chunk, world, lambda idx: context_passes(cands, idx, cfg, stream))[rank] if lockstep \
            else [(idx, 0, True) for idx in chunk[mine.start : mine.stop]]
        skip(chunk[: mine.start])
        position[0] = offset + mine.start
        with no_sync():
            accumulate_gradients(state, loss_of, [(idx, idle) for idx, idle, real in plan if real],
                                 [len(idx) for idx in chunk[mine.start : mine.stop]], across_ranks=world > 1,
                                 model_sums_gradients=lockstep,
                                 padding=[padding(idx, idle) for idx, idle, real in plan if not real])
        skip(chunk[mine.stop :])
        trained += sum(len(idx) for idx in chunk[mine.start : mine.stop])
        offset += len(chunk)
        stats = state.optimizer_step()
        sums["update/grad_norm"].append((done, stats.grad_norm))
        sums["update/lr"].append((done, stats.lr))
        if on_step is not None:
            on_step(done, total_steps)
    out = _gathered_means(sums) if world > 1 else {k: _mean([x for _, x in v]) for k, v in sums.items()}
    out["update/micro_batches"] = float(len(batches) * rl.epochs)
    out["update/optimizer_steps"] = float(total_steps)
    out["update/samples"] = float(trained)
    return out


def end_phase(state: TrainingState, metrics: dict[str, float], iteration: int) -> None:
    """Old-policy blend and (lagging) reference refresh after the phase of ``iteration``; adds their metrics.

    Both schedules run on ``iteration + 1`` completed iterations (the release's epochs), never on optimizer steps.
    """
    done = iteration + 1
    metrics["update/old_decay"] = state.update_old(done)
    kl = metrics.get("loss/kl")
    refreshed = state.policies.maybe_refresh_ref(done, kl if kl is not None and math.isfinite(kl) else None)
    metrics["update/ref_refreshed"] = float(refreshed)


def encode_prompts(cfg: RunConfig, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Text features (1, L, D) of each distinct prompt, without gradient."""
    base = get_base_model(cfg.model.base)
    text = build_text(cfg.model, base)
    dtype = getattr(torch, cfg.model.dtype)
    with torch.no_grad():
        return {p: text.encode([p]).to(device=cfg.model.device, dtype=dtype) for p in dict.fromkeys(prompts)}


# ----------------------------------------------------------------------------------- AR-CoPO


def read_labelled_groups(rollout: Path, labels: Path) -> tuple[list[PivotGroupData], int]:
    """The pivot groups of a rollout with their advantages from ``labels.zarr``, and the number skipped."""
    keys, cols, _ = read_columns(Path(labels) / LABELS_FILE)
    if "advantage" not in cols:
        raise KeyError(f"{labels}/{LABELS_FILE} has no column 'advantage'; rerun the label_uncertainty stage")
    return read_pivot_groups(Path(rollout), keys, cols["advantage"])


def read_buffer(buffer: Path) -> list[PivotGroupData]:
    """Every labelled group of the replay buffer (its parts, :func:`stages.arcopo_buffer.read_parts`), in order."""
    groups: list[PivotGroupData] = []
    for part in read_parts(buffer):
        groups += read_labelled_groups(Path(part["rollout"]), Path(part["labels"]))[0]
    if not groups:
        raise ValueError(f"the replay buffer {buffer} holds no group with finite advantages; rebuild it")
    return groups


def run_arcopo(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int) -> StageResult:
    """The stage with ``rl.algorithm: arcopo`` (module docstring). Under torchrun every rank reads the same groups
    and trains its share of every optimizer step (:func:`astrolabe.rl.arcopo_update.arcopo_phase`); rank 0 writes
    the states."""
    _, world = dist_rank_world()
    t0 = time.perf_counter()
    groups, skipped = read_labelled_groups(Path(inputs["rollout"]), Path(inputs["labels"]))
    if not groups:
        raise ValueError(f"no trainable group in {inputs['labels']}: every group has a NaN advantage ({skipped} "
                         "skipped); check the score stage and rerun score and label_uncertainty")
    semi = cfg.arcopo.semi
    if semi is not None and "buffer" not in inputs:
        raise KeyError("arcopo.semi is set: the nft_update stage needs inputs['buffer'] (the arcopo_buffer output)")
    buffer = read_buffer(Path(inputs["buffer"])) if semi is not None else []
    contexts = encode_prompts(cfg, [g.prompt for g in [*groups, *buffer]])
    ckpt = Path(inputs["checkpoint"]) if "checkpoint" in inputs else None
    t_build = time.perf_counter() - t0

    t1 = time.perf_counter()
    metrics = train_arcopo_adapter(cfg, groups, contexts, checkpoint_state_dir(ckpt) if ckpt else None,
                                   checkpoint_state_dir(out_dir), iteration, old_policy="old")
    if semi is not None:
        semi_metrics = train_arcopo_adapter(cfg, buffer, contexts, ckpt / SEMI_STATE_SUBDIR if ckpt else None,
                                            out_dir / SEMI_STATE_SUBDIR, iteration, old_policy="ref",
                                            extra_generators=("buffer",), pick=semi.groups_per_iteration)
        metrics |= {f"semi/{k}": v for k, v in semi_metrics.items()}
    t_train = time.perf_counter() - t1
    log.info("nft_update it%d (arcopo): %d groups, loss %.4g, entropy %.3g, clip fraction %.3g", iteration,
             len(groups), metrics["loss/policy"], metrics["arcopo/entropy"], metrics["arcopo/clip_fraction"])
    return StageResult(
        counts={"groups": len(groups) + skipped, "trained_groups": len(groups), "skipped_nan_groups": skipped,
                "optimizer_steps": int(metrics["update/optimizer_steps"]), "buffer_groups": len(buffer)},
        seeds={"lora_seed": cfg.rl.lora_seed, "from_checkpoint": str(ckpt) if ckpt else None},
        timings={"build": t_build, "train": t_train},
        metrics=finite_metrics(metrics),
        extra={"algorithm": "arcopo", "world_size": world},
    )


def run(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None) -> StageResult:
    if iteration is None:
        raise ValueError("the nft_update stage runs per iteration; pass iteration=<int>")
    for name in ("rollout", "labels"):
        if name not in inputs:
            raise KeyError(f"the nft_update stage needs inputs[{name!r}]")
    if cfg.rl.algorithm == "arcopo":  # AR-CoPO payload and loss
        return run_arcopo(cfg, inputs, out_dir, iteration)
    t0 = time.perf_counter()
    cands, skipped = read_candidates(Path(inputs["rollout"]), Path(inputs["labels"]))
    if not cands:
        raise ValueError(
            f"no trainable sample in {inputs['labels']}: every record has a NaN optimality r ({skipped} skipped); "
            "check the score stage (failed rewards) and rerun score and label_uncertainty"
        )
    if skipped:
        log.warning("nft_update it%d: %d records with NaN r skipped", iteration, skipped)
    base = get_base_model(cfg.model.base)
    contexts = encode_prompts(cfg, [c.prompt for c in cands] + [seg.prompt for c in cands for seg in c.scenes])
    dit = build_dit(cfg.model, base)
    state = build_training_state(cfg.rl, dit)
    model = shard_state(cfg, state) if cfg.parallel.strategy == "fsdp" else None  # before loading into the shards
    ckpt = inputs.get("checkpoint")
    restore_or_start(cfg, state, Path(ckpt) if ckpt is not None else None, iteration)
    adopt_controller(state, Path(inputs["labels"]))
    t_build = time.perf_counter() - t0

    t1 = time.perf_counter()
    metrics = train_phase(cfg, state, cands, contexts, stream_config(cfg.model, base), base.flow_shift, model=model)
    end_phase(state, metrics, iteration)
    t_train = time.perf_counter() - t1
    state.extra = {"iteration": iteration, "trained_records": len(cands)}
    rank, world = dist_rank_world()
    samples_per_rank = [int(n) for n in gather_objects(int(metrics.pop("update/samples")))]
    # DDP: every rank holds the same state, rank 0 writes it; FSDP: every rank writes its shard (DCP)
    if rank == 0 or state.distributed_checkpoint:
        state.save(checkpoint_state_dir(out_dir))
    if rank == 0:
        log.info("nft_update it%d: %d samples, %d steps, loss %.4g, kl %.3g", iteration, len(cands),
                 int(metrics["update/optimizer_steps"]), metrics.get("loss/total", float("nan")),
                 metrics.get("loss/kl", float("nan")))
    return StageResult(
        counts={"records": len(cands) + skipped, "trained": len(cands), "skipped_nan_r": skipped,
                "optimizer_steps": int(metrics["update/optimizer_steps"]), "step": state.step},
        seeds={"lora_seed": cfg.rl.lora_seed, "from_checkpoint": str(ckpt) if ckpt else None},
        timings={"build": t_build, "train": t_train},
        metrics=finite_metrics(metrics),
        extra={"world_size": world, "samples_per_rank": samples_per_rank},
    )
