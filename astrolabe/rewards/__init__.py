"""Rewards: the reward contract and registry (:mod:`.base`) and the weight-free rewards (:mod:`.signal`).

Importing this package registers the weight-free rewards (``motion``, ``smoothness``, ``sharpness``,
``colorfulness``, ``text_color_match``) and, if the package ``astrolabe.rewards.models`` exists,
imports it so that it can register model rewards *lazily* by dotted path (its ``__init__`` must stay
light: only ``register_reward("name", "astrolabe.rewards.models.<module>:build")`` calls).

The public names are exactly ``base.__all__`` (the contract, registry and combination) plus ``signal``.
"""

from __future__ import annotations

import importlib
import importlib.util

from astrolabe.rewards import base, signal
from astrolabe.rewards.base import *  # noqa: F403 - this package re-exports base's public API (base.__all__)

if importlib.util.find_spec("astrolabe.rewards.models") is not None:
    importlib.import_module("astrolabe.rewards.models")

__all__ = ["signal"]
__all__ += base.__all__
