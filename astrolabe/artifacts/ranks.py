"""Rank slicing for distributed stages: each rank's deterministic share of the work and its file names.

Under ``torchrun`` every rank computes its share with :func:`rank_slice` and writes rank-named files
(:func:`rank_filename`) into the one temporary directory rank 0 created; rank 0 alone publishes.
"""

from __future__ import annotations


def rank_slice(n_items: int, rank: int, world_size: int) -> range:
    """Contiguous, balanced share of ``range(n_items)`` for ``rank``.

    With ``q, r = divmod(n_items, world_size)`` rank ``i`` gets ``q + (i < r)`` items starting at
    ``i * q + min(i, r)``; the slices of all ranks partition ``range(n_items)`` in order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    q, r = divmod(n_items, world_size)
    start = rank * q + min(rank, r)
    return range(start, start + q + (1 if rank < r else 0))


def rank_filename(stem: str, rank: int, suffix: str = "") -> str:
    """``{stem}-r{rank:03d}{suffix}``, e.g. ``rank_filename("rewards", 2, ".npy") == "rewards-r002.npy"``."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return f"{stem}-r{rank:03d}{suffix}"
