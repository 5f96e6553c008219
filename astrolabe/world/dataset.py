"""(caption, frames) training pairs of the world, by seed: what a pretraining step consumes.

Pair ``i`` of seed ``s`` uses its own generator ``numpy.random.default_rng([s, i])``: the caption is
``captions[g.integers(len(captions))]`` (the train captions by default, never a held-out combination)
and the frames are that caption rendered with the same generator. A pair is thus a pure function of
``(s, i)``: any slice of the stream can be regenerated (resume, data-parallel ranks) without the rest.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from astrolabe.world.grammar import WorldCaption, train_captions
from astrolabe.world.render import WorldConfig, render_caption

__all__ = ["training_batch", "training_pair", "training_pairs"]


def training_pair(
    seed: int, index: int, config: WorldConfig = WorldConfig(), captions: Sequence[WorldCaption] | None = None
) -> tuple[str, torch.Tensor]:
    """Pair ``index`` of the stream of ``seed``: (caption text, frames (T, 3, H, W) float32 in [0, 1])."""
    pool = train_captions() if captions is None else captions
    if not pool:
        raise ValueError("training_pair needs at least one caption")
    generator = np.random.default_rng([seed, index])
    caption = pool[int(generator.integers(len(pool)))]
    video = render_caption(caption, generator, config)
    return video.caption, video.frames


def training_pairs(
    seed: int,
    config: WorldConfig = WorldConfig(),
    captions: Sequence[WorldCaption] | None = None,
    start: int = 0,
    stop: int | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pairs ``start, start + 1, ...`` (up to ``stop`` exclusive, or forever) of the stream of ``seed``."""
    pool = train_captions() if captions is None else captions
    index = start
    while stop is None or index < stop:
        yield training_pair(seed, index, config, pool)
        index += 1


def training_batch(
    seed: int, indices: Sequence[int], config: WorldConfig = WorldConfig(), captions: Sequence[WorldCaption] | None = None
) -> tuple[list[str], torch.Tensor]:
    """Pairs ``indices`` stacked: (captions, frames (B, T, 3, H, W))."""
    pool = train_captions() if captions is None else captions
    pairs = [training_pair(seed, i, config, pool) for i in indices]
    return [caption for caption, _ in pairs], torch.stack([frames for _, frames in pairs])
