"""Pivot forking (AR-CoPO rollouts): one shared prefix, G branches from the pivot block to the end.

For one prompt and a batch-G branch tape (:func:`astrolabe.sampling.noise_tape.branch_tapes`)::

    blocks 0 .. p-1     prefix, generated once (batch 1) from the tape's shared rows
    fork the KV cache G ways (:meth:`BlockStreamer.fork_with`, the same fork as group branching)
    block p             pivot: branch i starts from its own initial noise; per step the model inputs
                        x_t^(i) and the x0 predictions x0_hat^(i) (the old policy's, since the sampling
                        policy is the old policy) are kept: the AR-CoPO candidates and anchor inputs
    blocks p+1 .. L-1   every branch continues with the tape's (shared) draws

Branch i equals a from-scratch run of ``tape.select([i])`` with no fork (tested), so a branch is
replayable from its tape alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from astrolabe.models.wan.dit import WanDiT
from astrolabe.sampling.noise_tape import NoiseTape
from astrolabe.sampling.streaming import BlockStreamer, StreamConfig, denoise_steps


@dataclass
class PivotGroup:
    """One prompt's G branches forked at the pivot block."""

    prefix_latents: torch.Tensor  # (1, P, C, h, w), P = pivot_start_frame (may be 0)
    pivot_inputs: torch.Tensor  # (S, G, f, C, h, w): model input x_t at each denoising step of the pivot block
    pivot_x0: torch.Tensor  # (S, G, f, C, h, w): x0 prediction at each step; pivot_x0[-1] = clean pivot block
    latents: torch.Tensor  # (G, F - P, C, h, w): the pivot block and every later block, per branch
    pivot_start_frame: int

    def videos(self) -> torch.Tensor:
        """Full latent videos (G, F, C, h, w): the shared prefix followed by each branch."""
        g = self.latents.shape[0]
        return torch.cat([self.prefix_latents.expand(g, *self.prefix_latents.shape[1:]), self.latents], dim=1)


def _check_shared_prefix(tape: NoiseTape, pivot_block: int) -> None:
    for b in range(pivot_block):
        t = tape.blocks[b]  # (S, G, f, C, h, w)
        if not torch.equal(t, t[:, :1].expand_as(t)):
            raise ValueError(
                f"the branch tape's block {b} (before pivot {pivot_block}) differs between branches: a shared "
                "prefix needs identical noise before the pivot; build the tape with branch_tapes()"
            )


@torch.no_grad()
def generate_pivot_group(
    model: WanDiT,
    stream: StreamConfig,
    context: torch.Tensor,  # (1, L, text_dim)
    tape: NoiseTape,  # G streams, num_blocks blocks
    pivot_block: int,
) -> PivotGroup:
    """Generate the prefix once, fork the cache into ``len(tape)`` branches at ``pivot_block``, record the
    pivot block's per-step inputs and x0 predictions, and finish every branch (module docstring)."""
    if context.shape[0] != 1:
        raise ValueError(f"generate_pivot_group takes one prompt, got a context batch of {context.shape[0]}")
    if not 0 <= pivot_block < tape.num_blocks:
        raise ValueError(f"pivot block {pivot_block} outside the tape's {tape.num_blocks} blocks")
    _check_shared_prefix(tape, pivot_block)
    g = len(tape)
    streamer = BlockStreamer(model, stream, context, tape.select([0]))
    prefix = [streamer.step() for _ in range(pivot_block)]  # each (1, f, C, h, w)
    branch = streamer.fork_with(g, tape)
    pivot_start = branch.next_frame
    trajectory = list(denoise_steps(model, branch.cache, branch.context, branch.noise, pivot_start, stream))
    branch.commit(trajectory[-1][1])
    rest = [branch.step() for _ in range(tape.num_blocks - pivot_block - 1)]  # each (G, f, C, h, w)
    empty = torch.zeros(stream.block_shape(1, 0), device=context.device, dtype=trajectory[-1][1].dtype)
    return PivotGroup(
        prefix_latents=torch.cat(prefix, dim=1) if prefix else empty,
        pivot_inputs=torch.stack([x for x, _ in trajectory]),
        pivot_x0=torch.stack([x0 for _, x0 in trajectory]),
        latents=torch.cat([trajectory[-1][1], *rest], dim=1),
        pivot_start_frame=pivot_start,
    )
