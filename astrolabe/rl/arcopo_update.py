"""AR-CoPO update: the Neighbor-GRPO surrogate on each group's pivot chunk, against a detached prefix cache.

One group (``ar-copo-reference.md`` 2.2 lines 8-9, 4 "Minimal loss"), with the rollout payload of
:mod:`astrolabe.rl.arcopo_rollout` and the advantages of the label stage::

    h          = build_prefix_cache(F_old, prefix latents)       no grad, rebuilt by the sampler's context passes
    anchors    = B of the G branches (symmetric anchor sampling, the ``anchors`` generator)
    for each denoising step t of the pivot block (S steps):
        x_k      = pivot_inputs[t, k]                            the anchors' stored model inputs
        a_old    = F_old(x_k, h, t)                               no grad
        a        = F_theta(x_k, h, t)                             grad (the only one)
        loss_t   = arcopo_loss(a, candidates = pivot_x0[t, :], A, old_anchor_pred = a_old)
        backward(loss_t / (S * groups per optimizer step))     (:func:`accumulate_groups`)

``F(x, h, t)`` is exactly the sampler's step (:func:`astrolabe.sampling.streaming.denoise_steps`): the DiT at
the schedule's timestep against the cache, then ``x0 = x - sigma v``. The cache is read through
:meth:`KVCache.read_only` (never written).

Old policy. On-policy (``old_policy="old"``): the ``old`` adapter, equal to ``default`` when the phase starts
(every AR-CoPO phase ends with ``old <- default``, :meth:`PolicySet.sync_old`), so the rollout of the next
iteration samples with the policy the phase produced and the first optimizer step has every ratio exactly 1
(the same weights run the same forward on the same inputs). Semi-on-policy (``old_policy="ref"``): the base
model (adapters off), which also rolled the buffer out.

Assumption (reference U6, U7): the old anchor prediction ``a_old`` is *recomputed* by the old policy in the
update rather than read from the stored candidate ``pivot_x0[t, k]``. Mathematically they agree (same policy,
same input, same prefix); numerically the recomputation is bit-identical to the current forward at the first
step, which the stored value (made by the merged-LoRA sampler in another batch) need not be.
Assumption (U2): the candidate set includes the anchor's own branch; one forward per step runs all B anchors.
Assumption (U9): ``rl.epochs`` passes over the iteration's groups (2 in the paper's preset); one optimizer step
per ``rl.accumulation_steps`` groups.

On N ranks (torchrun) every rank holds the same groups, state and generators and draws the same shuffle and the
anchors of every group of a step (in group order, as one process does); rank ``k`` then trains the contiguous share
:func:`~astrolabe.artifacts.ranks.rank_slice` of the step's (group, denoising step) micro-batches (a group cut
between two ranks builds its prefix cache on both), with the sample weights of the whole step
(:func:`step_sizes`), and the weighted gradients are summed across ranks by
:func:`~astrolabe.rl.accumulation.accumulate_gradients`: every rank takes the single-process optimizer step. Under
DDP (``parallel.strategy=ddp``) the trained forward runs through the wrapper inside ``no_sync`` (the accumulation
is the one reduction). The per-micro-batch metrics are all-gathered and folded in the single-process order.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from astrolabe.artifacts.ranks import rank_slice
from astrolabe.data.shards import list_shards, read_rollout_shards
from astrolabe.distributed import dist_rank_world, gather_objects
from astrolabe.rl.arcopo import ArCoPOConfig, arcopo_loss, choose_anchors
from astrolabe.rl.arcopo_rollout import PIVOT_INPUTS, PIVOT_X0, PREFIX
from astrolabe.parallel import ParallelConfig, parallelize
from astrolabe.rl.accumulation import accumulate_gradients, shuffled_steps
from astrolabe.rl.state import TrainingState
from astrolabe.rl.streaming_update import build_prefix_cache, train_mode
from astrolabe.sampling.kv_cache import KVCache
from astrolabe.sampling.schedule import flow_to_x0
from astrolabe.sampling.streaming import StreamConfig

log = logging.getLogger(__name__)

OldPolicy = Literal["old", "ref"]
ARCOPO_GENERATORS = ("shuffle", "anchors")  # the update's generators (registered on the TrainingState)


# ----------------------------------------------------------------------------------- data


@dataclass
class PivotGroupData:
    """One group's update inputs, from the rollout shards and the labels."""

    group: str
    prompt: str
    prefix: np.ndarray  # (P, C, h, w) float32 (P may be 0)
    pivot_inputs: np.ndarray  # (S, G, f, C, h, w) float32: x_t of each branch at each step
    pivot_x0: np.ndarray  # (S, G, f, C, h, w) float32: the old policy's x0 predictions (candidates)
    advantages: np.ndarray  # (G,) float64
    pivot_start_frame: int
    timesteps: tuple[float, ...]  # (S,) the pivot block's schedule, as sampled
    sigmas: tuple[float, ...]


def _group_from_records(recs: Sequence[Mapping], adv: Sequence[float]) -> PivotGroupData:
    """Assemble a group from its branch records (sorted by candidate) and their advantages."""
    meta = recs[0]["meta"]
    missing = [n for n in (PREFIX, PIVOT_INPUTS, PIVOT_X0) if n not in recs[0]]
    if missing or meta.get("algorithm") != "arcopo":
        raise KeyError(
            f"record {recs[0]['__key__']!r} is not an AR-CoPO rollout record (missing {missing}); rerun the rollout "
            "stage with rl.algorithm: arcopo"
        )
    return PivotGroupData(
        group=str(meta["group"]),
        prompt=str(meta["prompt"]),
        prefix=recs[0][PREFIX],
        pivot_inputs=np.stack([r[PIVOT_INPUTS] for r in recs], axis=1),
        pivot_x0=np.stack([r[PIVOT_X0] for r in recs], axis=1),
        advantages=np.asarray(adv, dtype=np.float64),
        pivot_start_frame=int(meta["pivot_start_frame"]),
        timesteps=tuple(float(t) for t in meta["pivot_timesteps"]),
        sigmas=tuple(float(s) for s in meta["pivot_sigmas"]),
    )


def read_pivot_groups(rollout: Path, keys: Sequence[str], advantages: np.ndarray) -> tuple[list[PivotGroupData], int]:
    """Every group whose advantages are all finite, in shard order, and the number of groups skipped.

    ``keys`` / ``advantages`` are the label columns (aligned with the shard records by key).
    """
    adv_of = dict(zip(keys, np.asarray(advantages, dtype=np.float64).tolist(), strict=True))
    paths = list_shards(rollout)
    if not paths:
        raise ValueError(f"no rollout shards (*.tar) in {rollout}; run the rollout stage first")
    by_group: dict[str, list[Mapping]] = defaultdict(list)
    for rec in read_rollout_shards(paths):
        if rec["__key__"] not in adv_of:
            raise KeyError(f"record {rec['__key__']!r} has no label; rerun label_uncertainty for this rollout")
        by_group[str(rec["meta"]["group"])].append(rec)
    groups: list[PivotGroupData] = []
    skipped = 0
    for recs in by_group.values():
        recs = sorted(recs, key=lambda r: int(r["meta"]["candidate"]))
        adv = [adv_of[r["__key__"]] for r in recs]
        if len(recs) < 2 or not all(math.isfinite(a) for a in adv):
            skipped += 1
            continue
        groups.append(_group_from_records(recs, adv))
    return groups, skipped


# ----------------------------------------------------------------------------------- forwards


def pivot_x0(
    model: nn.Module,
    cache: KVCache,  # forked to the batch
    x_t: torch.Tensor,  # (B, f, C, h, w)
    timestep: float,
    sigma: float,
    context: torch.Tensor,  # (B, L, text_dim)
    start_frame: int,
) -> torch.Tensor:
    """The sampler's x0 prediction ``x_t - sigma * F(x_t, t | cache)`` (B, f, C, h, w); the cache is only read."""
    tt = torch.full((x_t.shape[0],), timestep, device=x_t.device)
    v = model(x_t, tt, context, kv_cache=cache.read_only(), start_frame=start_frame)
    return flow_to_x0(x_t, v, sigma)


@dataclass
class PreparedGroup:
    """What the S step losses of one group share: its anchors, the detached prefix cache, context, advantages."""

    group: PivotGroupData
    anchors: list[int]  # (B,) branch indices
    cache: KVCache  # forked to the B anchors, only read
    context: torch.Tensor  # (B, L, text_dim)
    advantages: torch.Tensor  # (G,)


def prepare_group(
    state: TrainingState,
    group: PivotGroupData,
    anchors: Sequence[int],  # (B,) branch indices (:func:`draw_anchors`)
    context: torch.Tensor,  # (1, L, text_dim)
    stream: StreamConfig,
    old_policy: OldPolicy,
) -> PreparedGroup:
    """The group's prefix cache under the old policy, forked to its anchors."""
    anchors = list(anchors)
    b = len(anchors)
    prefix = torch.from_numpy(group.prefix).to(device=context.device, dtype=context.dtype)[None]  # (1, P, C, h, w)
    with torch.no_grad(), state.policies.use(old_policy) as m, train_mode(m, False):
        cache = build_prefix_cache(m, stream, context, prefix).fork(b)
    return PreparedGroup(group, anchors, cache, context.expand(b, -1, -1),
                         torch.from_numpy(group.advantages).to(context.device))


def step_loss(
    state: TrainingState, g: PreparedGroup, t: int, cfg: ArCoPOConfig, old_policy: OldPolicy,
    model: nn.Module | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The surrogate of denoising step ``t`` of the pivot block (module docstring) and its metrics.

    ``model``: the module that runs the trained forward (the DDP wrapper); None = the policies' model.
    """
    policies, data = state.policies, g.group
    device, dtype = g.context.device, g.context.dtype
    timestep, sigma = data.timesteps[t], data.sigmas[t]
    x = torch.from_numpy(data.pivot_inputs[t, g.anchors]).to(device=device, dtype=dtype)  # (B, f, C, h, w)
    cand = torch.from_numpy(data.pivot_x0[t]).to(device=device, dtype=dtype)  # (G, f, C, h, w)
    with torch.no_grad(), policies.use(old_policy) as m, train_mode(m, False):
        old = pivot_x0(m, g.cache, x, timestep, sigma, g.context, data.pivot_start_frame)
    with policies.use("default") as m, train_mode(m, True):  # train mode: activation checkpointing engages
        cur = pivot_x0(m if model is None else model, g.cache, x, timestep, sigma, g.context, data.pivot_start_frame)
    return arcopo_loss(cur, cand.unsqueeze(0).expand(len(g.anchors), *cand.shape), g.advantages, cfg=cfg,
                       old_anchor_pred=old)


def step_sizes(steps: Sequence[int]) -> list[int]:
    """Sample counts of the (group, step) micro-batches of one optimizer step, group by group.

    A group with ``S_i`` denoising steps has ``S_i`` micro-batches of size ``M / S_i`` (``M`` the least common
    multiple of the ``S_i``), so :func:`~astrolabe.rl.accumulation.accumulate_gradients`'s weights are
    ``(M / S_i) / (n M) = 1 / (S_i n)`` for ``n`` groups: every group counts equally, its steps averaged.
    """
    m = math.lcm(*steps)
    return [m // s for s in steps for _ in range(s)]


def draw_anchors(groups: Sequence[PivotGroupData], cfg: ArCoPOConfig, generator: torch.Generator) -> list[list[int]]:
    """Each group's anchors (symmetric anchor sampling), drawn from ``generator`` in group order."""
    return [choose_anchors(g.pivot_inputs.shape[1], cfg.anchors, generator) for g in groups]


def _fold_metrics(
    per_item: Mapping[tuple[int, int], Mapping[str, float]], groups: Sequence[PivotGroupData]
) -> list[dict[str, float]]:
    """Each group's metrics averaged over its steps, summed in (group, step) order whatever rank made them."""
    metrics: list[dict[str, float]] = [defaultdict(float) for _ in groups]
    for (i, t) in sorted(per_item):
        for k, v in per_item[(i, t)].items():
            metrics[i][k] += v / len(groups[i].timesteps)
    return [dict(m) for m in metrics]


def accumulate_groups(
    state: TrainingState,
    groups: Sequence[PivotGroupData],
    contexts: Mapping[str, torch.Tensor],  # prompt -> (1, L, text_dim)
    stream: StreamConfig,
    cfg: ArCoPOConfig,
    old_policy: OldPolicy,
    *,
    model: nn.Module | None = None,
    across_ranks: bool = False,
) -> list[dict[str, float]]:
    """Back-propagate the mean surrogate of ``groups`` (one optimizer step's worth, not stepped); returns each
    group's metrics averaged over its steps. Each (group, step) is one micro-batch of
    :func:`~astrolabe.rl.accumulation.accumulate_gradients` (:func:`step_sizes`). The anchors of every group are
    drawn first, in group order (:func:`draw_anchors`), a group's cache is built at its first micro-batch.

    ``across_ranks``: this rank trains its :func:`~astrolabe.artifacts.ranks.rank_slice` of the micro-batches and
    the gradients and metrics are combined over the ranks (module docstring); every rank must call it with the
    same ``groups`` and generator state. ``model``: the module of the trained forward (:func:`step_loss`).
    """
    rank, world = dist_rank_world() if across_ranks else (0, 1)
    anchors = draw_anchors(groups, cfg, state.generators["anchors"])  # every rank draws all: generators stay equal
    items = [(i, t) for i, g in enumerate(groups) for t in range(len(g.timesteps))]
    sizes = step_sizes([len(g.timesteps) for g in groups])  # weights of the whole step, whichever rank trains it
    mine = rank_slice(len(items), rank, world)
    per_item: dict[tuple[int, int], dict[str, float]] = {}
    prepared: dict[int, PreparedGroup] = {}

    def loss_of(item: tuple[int, int]) -> torch.Tensor:
        i, t = item
        if i not in prepared:
            prepared.clear()  # one group's cache at a time
            g = groups[i]
            prepared[i] = prepare_group(state, g, anchors[i], contexts[g.prompt], stream, old_policy)
        loss, per_item[item] = step_loss(state, prepared[i], t, cfg, old_policy, model)
        return loss

    accumulate_gradients(state, loss_of, items[mine.start : mine.stop], sizes[mine.start : mine.stop],
                         across_ranks=across_ranks)
    if across_ranks:
        per_item = {item: m for part in gather_objects(per_item) for item, m in part.items()}
    return _fold_metrics(per_item, groups)


def arcopo_phase(
    state: TrainingState,
    groups: Sequence[PivotGroupData],
    contexts: Mapping[str, torch.Tensor],  # prompt -> (1, L, text_dim)
    stream: StreamConfig,
    cfg: ArCoPOConfig,
    *,
    epochs: int,
    accumulation_steps: int,
    old_policy: OldPolicy,
    parallel: ParallelConfig | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """``epochs`` shuffled passes over ``groups``, one optimizer step per ``accumulation_steps`` groups.

    ``parallel``: :func:`astrolabe.parallel.parallelize` settings of the model (activation checkpointing, DDP;
    FSDP is refused). Under torchrun (world size > 1) every optimizer step is sliced across the ranks (module
    docstring); every rank must call it with the same arguments and state. Returns the metrics averaged over
    groups (``loss/policy``, ``arcopo/entropy``, ``arcopo/clip_fraction``, ``arcopo/ratio_*``, ...), the per-step
    ``update/grad_norm`` and ``update/lr``, and ``update/optimizer_steps`` (the same on every rank). With ``old_policy="old"`` the phase ends with
    ``old <- default`` (the next rollout's sampling policy).
    """
    if not groups:
        raise ValueError("the AR-CoPO phase has no group to train on (every group was skipped)")
    model = state.policies.model
    if parallel is not None:
        if parallel.strategy == "fsdp":
            raise ValueError("parallel.strategy='fsdp': the AR-CoPO update runs replicated (use 'ddp' or 'none')")
        model = parallelize(model, parallel)
    no_sync = model.no_sync if hasattr(model, "no_sync") else contextlib.nullcontext  # the accumulation reduces
    distributed = dist_rank_world()[1] > 1
    sums: dict[str, list[float]] = defaultdict(list)
    total = epochs * math.ceil(len(groups) / accumulation_steps)
    steps = shuffled_steps(len(groups), epochs, accumulation_steps, state.generators["shuffle"])
    for done, step in enumerate(steps, 1):
        with no_sync():
            per_group = accumulate_groups(state, [groups[i] for i in step], contexts, stream, cfg, old_policy,
                                          model=model, across_ranks=distributed)
        for m in per_group:
            for k, v in m.items():
                sums[k].append(v)
        stats = state.optimizer_step()
        sums["update/grad_norm"].append(stats.grad_norm)
        sums["update/lr"].append(stats.lr)
        if on_step is not None:
            on_step(done, total)
    if old_policy == "old":
        state.policies.sync_old()
    out = {k: float(np.mean(v)) for k, v in sums.items()}
    out["update/optimizer_steps"] = float(total)
    out["update/groups"] = float(len(groups))
    return out
