"""Rewards -> group advantages -> optimality ``r`` in [0, 1].

Pipeline (numpy, float64 inside, float32 out):

1. ``normalize_columns``: each reward column is normalised on its own over all samples (NaN-aware), so
   the weights of a multi-reward sum compare like with like. ``"zscore"``: ``(x - mean) / std``
   (population std; a constant column becomes 0). ``"rank"``: average ascending ranks of the valid
   entries mapped linearly onto [-1, 1] (ties share a rank; a single valid entry -> 0). ``"none"``:
   the raw values (the release: "avg" is an unnormalised weighted sum, reference 10.10).
2. ``combine``: ``R_i = sum_k w_k * x_{k,i}`` over the rewards with a nonzero weight; NaN when any of
   them is NaN for that sample.
3. ``group_advantages``: ``A_i = (R_i - mean_{g(i)}) / (std + eps)`` with the mean over the sample's
   group (same prompt AND same branch point; the caller builds the group ids) and the std either over
   all valid rewards (``"global"``, the release's ``global_std=True``) or over the group (``"group"``).
   NaN rewards are excluded from every statistic and get ``A = NaN``.
   Groups whose valid rewards are all equal (zero std, including groups with a single valid sample)
   get ``A = 0`` exactly: with no contrast inside the group there is no signal. Note that this differs
   from the release's K = 1 fallback, which compared every sample with the global mean.
4. ``optimality``: ``r = clip(A, -C, C) / (2C) + 0.5`` with ``C = clip`` (5 in the release), so A = 0
   maps to r = 0.5 and +-C std to r = 1 / 0. NaN stays NaN (drop such samples from training).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from astrolabe.configbase import Frozen

logger = logging.getLogger(__name__)


class AdvantageConfig(Frozen):
    """Group advantages and the optimality map. The reward weights live in the reward specs."""

    std_mode: Literal["group", "global"] = Field(
        "global", description="Std over all samples ('global', the release) or within each group ('group')."
    )
    clip: float = Field(5.0, gt=0.0, description="Advantage clip C: r = clip(A, -C, C) / (2C) + 0.5.")
    eps: float = Field(1e-4, ge=0.0, description="Added to the std before dividing (release: 1e-4).")
    normalize_rewards: Literal["zscore", "rank", "none"] = Field(
        "zscore", description="Per-reward normalisation before the weighted sum; 'none' = the release."
    )


# ----------------------------------------------------------------------------------- helpers


def _as_float64(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (N,), got shape {arr.shape}")
    return arr


def ascending_average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of a finite 1-D array in ascending order; tied values share the average of their ranks."""
    uniq, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)  # sorted ascending
    last = np.cumsum(counts).astype(np.float64)  # rank of the last member of each tie block
    avg = last - (counts - 1) / 2.0
    return avg[inverse]


def group_index(group_ids: Sequence[Hashable] | np.ndarray) -> tuple[np.ndarray, int]:
    """Dense integer ids ``(N,)`` in order of first appearance, and the number of groups.

    ``group_ids`` is any 1-D sequence of hashables (ints, strings, tuples), or a 2-D array whose rows are
    keys (e.g. ``(prompt_index, branch_index)``).
    """
    arr = np.asarray(group_ids, dtype=object) if not isinstance(group_ids, np.ndarray) else group_ids
    if arr.ndim == 2:
        keys: list[Hashable] = [tuple(row.tolist()) for row in arr]
    elif arr.ndim == 1:
        keys = [k.item() if isinstance(k, np.generic) else k for k in arr.tolist()]
    else:
        raise ValueError(f"group_ids must be 1-D (N,) or 2-D (N, k), got shape {arr.shape}")
    table: dict[Hashable, int] = {}
    dense = np.fromiter((table.setdefault(k, len(table)) for k in keys), dtype=np.int64, count=len(keys))
    return dense, len(table)


# ----------------------------------------------------------------------------------- normalisation


def _normalize_one(x: np.ndarray, mode: str) -> np.ndarray:
    out = np.full_like(x, np.nan)
    valid = np.isfinite(x)
    v = x[valid]
    if mode == "none":
        out[valid] = v
    elif mode == "zscore":
        std = v.std() if v.size else 0.0
        out[valid] = (v - v.mean()) / std if std > 0 else 0.0
    elif mode == "rank":
        n = v.size
        out[valid] = 2.0 * (ascending_average_ranks(v) - 1.0) / (n - 1) - 1.0 if n > 1 else 0.0
    else:
        raise ValueError(f"unknown normalisation {mode!r}: use 'zscore', 'rank' or 'none'")
    return out


def normalize_columns(columns: Mapping[str, Any], mode: str) -> dict[str, np.ndarray]:
    """Normalise every reward column separately (NaN-aware; NaN and inf stay NaN). Float64 ``(N,)`` each."""
    return {name: _normalize_one(_as_float64(col, f"reward column {name!r}"), mode) for name, col in columns.items()}


def combine(columns: Mapping[str, Any], weights: Mapping[str, float]) -> np.ndarray:
    """Weighted sum ``R = sum_k w_k x_k`` over rewards with nonzero weight; NaN if any used reward is NaN."""
    used = {k: float(w) for k, w in weights.items() if float(w) != 0.0}
    if not used:
        raise ValueError("all reward weights are zero: give at least one reward a nonzero weight")
    missing = sorted(set(used) - set(columns))
    if missing:
        raise KeyError(f"weighted rewards {missing} have no column; available columns: {sorted(columns)}")
    cols = {k: _as_float64(columns[k], f"reward column {k!r}") for k in used}
    lengths = {k: c.shape[0] for k, c in cols.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"reward columns differ in length: {lengths}")
    total = np.zeros(next(iter(lengths.values())), dtype=np.float64)
    for k, w in used.items():
        total += w * cols[k]  # NaN propagates
    total[~np.isfinite(total)] = np.nan
    return total


# ----------------------------------------------------------------------------------- advantages


def group_advantages(
    rewards: Any, group_ids: Sequence[Hashable] | np.ndarray, cfg: AdvantageConfig
) -> tuple[np.ndarray, dict[str, float]]:
    """Per-group-mean advantages ``(N,)`` float32 and an info dict of counts (module docstring)."""
    x = _as_float64(rewards, "rewards")  # (N,)
    gid, n_groups = group_index(group_ids)
    if gid.shape[0] != x.shape[0]:
        raise ValueError(f"rewards has {x.shape[0]} entries but group_ids has {gid.shape[0]}")
    valid = np.isfinite(x)
    xv = np.where(valid, x, 0.0)
    count = np.bincount(gid, weights=valid.astype(np.float64), minlength=n_groups)  # (G,)
    mean = np.bincount(gid, weights=xv, minlength=n_groups) / np.maximum(count, 1.0)  # (G,)
    dev = np.where(valid, x - mean[gid], 0.0)  # (N,)
    group_std = np.sqrt(np.bincount(gid, weights=dev**2, minlength=n_groups) / np.maximum(count, 1.0))  # (G,)
    # A group is "zero std" when its valid rewards are all identical (exact; singletons included).
    vmax = np.full(n_groups, -np.inf)
    vmin = np.full(n_groups, np.inf)
    np.maximum.at(vmax, gid[valid], x[valid])
    np.minimum.at(vmin, gid[valid], x[valid])
    zero_std = (count > 0) & (vmax == vmin)  # (G,)
    global_std = float(x[valid].std()) if valid.any() else 0.0
    denom = group_std[gid] if cfg.std_mode == "group" else np.full_like(x, global_std)
    adv = dev / (denom + cfg.eps) if cfg.eps > 0 else np.divide(dev, denom, out=np.zeros_like(dev), where=denom > 0)
    adv[zero_std[gid]] = 0.0
    adv[~valid] = np.nan
    populated = count > 0
    info = {
        "n_samples": float(x.shape[0]),
        "n_nan": float((~valid).sum()),
        "n_groups": float(n_groups),
        "n_small_groups": float((count < 2).sum()),
        "n_zero_std_groups": float(zero_std.sum()),
        "zero_std_ratio": float(zero_std.sum() / max(populated.sum(), 1)),
        "group_size_mean": float(count[populated].mean()) if populated.any() else 0.0,
        "reward_std_mean": float(group_std[populated].mean()) if populated.any() else 0.0,
        "global_std": global_std,
    }
    if info["n_nan"]:
        logger.warning("%d of %d rewards are NaN: their advantage is NaN", int(info["n_nan"]), x.shape[0])
    return adv.astype(np.float32), info


def optimality(adv: Any, clip: float) -> np.ndarray:
    """``r = clip(A, -C, C) / (2C) + 0.5`` in [0, 1], float32 ``(N,)``; NaN advantages stay NaN."""
    if clip <= 0:
        raise ValueError(f"clip={clip} must be > 0 (AdvantageConfig.clip, 5.0 in the release)")
    a = np.asarray(adv, dtype=np.float64)
    return (np.clip(a, -clip, clip) / (2.0 * clip) + 0.5).astype(np.float32)


def optimality_from_rewards(
    columns: Mapping[str, Any],
    weights: Mapping[str, float],
    group_ids: Sequence[Hashable] | np.ndarray,
    cfg: AdvantageConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, float]]:
    """normalise -> combine -> group advantages -> optimality. Returns ``(r, adv, combined, info)``, float32."""
    missing = sorted(k for k, w in weights.items() if float(w) != 0.0 and k not in columns)
    if missing:
        raise KeyError(f"weighted rewards {missing} have no column; available columns: {sorted(columns)}")
    normed = normalize_columns({k: columns[k] for k in weights if k in columns}, cfg.normalize_rewards)
    combined = combine(normed, weights)
    adv, info = group_advantages(combined, group_ids, cfg)
    return optimality(adv, cfg.clip), adv, combined.astype(np.float32), info
