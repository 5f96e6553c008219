"""Reward registry: names -> :class:`~astrolabe.rewards.contract.Reward` subclasses, builders or lazy dotted paths.

Re-exported by :mod:`astrolabe.rewards`; see the :mod:`~astrolabe.rewards.contract` module docstring for
how a reward registers itself (eagerly with the decorator, or lazily by dotted path).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from astrolabe.rewards.contract import Reward
from astrolabe.rewards.spec import RewardSpec

__all__ = ["build_reward", "build_rewards", "register_reward", "registered_rewards"]

_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")
_LAZY_TARGET_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


Builder = Callable[[Mapping[str, Any]], Reward]
_REGISTRY: dict[str, type[Reward] | Builder | str] = {}


def register_reward(name: str, target: str | None = None) -> Callable[[Any], Any] | None:
    """Register a reward under ``name``.

    - ``@register_reward("motion")`` on a :class:`Reward` subclass (whose ``name`` must equal ``name``)
      or on a builder function ``build(options: Mapping) -> Reward``;
    - ``register_reward("hpsv2", "astrolabe.rewards.models.hpsv2:build")`` registers lazily: the module
      is imported only when the reward is built (target: a Reward subclass or a builder).

    Registering a different target under a taken name is an error; re-registering the same is a no-op.
    """
    if not _NAME_RE.match(name):
        raise ValueError(f"reward names are lower_snake_case (e.g. 'video_hpsv3'), got {name!r}")
    if target is not None:
        if not _LAZY_TARGET_RE.match(target):
            raise ValueError(f"lazy reward target must look like 'package.module:attribute', got {target!r}")
        _add_entry(name, target)
        return None

    def decorator(obj: Any) -> Any:
        if isinstance(obj, type):
            if not issubclass(obj, Reward):
                raise TypeError(f"@register_reward({name!r}) decorates a Reward subclass or a builder function")
            if getattr(obj, "name", None) != name:
                raise ValueError(f"{obj.__name__}.name is {getattr(obj, 'name', None)!r} but is registered as {name!r}")
        elif not callable(obj):
            raise TypeError(f"@register_reward({name!r}) decorates a Reward subclass or a builder function")
        _add_entry(name, obj)
        return obj

    return decorator


def _entry_key(entry: Any) -> str:
    return entry if isinstance(entry, str) else f"{entry.__module__}:{entry.__qualname__}"


def _add_entry(name: str, entry: Any) -> None:
    existing = _REGISTRY.get(name)
    if existing is not None and _entry_key(existing) != _entry_key(entry):
        raise ValueError(f"reward {name!r} is already registered to {_entry_key(existing)}, not {_entry_key(entry)}")
    if existing is None or not isinstance(entry, str):  # a resolved object replaces a lazy path
        _REGISTRY[name] = entry


def registered_rewards() -> list[str]:
    """Sorted names of all registered rewards (lazy ones included)."""
    return sorted(_REGISTRY)


def _resolve(name: str, entry: Any) -> Any:
    if not isinstance(entry, str):
        return entry
    module_name, attribute = entry.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(f"reward {name!r} is registered to {entry} but its module cannot be imported: {exc}") from exc
    try:
        return getattr(module, attribute)
    except AttributeError as exc:
        raise ImportError(f"reward {name!r} is registered to {entry} but {module_name} has no {attribute!r}") from exc


def build_reward(spec: RewardSpec) -> Reward:
    """Build the reward named by ``spec`` with ``spec.options`` (the weight is not the reward's business).

    Raises:
        KeyError: unknown name (the message lists the registered names).
        ValueError: invalid options (the message lists the allowed options).
    """
    entry = _REGISTRY.get(spec.name)
    if entry is None:
        raise KeyError(f"unknown reward {spec.name!r}; registered rewards: {registered_rewards()}")
    target = _resolve(spec.name, entry)
    if isinstance(target, type) and issubclass(target, Reward):
        reward = target.from_options(spec.options)
    else:
        reward = target(dict(spec.options))
    if not isinstance(reward, Reward):
        raise TypeError(f"builder of reward {spec.name!r} returned {type(reward).__name__}, not a Reward")
    if reward.name != spec.name:
        raise ValueError(f"builder of reward {spec.name!r} returned a reward named {reward.name!r}")
    return reward


def build_rewards(specs: Sequence[RewardSpec]) -> list[Reward]:
    """Build every reward of a reward set (one instance per spec, in order)."""
    return [build_reward(spec) for spec in specs]
