"""Selective KL: apply the KL penalty only to samples whose rewards disagree (GARDO mode, reference 5.5).

Rank disagreement. Within each scope (all samples, or each group), rank every reward in *descending*
order (rank 1 = highest reward; ties get the average of their ranks; only samples valid for the main
and every auxiliary reward are ranked). With ``a_i`` the mean of the auxiliary ranks of sample i::

    "main_under" (the release):  u_i = rank_main(i) - a_i   # u > 0: main ranks it WORSE than the aux
    "main_over":                 u_i = a_i - rank_main(i)   # u > 0: main ranks it BETTER than the aux

``main_over`` is the reward-hacking direction (the main reward over-rates the sample relative to the
others); the release uses ``main_under`` (reference 10.8: its sign is questionable, so it is a knob).
A sample with any NaN reward gets ``u = NaN`` and is never flagged.

Defaults (a decision, not the release; ``sign="main_under", scope="global"`` reproduce it):

- ``sign="main_over"``. NFT moves the policy toward high-``r`` samples, and ``r`` is driven by the main
  reward. A sample the main reward ranks *above* where the auxiliary rewards put it is the one reward
  hacking produces (e.g. HPSv3 pleased by a frozen, over-sharpened frame that VideoAlign MQ marks down), and
  the KL term ``kl_weight * mean_flagged ||f - g||^2`` is what holds the policy near the reference exactly
  there. With the release's ``main_under`` the KL lands on samples the main reward *under*-rates, which
  already get a low ``r`` (the policy is pushed away from them), so it restrains the update where there is
  nothing to hack.
- ``scope="group"``. The advantage compares a candidate with the other candidates of its group (same prompt
  and prefix); disagreement is measured on the same comparison. Global ranks mix prompts: a prompt that the
  main reward scores high across the board (prompt-dependent offsets are large for HPSv3) flags all its
  candidates, whatever they look like, and the flags then follow the prompts, not the samples.

Candidates and mask. One-sided: ``P = {u_i : u_i >= 0}``; two-sided: ``P = {|u_i|}``. With the current
fraction ``phi``, ``threshold = percentile(P, 100 - 100*phi)`` (numpy's linear interpolation, as in the
release) and ``mask_i = u_i > threshold`` (one-sided) or ``|u_i| > threshold`` (two-sided), a strict
inequality: roughly the top ``phi`` of the candidates.

Fraction controller (the release's ``RiskCompensator``), with ``m = mean(P)``: on the first update
``phi = initial``; otherwise ``phi *= up`` if ``m > max(buffer)``, ``phi *= down`` if ``m < min(buffer)``;
then ``phi = clip(phi, lo, hi)``, append ``m`` and keep the last ``buffer_size`` values. An empty ``P``
leaves the state untouched (the release would have appended a NaN).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from astrolabe.configbase import Frozen
from astrolabe.rl.advantages import ascending_average_ranks, group_index
from astrolabe.rl.state_keys import check_state_keys

logger = logging.getLogger(__name__)

Sided = Literal["one", "two"]
Sign = Literal["main_under", "main_over"]


class SelectiveKLConfig(Frozen):
    """Rank-disagreement KL mask. Rewards are named explicitly (never by position).

    Defaults: one-sided like the release, but ``sign="main_over"`` and ``scope="group"`` (the module docstring
    says why; ``sign="main_under", scope="global"`` reproduce the release, bug 10.8). The reward names have no
    default: they must match the run's reward specs.
    """

    enabled: bool = Field(True, description="Use the selective mask; off = KL on every sample.")
    main_reward: str = Field(..., min_length=1, description="Name of the main reward (release: HPSv3).")
    auxiliary_rewards: tuple[str, ...] = Field(
        ..., description="Names of the auxiliary rewards (release: VideoAlign MQ); at least one."
    )
    sided: Sided = Field("one", description="'one': only u >= 0 candidates (release); 'two': |u|.")
    sign: Sign = Field(
        "main_over",
        description="'main_over': flag samples the main reward over-rates relative to the auxiliary ones (the "
        "reward-hacking side, where NFT pushes toward); 'main_under' = the release (bug 10.8).",
    )
    scope: Literal["group", "global"] = Field(
        "group",
        description="Rank within each group (the candidates the advantage compares) or over all samples "
        "('global' = the release, which mixes prompt-level reward offsets into the ranks).",
    )
    fraction_bounds: tuple[float, float] = Field((0.02, 0.2), description="(lo, hi) clip of the flagged fraction.")
    initial_fraction: float = Field(0.1, description="Fraction at the first update.")
    buffer_size: int = Field(20, ge=1, description="How many past mean(P) values the controller keeps.")
    up_factor: float = Field(1.1, ge=1.0, description="Fraction multiplier when mean(P) exceeds the buffer max.")
    down_factor: float = Field(
        0.9, gt=0.0, le=1.0, description="Fraction multiplier when mean(P) is below the buffer min."
    )

    @model_validator(mode="after")
    def _check(self) -> SelectiveKLConfig:
        if not self.auxiliary_rewards:
            raise ValueError("auxiliary_rewards is empty: name at least one reward other than main_reward")
        if self.main_reward in self.auxiliary_rewards:
            raise ValueError(f"main_reward {self.main_reward!r} is also in auxiliary_rewards: remove it from the list")
        if len(set(self.auxiliary_rewards)) != len(self.auxiliary_rewards):
            raise ValueError(f"auxiliary_rewards has duplicates: {list(self.auxiliary_rewards)}")
        lo, hi = self.fraction_bounds
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"fraction_bounds={self.fraction_bounds} must satisfy 0 < lo <= hi <= 1")
        if not lo <= self.initial_fraction <= hi:
            raise ValueError(
                f"initial_fraction={self.initial_fraction} must lie within fraction_bounds {self.fraction_bounds}"
            )
        return self


# ----------------------------------------------------------------------------------- disagreement


def descending_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with rank 1 = largest value; ties share the average rank. ``x`` finite, 1-D."""
    return ascending_average_ranks(-np.asarray(x, dtype=np.float64))


def rank_disagreement(
    columns: Mapping[str, Any],
    main: str,
    aux: Sequence[str],
    group_ids: Sequence[Hashable] | np.ndarray | None = None,
    *,
    sign: Sign,
) -> np.ndarray:
    """``u (N,)`` float32 (module docstring); ranks within groups when ``group_ids`` is given."""
    if not aux:
        raise ValueError("aux is empty: name at least one auxiliary reward")
    names = [main, *aux]
    missing = [k for k in names if k not in columns]
    if missing:
        raise KeyError(f"rewards {missing} have no column; available: {sorted(columns)}")
    cols = np.stack([np.asarray(columns[k], dtype=np.float64) for k in names])  # (1 + n_aux, N)
    if cols.ndim != 2:
        raise ValueError("reward columns must be 1-D arrays of equal length")
    n = cols.shape[1]
    valid = np.all(np.isfinite(cols), axis=0)  # (N,)
    gid = np.zeros(n, dtype=np.int64) if group_ids is None else group_index(group_ids)[0]
    if gid.shape[0] != n:
        raise ValueError(f"group_ids has {gid.shape[0]} entries for {n} samples")
    u = np.full(n, np.nan)
    for g in np.unique(gid[valid]):
        idx = np.flatnonzero(valid & (gid == g))
        ranks = np.stack([descending_ranks(c[idx]) for c in cols])  # (1 + n_aux, n_g)
        u[idx] = ranks[0] - ranks[1:].mean(axis=0)
    if sign == "main_over":
        u = -u
    elif sign != "main_under":
        raise ValueError(f"unknown sign {sign!r}: use 'main_under' (release) or 'main_over'")
    return u.astype(np.float32)


def candidate_values(u: Any, sided: Sided) -> np.ndarray:
    """The candidate set ``P`` (float64): ``u >= 0`` (one-sided) or ``|u|`` (two-sided), NaN dropped."""
    u = np.asarray(u, dtype=np.float64)
    finite = u[np.isfinite(u)]
    if sided == "one":
        return finite[finite >= 0]
    if sided == "two":
        return np.abs(finite)
    raise ValueError(f"unknown sided {sided!r}: use 'one' or 'two'")


def select_kl_mask(u: Any, fraction: float, sided: Sided) -> tuple[np.ndarray, dict[str, float]]:
    """``mask (N,) bool``: ``u > threshold`` (``|u|`` if two-sided), threshold the (100 - 100*fraction)th
    percentile of the candidates. No candidate -> nothing flagged and a NaN threshold."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction={fraction} must lie in (0, 1]")
    u = np.asarray(u, dtype=np.float64)
    pool = candidate_values(u, sided)
    score = u if sided == "one" else np.abs(u)
    if pool.size:
        threshold = float(np.percentile(pool, 100.0 - 100.0 * fraction))
        with np.errstate(invalid="ignore"):
            mask = np.nan_to_num(score, nan=-np.inf) > threshold
    else:
        threshold = float("nan")
        mask = np.zeros(u.shape, dtype=bool)
    finite = u[np.isfinite(u)]
    info = {
        "kl/threshold": threshold,
        "kl/fraction": float(fraction),
        "kl/n_candidates": float(pool.size),
        "kl/n_flagged": float(mask.sum()),
        "kl/flagged_fraction": float(mask.mean()) if mask.size else 0.0,
        "kl/n_nan": float(u.size - finite.size),
        "kl/rank_disagreement_min": float(finite.min()) if finite.size else float("nan"),
        "kl/rank_disagreement_mean": float(finite.mean()) if finite.size else float("nan"),
        "kl/rank_disagreement_max": float(finite.max()) if finite.size else float("nan"),
    }
    return mask, info


# ----------------------------------------------------------------------------------- controller


class FractionController:
    """Adaptive flagged fraction (the release's ``RiskCompensator``); see the module docstring."""

    _KEYS = ("fraction", "buffer")

    def __init__(self, cfg: SelectiveKLConfig) -> None:
        self.cfg = cfg
        self.fraction: float = cfg.initial_fraction
        self.buffer: list[float] = []

    def update(self, values: Any) -> float:
        """Feed the candidate set ``P`` of this iteration; returns the fraction to use now."""
        p = np.asarray(values, dtype=np.float64).ravel()
        p = p[np.isfinite(p)]
        if p.size == 0:
            logger.warning("selective KL: no candidates this iteration; fraction stays %.4f", self.fraction)
            return self.fraction
        m = float(p.mean())
        if not self.buffer:
            fraction = self.cfg.initial_fraction
        elif m > max(self.buffer):
            fraction = self.fraction * self.cfg.up_factor
        elif m < min(self.buffer):
            fraction = self.fraction * self.cfg.down_factor
        else:
            fraction = self.fraction
        lo, hi = self.cfg.fraction_bounds
        self.fraction = float(min(max(fraction, lo), hi))
        self.buffer = [*self.buffer, m][-self.cfg.buffer_size :]
        return self.fraction

    def state_dict(self) -> dict[str, Any]:
        return {"fraction": self.fraction, "buffer": list(self.buffer)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state_keys("FractionController", state, self._KEYS)
        buffer = [float(v) for v in state["buffer"]]
        if len(buffer) > self.cfg.buffer_size:
            raise ValueError(f"saved buffer holds {len(buffer)} values > buffer_size={self.cfg.buffer_size}")
        self.fraction = float(state["fraction"])
        self.buffer = buffer


def compute_kl_mask(
    columns: Mapping[str, Any],
    cfg: SelectiveKLConfig,
    controller: FractionController,
    group_ids: Sequence[Hashable] | np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """One iteration: disagreement -> controller update -> mask. Returns ``(mask, u, info)``.

    ``group_ids`` is only used when ``cfg.scope == "group"`` (and is then required). With
    ``cfg.enabled = False`` every sample is flagged (plain KL) and ``u`` is NaN.
    """
    n = len(next(iter(columns.values()))) if columns else 0
    if not cfg.enabled:
        return np.ones(n, dtype=bool), np.full(n, np.nan, dtype=np.float32), {"kl/flagged_fraction": 1.0}
    if cfg.scope == "group" and group_ids is None:
        raise ValueError("scope='group' needs group_ids (same prompt and branch point); or set scope='global'")
    u = rank_disagreement(
        columns, cfg.main_reward, cfg.auxiliary_rewards, group_ids if cfg.scope == "group" else None, sign=cfg.sign
    )
    fraction = controller.update(candidate_values(u, cfg.sided))
    mask, info = select_kl_mask(u, fraction, cfg.sided)
    return mask, u, info
