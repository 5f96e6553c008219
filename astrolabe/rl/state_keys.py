"""Validation of saved component state (``load_state_dict`` of the resumable RL components)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["check_state_keys"]


def check_state_keys(owner: str, state: Mapping[str, Any], keys: Sequence[str]) -> None:
    """Raise KeyError unless ``state`` has exactly ``keys``: a missing piece on resume is an error.

    ``owner`` names the component (e.g. ``"FractionController"``); the message lists the missing and
    unexpected keys and says to resume from a checkpoint written by ``<owner>.state_dict()``.
    """
    missing = [k for k in keys if k not in state]
    extra = sorted(set(state) - set(keys))
    if missing or extra:
        raise KeyError(
            f"{owner} state is incomplete or foreign (missing {missing}, unexpected {extra}); "
            f"resume from a checkpoint written by {owner}.state_dict()"
        )
