"""The reward set of a run: :class:`RewardSpec` (one reward: name, weight, options) and :class:`RewardsConfig`.

Plain typed configs (pydantic, frozen, unknown keys are errors); the run config composes
:class:`RewardsConfig`. A spec's ``options`` are validated by the reward's own ``Options`` class when
the reward is built (:func:`astrolabe.rewards.registry.build_reward`).
"""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, field_validator, model_validator

from astrolabe.configbase import Frozen

__all__ = ["RewardSpec", "RewardsConfig"]


class RewardSpec(Frozen):
    """One reward of a reward set: registry ``name``, ``weight`` in the combined reward, ``options``.

    ``options`` is validated by the reward's own ``Options`` class when the reward is built
    (:func:`build_reward`); an unknown option is an error there.
    """

    name: str = Field(min_length=1, description="Registered reward name, e.g. 'motion' or 'hpsv2'.")
    weight: float = Field(1.0, description="Weight in the combined reward; 0 = computed and logged only.")
    options: dict[str, Any] = Field(default_factory=dict, description="Reward-specific options.")

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"reward weight must be a finite number, got {value}")
        return value


class RewardsConfig(Frozen):
    """The reward set of a run: which rewards, their weights/options, normalization and batch size."""

    rewards: tuple[RewardSpec, ...] = Field(
        default=(
            RewardSpec(name="motion", weight=1.0),
            RewardSpec(name="smoothness", weight=1.0),
            RewardSpec(name="text_color_match", weight=1.0),
        ),
        description="Rewards to compute; the combined reward is sum(weight * normalized score), normalized as "
        "rl.advantage.normalize_rewards says.",
    )
    batch_size: int = Field(8, ge=1, description="Videos per scoring call.")

    @model_validator(mode="after")
    def _check_set(self) -> RewardsConfig:
        if not self.rewards:
            raise ValueError("rewards must list at least one RewardSpec, e.g. [{name: motion, weight: 1.0}]")
        names = [spec.name for spec in self.rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"reward names must be unique, duplicated: {duplicates}")
        if all(spec.weight == 0 for spec in self.rewards):
            raise ValueError("at least one reward needs a non-zero weight, all weights are 0")
        return self


