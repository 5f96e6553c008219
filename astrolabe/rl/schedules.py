"""Schedules of the auxiliary policies: old (sampling) policy decay, EMA decay, KL-reference refresh.

Clocks. The old-policy decay and the reference's age count **iterations** (training phases), as the
release counts epochs: the release takes exactly one optimizer step per epoch (reference 2.5), so its
``global_step`` is the epoch count, and its schedules were tuned in those units. Counting optimizer steps
instead would run them ``steps per iteration`` times faster (e.g. the 0.5 cap after 500 / 16 iterations
at 16 steps per iteration). The EMA is a per-optimizer-step average and keeps counting steps.

Old policy. After training phase ``k`` (0-based) ``theta_old <- d * theta_old + (1 - d) * theta`` with
``d = old_policy_decay(n, kind)``, ``n = k + 1`` iterations completed (the release's ``global_step`` after its
increment; DiffusionNFT's ``return_decay``)::

    "none":            d = 0                                   (type 0: old = latest policy)
    "release_linear":  d = min(0.001 * n, 0.5)                 (type 1: the Astrolabe release)
    "flat_then_ramp":  d = 0 if n < 75 else min(0.0075 * (n - 75), 0.999)   (type 2)

EMA. ``ema_decay(step) = min((1 + step) / (10 + step), max_decay)`` per optimizer step (the release:
max_decay 0.9, so about 0.9 after 80 steps).

Dynamic KL reference (GARDO, reference 5.2(A) and 10.9). The reference snapshot is refreshed at the
start of iteration ``n`` (= after ``n`` completed iterations; the release's ``epoch``) when the last measured
KL exceeds ``threshold`` or when it is older than ``max_age_iterations``. On each refresh, with ``age`` =
iterations since the previous one, the threshold may adapt:

- ``"release"`` (bug kept for reproduction): ``age > max_age``: ``thr = max(thr - threshold_step, 0.1)``;
  ``age < quick_refresh_iterations``: ``thr = min(thr + threshold_step, 0.05)``. The second rule is meant to *raise*
  the threshold but its cap 0.05 lies below the floor 0.1, so one quick refresh drops it to 0.05.
- ``"fixed"``: the same rules with consistent bounds ``(lo, hi) = threshold_bounds``: slow refresh
  lowers the threshold toward ``lo`` (the KL never reached it: be stricter), quick refresh raises it
  toward ``hi`` (refreshing too often: be more tolerant).
- ``"off"``: the threshold never changes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
from pydantic import Field, model_validator

from astrolabe.configbase import Frozen
from astrolabe.rl.state_keys import check_state_keys

logger = logging.getLogger(__name__)

OldPolicyDecayKind = Literal["none", "release_linear", "flat_then_ramp"]

# (flat iterations, rate per iteration, cap) of DiffusionNFT's decay types 0, 1, 2.
_DECAY_TABLE: dict[str, tuple[int, float, float]] = {
    "none": (0, 0.0, 0.0),
    "release_linear": (0, 0.001, 0.5),
    "flat_then_ramp": (75, 0.0075, 0.999),
}

RELEASE_THRESHOLD_FLOOR = 0.1  # max(thr - 0.01, 0.1) in the release
RELEASE_THRESHOLD_CAP = 0.05  # min(thr + 0.01, 0.05) in the release (the bug of reference 10.9)


def old_policy_decay(iterations: int, kind: OldPolicyDecayKind) -> float:
    """Decay ``d`` of the old-policy update after ``iterations`` completed iterations (module docstring)."""
    if kind not in _DECAY_TABLE:
        raise ValueError(f"unknown old-policy decay {kind!r}: use one of {sorted(_DECAY_TABLE)}")
    if iterations < 0:
        raise ValueError(f"iterations={iterations} must be >= 0")
    flat, rate, cap = _DECAY_TABLE[kind]
    if iterations < flat:
        return 0.0
    return min((iterations - flat) * rate, cap)


def ema_decay(step: int, max_decay: float = 0.9) -> float:
    """EMA decay with warm-up: ``min((1 + step) / (10 + step), max_decay)``."""
    if step < 0:
        raise ValueError(f"step={step} must be >= 0")
    if not 0.0 <= max_decay < 1.0:
        raise ValueError(f"max_decay={max_decay} must lie in [0, 1)")
    return min((1.0 + step) / (10.0 + step), max_decay)


@torch.no_grad()
def blend_into_(target: Iterable[torch.Tensor], source: Iterable[torch.Tensor], decay: float) -> None:
    """In place ``target <- decay * target + (1 - decay) * source`` (float32 arithmetic, cast back).

    Used for the old policy (``decay = old_policy_decay``) and the EMA (``decay = ema_decay``).
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay={decay} must lie in [0, 1]")
    targets, sources = list(target), list(source)
    if len(targets) != len(sources):
        raise ValueError(f"target has {len(targets)} tensors, source has {len(sources)}")
    for t, s in zip(targets, sources, strict=True):
        if t.shape != s.shape:
            raise ValueError(f"shape mismatch {tuple(t.shape)} vs {tuple(s.shape)}")
        t.copy_(t.float().lerp_(s.to(device=t.device, dtype=torch.float32), 1.0 - decay))


class PolicyAveragingConfig(Frozen):
    """Old-policy decay schedule and EMA of the trained adapter."""

    old_policy_decay: OldPolicyDecayKind = Field(
        "release_linear",
        description="Old-policy decay schedule over completed iterations: 'release_linear' (min(0.001 n, 0.5)), "
        "'none' or 'flat_then_ramp'.",
    )
    ema: bool = Field(True, description="Keep an EMA of the trained adapter (the release saves the EMA).")
    ema_max_decay: float = Field(0.9, ge=0.0, lt=1.0, description="Cap of the EMA decay (release: 0.9).")


# ----------------------------------------------------------------------------------- reference refresh


class ReferenceRefreshConfig(Frozen):
    """Dynamic KL-reference refresh (module docstring)."""

    threshold: float = Field(0.15, gt=0.0, description="Initial KL threshold that triggers a refresh.")
    max_age_iterations: int = Field(15, ge=1, description="Refresh when the reference is older than this (iterations).")
    threshold_adaptation: Literal["off", "fixed", "release"] = Field(
        "fixed", description="'fixed' = consistent bounds; 'release' = the 0.05 cap bug (reference 10.9)."
    )
    threshold_step: float = Field(0.01, ge=0.0, description="Threshold change per adaptation.")
    quick_refresh_iterations: int = Field(
        5, ge=1, description="A refresh younger than this (iterations) raises the threshold."
    )
    threshold_bounds: tuple[float, float] = Field((0.1, 0.2), description="(lo, hi) for threshold_adaptation='fixed'.")

    @model_validator(mode="after")
    def _check(self) -> ReferenceRefreshConfig:
        lo, hi = self.threshold_bounds
        if not 0.0 < lo <= hi:
            raise ValueError(f"threshold_bounds={self.threshold_bounds} must satisfy 0 < lo <= hi")
        if self.threshold_adaptation == "fixed" and not lo <= self.threshold <= hi:
            raise ValueError(f"threshold={self.threshold} must lie within threshold_bounds {self.threshold_bounds}")
        if self.quick_refresh_iterations > self.max_age_iterations:
            raise ValueError("quick_refresh_iterations must be <= max_age_iterations")
        return self


def adapt_threshold(threshold: float, age: int, cfg: ReferenceRefreshConfig) -> float:
    """The threshold after a refresh of a reference that was ``age`` iterations old."""
    mode = cfg.threshold_adaptation
    if mode == "off":
        return threshold
    lo, hi = (RELEASE_THRESHOLD_FLOOR, RELEASE_THRESHOLD_CAP) if mode == "release" else cfg.threshold_bounds
    if age > cfg.max_age_iterations:
        return max(threshold - cfg.threshold_step, lo)
    if age < cfg.quick_refresh_iterations:
        return min(threshold + cfg.threshold_step, hi)
    return threshold


class ReferenceRefresher:
    """Decides when the KL reference snapshot is reset to the current policy.

    The reference is created at iteration ``start`` (a copy of the policy). Call ``should_refresh(n, kl)``
    at the start of iteration ``n`` (= after ``n`` completed iterations, the release's ``epoch``) with the
    last measured (all-reduced) KL, or None; when it returns True, copy the policy into the reference and
    call ``mark_refreshed(n)``. Never refreshes at or before the iteration of the last refresh. A NaN KL
    never triggers.
    """

    _KEYS = ("threshold", "last_refresh_iteration", "n_refreshes")

    def __init__(self, cfg: ReferenceRefreshConfig, start: int = 0) -> None:
        self.cfg = cfg
        self.threshold: float = cfg.threshold
        self.last_refresh_iteration: int = start
        self.n_refreshes: int = 0

    def should_refresh(self, iteration: int, kl_value: float | None) -> bool:
        if iteration <= self.last_refresh_iteration:
            return False
        too_old = iteration - self.last_refresh_iteration > self.cfg.max_age_iterations
        drifted = kl_value is not None and not math.isnan(kl_value) and kl_value > self.threshold
        return too_old or drifted

    def mark_refreshed(self, iteration: int) -> None:
        if iteration < self.last_refresh_iteration:
            raise ValueError(f"iteration={iteration} is before the last refresh at {self.last_refresh_iteration}")
        age = iteration - self.last_refresh_iteration
        new = adapt_threshold(self.threshold, age, self.cfg)
        logger.info(
            "KL reference refreshed at iteration %d (age %d); threshold %.4f -> %.4f",
            iteration, age, self.threshold, new,
        )
        self.threshold = new
        self.last_refresh_iteration = iteration
        self.n_refreshes += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "last_refresh_iteration": self.last_refresh_iteration,
            "n_refreshes": self.n_refreshes,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        check_state_keys("ReferenceRefresher", state, self._KEYS)
        self.threshold = float(state["threshold"])
        self.last_refresh_iteration = int(state["last_refresh_iteration"])
        self.n_refreshes = int(state["n_refreshes"])
