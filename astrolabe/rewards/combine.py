"""Reward combination: per-reward normalisation of score columns and the weighted sum.

    R = sum_k w_k * normalize(x_k)            (B,) float32, NaN where any weighted x_k is NaN

Re-exported by :mod:`astrolabe.rewards`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import numpy as np

from astrolabe.rewards.spec import RewardSpec

__all__ = ["Normalization", "combine_rewards", "normalize_column"]

Normalization = Literal["none", "zscore", "rank"]


def normalize_column(values: np.ndarray, method: Normalization) -> np.ndarray:
    """Normalize one reward column (B,); NaN entries stay NaN and are ignored by the statistics.

    - ``none``:   x.
    - ``zscore``: (x - mean) / std over the finite entries (population std); all equal -> 0.
    - ``rank``:   (rank - 1) / (n - 1) in [0, 1] over the n finite entries, ties get their average
      rank; a single finite entry -> 0.5.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"reward column must have shape (B,), got {x.shape}")
    if method == "none":
        return x.astype(np.float32)
    finite = np.isfinite(x)
    out = np.full_like(x, np.nan)
    n = int(finite.sum())
    if n == 0:
        return out.astype(np.float32)
    v = x[finite]
    if method == "zscore":
        std = v.std()
        out[finite] = (v - v.mean()) / std if std > 0 else 0.0
    elif method == "rank":
        if n == 1:
            out[finite] = 0.5
        else:
            out[finite] = (_average_ranks(v) - 1.0) / (n - 1)
    else:
        raise ValueError(f"normalize must be one of 'none', 'zscore', 'rank', got {method!r}")
    return out.astype(np.float32)


def _average_ranks(v: np.ndarray) -> np.ndarray:
    """1-based ranks of v, ties replaced by their average rank."""
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), dtype=np.float64)
    ranks[order] = np.arange(1, len(v) + 1)
    _, inverse, counts = np.unique(v, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def combine_rewards(
    columns: Mapping[str, np.ndarray], specs: Sequence[RewardSpec], normalize: Normalization = "none"
) -> np.ndarray:
    """Combined reward ``R = sum_k w_k * normalize(x_k)`` over the specs, float32 (B,).

    The normalization statistics are taken over the B samples given (pass one group to normalize
    within a group). A NaN in any column with non-zero weight makes that sample's R NaN (the sample is
    excluded downstream); a zero-weight reward does not enter the sum at all. Columns not named in
    ``specs`` are ignored.
    """
    if not specs:
        raise ValueError("combine_rewards needs at least one RewardSpec")
    names = [spec.name for spec in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"reward specs must have distinct names, got {names}")
    missing = [n for n in names if n not in columns]
    if missing:
        raise KeyError(f"no scores for rewards {missing}; available columns: {sorted(columns)}")
    sizes = {n: np.shape(columns[n]) for n in names}
    if len(set(sizes.values())) != 1 or len(next(iter(sizes.values()))) != 1:
        raise ValueError(f"reward columns must all have the same shape (B,), got {sizes}")
    total = np.zeros(next(iter(sizes.values())), dtype=np.float64)
    for spec in specs:
        if spec.weight == 0:
            continue
        total += spec.weight * normalize_column(columns[spec.name], normalize).astype(np.float64)
    return total.astype(np.float32)