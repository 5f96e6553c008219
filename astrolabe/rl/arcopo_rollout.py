"""AR-CoPO rollouts: one pivot group per prompt, stored per branch in the rollout shards.

For group ``slot`` of ``iteration`` (``ar-copo-reference.md`` 2.2-2.3, Algorithm 1 lines 1-6)::

    p         = pivot_block(...)              uniform over the L blocks of the video, from an explicit
                                              generator seeded by (run seed, rollout seed, iteration, slot)
    tape      = BranchTapeSeeds(base_seed, perturb_seed, p, G, sigma, L).build(stream)
                                              every draw shared by the G branches except block p's initial noise
    group     = generate_pivot_group(dit, stream, context, tape, p)
                                              prefix once, KV cache forked G ways at p, rest with shared noise
    video_i   = decode(prefix + branch_i)     the full video (sequence-level reward, Algorithm 1 line 6)

Payload of branch i (record key ``<group>-c<i>``, same shard writer and manifest as the NFT rollout):

* ``latents``       (F - P, C, h, w) float32: the pivot block and every later block of branch i
* ``prefix``        (P, C, h, w) float32: the shared clean prefix (P = p * block frames, may be 0)
* ``pivot_inputs``  (S, f, C, h, w) float32: the model input x_t of branch i at each of the S steps of block p
* ``pivot_x0``      (S, f, C, h, w) float32: the sampling (old) policy's x0 prediction at each step (the
  AR-CoPO candidates); ``pivot_x0[-1]`` is the clean pivot block (= ``latents[:f]``)
* ``video``         mp4 of the full decoded video (prefix + branch)
* ``meta``          prompt, group, candidate, ``pivot_block``, ``pivot_start_frame``, ``num_blocks``,
  ``pivot_timesteps`` / ``pivot_sigmas`` (the schedule the inputs were made with), ``tape``
  (:class:`BranchTapeSeeds` as a dict: the tape reference, enough to replay every branch) and
  ``algorithm = "arcopo"``.

Assumption (reference U11): the pivot is uniform over *all* blocks, including block 0 (empty prefix).
Assumption: the prefix is generated once per group from the tape's shared rows; the group's base and
perturbation seeds are :func:`astrolabe.sampling.branching.group_seeds` with one "candidate" seed (the perturbation
seed), so the NFT and AR-CoPO plans draw from the same seed family.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from astrolabe.data.shards import RolloutShardWriter
from astrolabe.data.video import encode_mp4
from astrolabe.sampling.generation import GenerationStack
from astrolabe.sampling.branching import decode_window_pixels, group_seeds
from astrolabe.sampling.noise_tape import BranchTapeSeeds
from astrolabe.sampling.pivot import PivotGroup, generate_pivot_group

log = logging.getLogger(__name__)

ALGORITHM = "arcopo"
PREFIX = "prefix"
PIVOT_INPUTS = "pivot_inputs"
PIVOT_X0 = "pivot_x0"
_PIVOT = 3  # domain tag of the pivot draw (astrolabe.sampling.branching uses 0-2)


def pivot_block(num_blocks: int, run_seed: int, rollout_seed: int, iteration: int, slot: int) -> int:
    """The pivot ``p ~ Uniform{0 .. L-1}`` of group ``slot`` of ``iteration`` (a pure function of the seeds)."""
    if num_blocks < 1:
        raise ValueError(f"a video needs at least one block to pick a pivot from, got num_blocks={num_blocks}")
    rng = np.random.default_rng([_PIVOT, int(run_seed) & 0xFFFF_FFFF, int(rollout_seed) & 0xFFFF_FFFF, iteration, slot])
    return int(rng.integers(0, num_blocks))


def group_tape_seeds(
    run_seed: int, rollout_seed: int, iteration: int, slot: int, group_size: int, sigma: float, num_blocks: int
) -> BranchTapeSeeds:
    """Everything that determines group ``slot``'s branch tape (record it: it replays the group)."""
    base_seed, (perturb_seed,) = group_seeds(run_seed, rollout_seed, iteration, slot, 1)
    return BranchTapeSeeds(
        base_seed=base_seed,
        perturb_seed=perturb_seed,
        pivot_block=pivot_block(num_blocks, run_seed, rollout_seed, iteration, slot),
        group_size=group_size,
        sigma=sigma,
        num_blocks=num_blocks,
    )


@dataclass
class PivotRollout:
    """One prompt's pivot group on the CPU in float32, with the decoded full videos."""

    seeds: BranchTapeSeeds
    group: PivotGroup  # tensors float32 cpu; prefix_latents (1, P, C, h, w)
    pixels: np.ndarray | None  # (G, F_px, H, W, 3) uint8, None when not decoded
    timesteps: tuple[float, ...]  # the pivot block's schedule
    sigmas: tuple[float, ...]
    generation_seconds: float
    decoding_seconds: float


def rollout_pivot_group(
    stack: GenerationStack, prompt: str, seeds: BranchTapeSeeds, decode: bool = True
) -> PivotRollout:
    """Generate one pivot group (module docstring) and, if ``decode``, its G full videos."""
    t0 = time.perf_counter()
    context = stack.encode_text([prompt]).to(stack.device)  # (1, L, text_dim)
    tape = seeds.build(stack.stream, device=stack.device)
    g = generate_pivot_group(stack.dit, stack.stream, context, tape, seeds.pivot_block)
    g = PivotGroup(
        prefix_latents=g.prefix_latents.float().cpu(),
        pivot_inputs=g.pivot_inputs.float().cpu(),
        pivot_x0=g.pivot_x0.float().cpu(),
        latents=g.latents.float().cpu(),
        pivot_start_frame=g.pivot_start_frame,
    )
    t1 = time.perf_counter()
    pixels = decode_window_pixels(stack, g.prefix_latents[0, :0], g.videos()) if decode else None
    t2 = time.perf_counter()
    steps = stack.stream.steps_for(g.pivot_start_frame)
    return PivotRollout(seeds, g, pixels, tuple(float(t) for t in steps.timesteps),
                        tuple(float(s) for s in steps.sigmas), t1 - t0, t2 - t1)


def branch_meta(ro: PivotRollout, prompt: str, prompt_index: int, group: str, i: int, **common: Any) -> dict[str, Any]:
    """``meta.json`` of branch ``i`` (module docstring)."""
    g = ro.group
    return {
        "algorithm": ALGORITHM,
        "prompt": prompt,
        "prompt_index": prompt_index,
        "group": group,
        "candidate": i,
        "group_size": int(g.latents.shape[0]),
        "pivot_block": ro.seeds.pivot_block,
        "pivot_start_frame": g.pivot_start_frame,
        "num_blocks": ro.seeds.num_blocks,
        "pivot_steps": int(g.pivot_inputs.shape[0]),
        "pivot_timesteps": list(ro.timesteps),
        "pivot_sigmas": list(ro.sigmas),
        "window_start_frame": g.pivot_start_frame,
        "window_frames": int(g.latents.shape[1]),
        "prefix_frames": int(g.prefix_latents.shape[1]),
        "tape": ro.seeds.to_dict(),
        **common,
    }


def write_branches(writer: RolloutShardWriter, ro: PivotRollout, group: str, meta: Callable[[int], dict[str, Any]],
                   fps: float, crf: int) -> float:  # fmt: skip
    """Append the G branch records of one group; returns the seconds spent encoding mp4s."""
    g = ro.group
    prefix = g.prefix_latents[0].numpy()  # (P, C, h, w)
    seconds = 0.0
    for i in range(g.latents.shape[0]):
        t = time.perf_counter()
        mp4 = encode_mp4(ro.pixels[i], fps=fps, crf=crf) if ro.pixels is not None else None
        seconds += time.perf_counter() - t
        extras = {PREFIX: prefix, PIVOT_INPUTS: g.pivot_inputs[:, i].numpy(), PIVOT_X0: g.pivot_x0[:, i].numpy()}
        writer.write(f"{group}-c{i}", g.latents[i].numpy(), meta(i), video_mp4=mp4, extras=extras)
    return seconds


@dataclass
class PivotRolloutSummary:
    """What the rollout stage publishes for a slice of AR-CoPO groups."""

    counts: dict[str, int] = field(default_factory=dict)
    groups: dict[str, Any] = field(default_factory=dict)  # group id -> seeds (tape) and prompt index
    timings: dict[str, float] = field(default_factory=lambda: {"generation": 0.0, "decoding": 0.0, "encoding_mp4": 0.0})


def rollout_pivot_groups(
    stack: GenerationStack,
    writer: RolloutShardWriter,
    prompts: Sequence[str],
    chosen: Sequence[int],
    slots: Sequence[int],
    *,
    iteration: int,
    run_seed: int,
    rollout_seed: int,
    group_size: int,
    sigma: float,
    num_blocks: int,
    group_id: Callable[[int, int], str],
    decode: bool = True,
    crf: int = 0,
    common_meta: dict[str, Any] | None = None,
) -> PivotRolloutSummary:
    """Generate and write the pivot groups of ``slots`` (this rank's slice of ``chosen``)."""
    out = PivotRolloutSummary()
    n_blocks = n_records = 0
    for slot in slots:
        idx = chosen[slot]
        gid = group_id(iteration, slot)
        seeds = group_tape_seeds(run_seed, rollout_seed, iteration, slot, group_size, sigma, num_blocks)
        ro = rollout_pivot_group(stack, prompts[idx], seeds, decode=decode)
        out.timings["generation"] += ro.generation_seconds
        out.timings["decoding"] += ro.decoding_seconds
        out.timings["encoding_mp4"] += write_branches(
            writer, ro, gid, lambda i: branch_meta(ro, prompts[idx], idx, gid, i, iteration=iteration,
                                                   **(common_meta or {})),
            fps=stack.fps, crf=crf,
        )
        out.groups[gid] = {"prompt_index": idx, "tape": seeds.to_dict()}
        n_records += group_size
        n_blocks += seeds.pivot_block + group_size * (num_blocks - seeds.pivot_block)
        log.info("rollout it%d arcopo group %s (prompt %d): pivot block %d of %d", iteration, gid, idx,
                 seeds.pivot_block, num_blocks)
    out.counts = {"prompts": len(slots), "candidates": n_records, "blocks": n_blocks}
    return out
