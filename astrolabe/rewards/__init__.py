"""Rewards: the contract, the registry, the reward set, the combination, weight-free and model rewards.

=====================  =====================================================================
module                 job
=====================  =====================================================================
:mod:`.contract`       the :class:`Reward` protocol, :class:`RewardOutput` (NaN semantics), :func:`score_all`
:mod:`.video`          input validation and the shared :class:`VideoBatch` views
:mod:`.spec`           :class:`RewardSpec` / :class:`RewardsConfig` (the run's reward set)
:mod:`.registry`       names -> rewards (eager decorator or lazy dotted path)
:mod:`.combine`        per-reward normalisation and the weighted sum
:mod:`.signal`         weight-free rewards (``motion``, ``smoothness``, ``sharpness``, ...)
:mod:`.models`         model rewards (HPSv2.1, HPSv3, VideoReward), registered lazily
=====================  =====================================================================

The import arrow inside the package is ``spec, video -> contract -> registry -> signal, models``;
``combine`` needs only ``spec``. No module imports one that imports it back (tested).

Importing this package registers the weight-free rewards, registers the world's rewards
(``world_alignment``, ``world_alignment_late``, ``world_quality``, ``world_motion`` in
:mod:`astrolabe.world.rewards`) lazily, and imports ``astrolabe.rewards.models``, whose light ``__init__``
registers the model rewards lazily by dotted path (no torch model code runs until a model reward is built).
Benchmarks live in :mod:`astrolabe.bench.rewards`.
"""

from __future__ import annotations

from astrolabe.rewards import models, signal
from astrolabe.rewards.combine import Normalization, combine_rewards, normalize_column
from astrolabe.rewards.contract import Reward, RewardOptions, RewardOutput, score_all
from astrolabe.rewards.registry import build_reward, build_rewards, register_reward, registered_rewards
from astrolabe.rewards.spec import RewardSpec, RewardsConfig
from astrolabe.rewards.video import VideoBatch, as_video_array, check_prompts, sample_frame_indices

# The procedural world's verifiable rewards (astrolabe/world/), lazily: building one imports the world.
register_reward("world_alignment", "astrolabe.world.rewards:WorldAlignmentReward")
register_reward("world_alignment_late", "astrolabe.world.rewards:WorldAlignmentLateReward")
register_reward("world_quality", "astrolabe.world.rewards:WorldQualityReward")
register_reward("world_motion", "astrolabe.world.rewards:WorldMotionReward")

__all__ = [
    "Normalization",
    "Reward",
    "RewardOptions",
    "RewardOutput",
    "RewardSpec",
    "RewardsConfig",
    "VideoBatch",
    "as_video_array",
    "build_reward",
    "build_rewards",
    "check_prompts",
    "combine_rewards",
    "models",
    "normalize_column",
    "register_reward",
    "registered_rewards",
    "sample_frame_indices",
    "score_all",
    "signal",
]
