"""FSDP lockstep for the update: every forward and backward of an FSDP2 model is a collective, so every rank
must run the same sequence of them, whatever its share of a step's micro-batches and their prefix lengths
(:mod:`stages.nft_update` runs the plan).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from astrolabe.artifacts.ranks import rank_slice
from astrolabe.rl.streaming_update import train_mode

__all__ = ["LockstepRun", "idle_forwards", "lockstep_plan"]

LockstepRun = tuple[list[int], int, bool]  # (micro-batch, idle forwards before it, real: not a zero-weight pad)


def lockstep_plan(chunk: list[list[int]], world: int, passes: Callable[[list[int]], int]) -> list[list[LockstepRun]]:
    """FSDP: what each rank runs at each position of a step, as ``(micro-batch, idle forwards, real)``.

    Every forward and backward of an FSDP2 model is a collective, so every rank must run the same sequence.
    Rank ``k`` runs its :func:`rank_slice` of ``chunk``, then zero-weight copies of ``chunk[0]`` (``real`` False)
    up to ``ceil(len(chunk) / world)`` micro-batches; before each, ``idle forwards`` no-grad forwards make its
    number of no-grad forwards (``passes`` context passes, then the old / ref policies) that of the rank
    with the longest prefix at that position.
    """
    share = -(-len(chunk) // world)
    runs = [[(chunk[i], True) for i in rank_slice(len(chunk), k, world)] for k in range(world)]
    runs = [r + [(chunk[0], False)] * (share - len(r)) for r in runs]
    longest = [max(passes(r[i][0]) for r in runs) for i in range(share)]
    return [[(idx, longest[i] - passes(idx), real) for i, (idx, real) in enumerate(r)] for r in runs]


@torch.no_grad()
def idle_forwards(model: torch.nn.Module, n: int, window: np.ndarray, context: torch.Tensor, stream: Any) -> None:
    """``n`` no-grad forwards of one latent block (output dropped), to keep in step with the other FSDP ranks."""
    if n == 0:
        return
    p = next(model.parameters())
    x = torch.zeros((1, stream.block_frames, *window.shape[1:]), device=p.device, dtype=p.dtype)  # (1, f, C, h, w)
    with train_mode(model, False):
        for _ in range(n):
            model(x, torch.zeros(1, device=p.device), context)
