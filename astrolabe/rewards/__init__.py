"""Rewards: the reward contract and registry (:mod:`.base`) and the weight-free rewards (:mod:`.signal`).

Importing this package registers the weight-free rewards (``motion``, ``smoothness``, ``sharpness``,
``colorfulness``, ``text_color_match``) and, if the package ``astrolabe.rewards.models`` exists,
imports it so that it can register model rewards *lazily* by dotted path (its ``__init__`` must stay
light: only ``register_reward("name", "astrolabe.rewards.models.<module>:build")`` calls).
"""

from __future__ import annotations

import importlib
import importlib.util

from astrolabe.rewards import signal
from astrolabe.rewards.base import (
    Normalization,
    Reward,
    RewardOptions,
    RewardOutput,
    RewardSpec,
    RewardsConfig,
    VideoBatch,
    as_video_array,
    build_reward,
    build_rewards,
    check_prompts,
    combine_rewards,
    normalize_column,
    register_reward,
    registered_rewards,
    sample_frame_indices,
    score_all,
    sha256_file,
)

if importlib.util.find_spec("astrolabe.rewards.models") is not None:
    importlib.import_module("astrolabe.rewards.models")

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
    "normalize_column",
    "register_reward",
    "registered_rewards",
    "sample_frame_indices",
    "score_all",
    "sha256_file",
    "signal",
]
