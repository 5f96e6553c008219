"""Group branching of a rollout (clip-level): one shared prefix per prompt, K candidate windows.

For one prompt (streaming training, DESIGN.md part 2)::

    blocks 0 .. s-1          prefix, generated once (batch 1) from ``prefix_seed``
    fork the KV cache K ways
    blocks s .. s+W-1        window, candidate j continues from the same cache with ``cand_seeds[j]``

Because every sample draws its noise from its own generator (:class:`SampleNoise`), candidate j's
window equals a fresh, non-forked run that regenerates the prefix with ``prefix_seed`` and then
continues with ``cand_seeds[j]``: any candidate can be regenerated exactly from its recorded seeds.

What rewards score: the candidate's video is decoded as ``prefix + window`` with the causal VAE
(streaming decoder, block by block, so memory does not grow with the prefix), and only the pixel
frames of the window are kept. Decoding the window alone would restart the VAE's causal cache and
render the window's first latent frame as a video's first frame (1 pixel frame instead of 4, with
different content); decoding with the prefix gives exactly the frames a viewer of the full video sees.
With ``P`` prefix latent frames and ``W`` window latent frames the window pixels are frames
``[1 + 4(P-1), 1 + 4(P+W-1))`` of the full decode: ``4W`` frames when ``P > 0``, ``1 + 4(W-1)`` when ``P = 0``.

Scene prompts (``p1[3s] | p2``, :mod:`astrolabe.sampling.scenes`): each block is conditioned on the text of the
scene it lies in, the stream switching prompt at each scene's first block as generation does (soft: the cached
frames re-encoded under the new text; ``#``: a cut), and the window lies inside one scene, so one caption judges it
(the record's ``window_prompt``); the update replays the prefix with the same switches
(:func:`astrolabe.sampling.streaming.rebuild_context`).

Prompt choice and seeds (:func:`choose_prompts`, :func:`group_seeds`, :func:`window_start_block`) are
pure functions of (seeds, iteration, slot), so every rank of a distributed rollout computes the same
plan and takes its own slice of it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from astrolabe.data.video import to_uint8_frames
from astrolabe.models.wan.vae import StreamingDecoder
from astrolabe.sampling.generation import GenerationStack
from astrolabe.sampling.scenes import SceneSegment, segment_at, single_scene_starts
from astrolabe.sampling.streaming import BlockStreamer, SampleNoise

log = logging.getLogger(__name__)

WindowStart = Literal["first", "last", "random"]
_PROMPT_STREAM, _SEEDS, _WINDOW = 0, 1, 2  # domain tags of the seed sequences below


# --------------------------------------------------------------------------------------------- planning


def choose_prompts(num_prompts: int, count: int, seed: int, iteration: int) -> list[int]:
    """Indices (into the prompt list) of the ``count`` prompts of ``iteration``.

    The prompts form an endless stream of epochs; epoch ``e`` is a permutation of ``range(num_prompts)``
    drawn from a generator seeded by ``(seed, e)``. Iteration ``t`` takes stream positions
    ``[t * count, (t + 1) * count)``: prompts are drawn without replacement inside an epoch and the
    list is cycled across iterations, each prompt seen once per epoch. Nothing is reseeded per batch
    (the release's bug 10.1 reseeded its sampler so that each epoch held few distinct prompts).
    A window that crosses an epoch boundary may hold the same prompt twice (only if ``count`` does not
    divide ``num_prompts``); groups are therefore named by slot, not by prompt index.
    """
    if num_prompts < 1:
        raise ValueError("the prompt list is empty; check the filter_prompts output (train.txt)")
    if count < 1 or iteration < 0:
        raise ValueError(f"count must be >= 1 and iteration >= 0, got count={count}, iteration={iteration}")
    start = iteration * count
    out: list[int] = []
    epoch = start // num_prompts
    while len(out) < count:
        perm = np.random.default_rng([_PROMPT_STREAM, _u32(seed), epoch]).permutation(num_prompts)
        lo = (start + len(out)) - epoch * num_prompts
        out.extend(int(i) for i in perm[lo : lo + count - len(out)])
        epoch += 1
    return out


def _u32(x: int) -> int:
    """Non-negative entropy for :class:`numpy.random.SeedSequence` (negative seeds map two's-complement)."""
    return int(x) & 0xFFFF_FFFF


def group_seeds(run_seed: int, rollout_seed: int, iteration: int, slot: int, k: int) -> tuple[int, list[int]]:
    """``(prefix_seed, [K candidate seeds])`` of group ``slot`` of ``iteration``: 32-bit words of
    ``SeedSequence((run_seed, rollout_seed, iteration, slot))``, all distinct (checked)."""
    words = np.random.SeedSequence([_SEEDS, _u32(run_seed), _u32(rollout_seed), iteration, slot]).generate_state(k + 1)
    seeds = [int(w) for w in words]
    if len(set(seeds)) != len(seeds):  # a 32-bit collision: astronomically unlikely, but never silent
        raise RuntimeError(f"seed collision in group {slot} of iteration {iteration}: {seeds}")
    return seeds[0], seeds[1:]


def window_start_block(
    mode: WindowStart, num_blocks: int, window_blocks: int, run_seed: int, rollout_seed: int, iteration: int, slot: int,
    segments: list[SceneSegment] | None = None,
) -> int:
    """First block of the clip window: ``first`` = 0 (no prefix), ``last`` = ``num_blocks - window_blocks``,
    ``random`` = uniform in ``[0, num_blocks - window_blocks]`` from a generator seeded like :func:`group_seeds`.

    With the scene plan of a scene prompt (``segments``), the window must lie inside one scene
    (:func:`~astrolabe.sampling.scenes.single_scene_starts`): ``random`` draws among those starts (the same
    draw as without a plan when every start qualifies), ``first`` and ``last`` must be one.
    """
    if not 1 <= window_blocks <= num_blocks:
        raise ValueError(
            f"rollout.window_blocks={window_blocks} must be in [1, {num_blocks}] (the video has {num_blocks} blocks); "
            "lower rollout.window_blocks or raise rollout.num_latent_frames"
        )
    last = num_blocks - window_blocks
    starts = list(range(last + 1)) if segments is None else single_scene_starts(segments, window_blocks)
    if not starts:
        raise ValueError(f"no window of {window_blocks} blocks fits inside one scene of {_plan(segments)}; lower "
                         "rollout.window_blocks or lengthen the scenes")
    if mode in ("first", "last"):
        start = 0 if mode == "first" else last
        if start not in starts:
            raise ValueError(f"rollout.window_start={mode!r}: the window [{start}, {start + window_blocks}) straddles "
                             f"a scene switch of {_plan(segments)}; use window_start 'random' (it draws among the "
                             "windows inside one scene) or lower rollout.window_blocks")
        return start
    if mode == "random":
        rng = np.random.default_rng([_WINDOW, _u32(run_seed), _u32(rollout_seed), iteration, slot])
        return starts[int(rng.integers(0, len(starts)))]
    raise ValueError(f"rollout.window_start must be 'first', 'last' or 'random', got {mode!r}")


def _plan(segments: list[SceneSegment] | None) -> str:
    """The scene plan in blocks, for messages: ``'a boat' [0, 4) | 'a car' [4, 10)``."""
    return " | ".join(f"{seg.prompt!r} [{seg.start_block}, {seg.end_block})" for seg in segments or [])


# --------------------------------------------------------------------------------------------- generation


@dataclass
class GroupRollout:
    """One prompt's group: shared prefix, K windows, and the decoded window pixels."""

    prefix_latents: torch.Tensor  # (P, C, h, w) float32 cpu, P = window_start_block * block frames (may be 0)
    window_latents: torch.Tensor  # (K, W, C, h, w) float32 cpu
    window_pixels: np.ndarray | None  # (K, F, H, W, 3) uint8, None when not decoded
    window_start_frame: int
    generation_seconds: float
    decoding_seconds: float


@torch.no_grad()
def generate_group_latents(
    stack: GenerationStack,
    contexts: Sequence[torch.Tensor],  # per scene segment, each (1, L, text_dim)
    segments: Sequence[SceneSegment],
    prefix_seed: int,
    cand_seeds: Sequence[int],
    window_start_block: int,
    window_blocks: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix (1, P, C, h, w) generated once, then the window (K, W, C, h, w) of K forked candidates.

    The stream switches prompt at each segment's first block as :func:`astrolabe.sampling.generation` does for a
    scene prompt (the switch into the window's scene, if the window starts one, before the fork); the window lies
    inside one segment (:func:`window_start_block`).
    """
    def enter(streamer: BlockStreamer, block: int) -> None:
        for i, seg in enumerate(segments):
            if i > 0 and seg.start_block == block:
                streamer.switch_prompt(contexts[i], hard=seg.hard_cut_before)

    plan = list(segments)
    if segment_at(plan, window_start_block) != segment_at(plan, window_start_block + window_blocks - 1):
        raise ValueError(f"the window [{window_start_block}, {window_start_block + window_blocks}) straddles a scene "
                         f"switch of {_plan(plan)}")
    streamer = BlockStreamer(stack.dit, stack.stream, contexts[0], SampleNoise([prefix_seed], stack.device))
    prefix = []
    for b in range(window_start_block):
        enter(streamer, b)
        prefix.append(streamer.step())  # (1, f, C, h, w)
    enter(streamer, window_start_block)
    k = len(cand_seeds)
    branch = streamer.fork(k, [list(cand_seeds)])
    window = [branch.step() for _ in range(window_blocks)]  # each (K, f, C, h, w)
    empty = torch.zeros(stack.stream.block_shape(1, 0), device=streamer.context.device, dtype=window[0].dtype)
    return torch.cat(prefix, dim=1) if prefix else empty, torch.cat(window, dim=1)


@torch.no_grad()
def decode_window_pixels(
    stack: GenerationStack,
    prefix: torch.Tensor,  # (P, C, h, w)
    window: torch.Tensor,  # (K, W, C, h, w)
) -> np.ndarray:
    """Decode ``prefix + window`` per candidate block by block and keep the window's pixel frames.

    Returns (K, F, H, W, 3) uint8 with F = 4W if P > 0 else 1 + 4(W - 1) (see the module docstring).
    The prefix is decoded in the K-batch (its output discarded) so each candidate's decoder cache
    carries the prefix's temporal context into the window.
    """
    k = window.shape[0]
    f = stack.stream.block_frames
    decoder = StreamingDecoder(stack.vae)
    dtype = stack.vae.dtype

    def to_vae(x: torch.Tensor) -> torch.Tensor:  # (K, n, C, h, w) -> (K, C, n, h, w)
        return x.permute(0, 2, 1, 3, 4).to(device=stack.vae.device, dtype=dtype)

    prefix_k = prefix.unsqueeze(0).expand(k, *prefix.shape)  # (K, P, C, h, w)
    for s in range(0, prefix.shape[0], f):
        decoder.decode_block(to_vae(prefix_k[:, s : s + f]))
    chunks = [decoder.decode_block(to_vae(window[:, s : s + f])) for s in range(0, window.shape[1], f)]
    pixels = torch.cat(chunks, dim=2)  # (K, 3, F, H, W) in [-1, 1]
    return to_uint8_frames(pixels.permute(0, 2, 1, 3, 4), value_range=(-1.0, 1.0))  # (K, F, H, W, 3)


def rollout_group(
    stack: GenerationStack,
    prompt: str,
    prefix_seed: int,
    cand_seeds: Sequence[int],
    window_start_block: int,
    window_blocks: int,
    decode: bool = True,
    segments: Sequence[SceneSegment] | None = None,
) -> GroupRollout:
    """Generate one group (see the module docstring) and, if ``decode``, the window pixels rewards score.

    ``segments``: the scene plan of a scene prompt (:func:`astrolabe.sampling.scenes.plan_scenes`; each segment's
    text conditions its blocks); None = ``prompt`` conditions every block.
    """
    if len(cand_seeds) < 1:
        raise ValueError("rollout_group needs at least one candidate seed")
    if window_start_block < 0 or window_blocks < 1:
        raise ValueError(
            f"window_start_block must be >= 0 and window_blocks >= 1, got {window_start_block}, {window_blocks}"
        )
    t0 = time.perf_counter()
    if segments is None:
        segments = [SceneSegment(prompt, 0, window_start_block + window_blocks, hard_cut_before=False)]
    contexts = [stack.encode_text([seg.prompt]).to(stack.device) for seg in segments]  # each (1, L, text_dim)
    prefix, window = generate_group_latents(
        stack, contexts, segments, prefix_seed, cand_seeds, window_start_block, window_blocks
    )
    prefix = prefix[0].float().cpu()  # (P, C, h, w)
    window = window.float().cpu()  # (K, W, C, h, w)
    t1 = time.perf_counter()
    pixels = decode_window_pixels(stack, prefix, window) if decode else None
    t2 = time.perf_counter()
    log.debug("group %r: prefix %s, window %s (%.2fs gen, %.2fs decode)", prompt[:40], tuple(prefix.shape),
              tuple(window.shape), t1 - t0, t2 - t1)
    return GroupRollout(
        prefix_latents=prefix,
        window_latents=window,
        window_pixels=pixels,
        window_start_frame=window_start_block * stack.stream.block_frames,
        generation_seconds=t1 - t0,
        decoding_seconds=t2 - t1,
    )
