"""Cache keys: what a stage output's directory name is a hash of.

``key = sha256(canonical_json({stage, config, inputs, code_version}))[:16]`` where ``config`` is the
config subset the stage reads and ``inputs`` the sorted ``"<input name>:<input identity>"`` of its input
artifacts (:func:`input_identity`: the input's key, plus its instance after a forced rerun).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from astrolabe.artifacts.manifest import Manifest
from astrolabe.artifacts.stage import StageModule
from astrolabe.config import RunConfig

KEY_LENGTH = 16  # hex characters of sha256 kept in a cache key (64 bits)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, BaseModel):
        return obj.model_dump(mode="json")
    if isinstance(obj, Path):
        return obj.as_posix()
    if isinstance(obj, Enum):
        return obj.value
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if hasattr(obj, "tolist"):  # numpy scalars and arrays
        return obj.tolist()
    raise TypeError(f"cannot put a {type(obj).__name__} into a cache key; use plain JSON values")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted dict keys, no whitespace, tuples as lists, models / paths as JSON."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=_json_default)


def cache_key(stage: str, config_subset: dict[str, Any], input_keys: Sequence[str], code_version: str) -> str:
    """Content key of a stage output.

    ``sha256(canonical_json({"stage", "config", "inputs", "code_version"})).hexdigest()[:16]``.
    Insensitive to dict key order; sensitive to the order of ``input_keys`` (inputs are positional).
    """
    payload = {
        "stage": stage,
        "config": config_subset,
        "inputs": list(input_keys),
        "code_version": code_version,
    }
    return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()[:KEY_LENGTH]


def input_identity(manifest: Manifest) -> str:
    """What a consumer's key depends on: the input's key, and its instance after a forced rerun.

    Stages are deterministic, so a normal (re)computation of the same key is the same artifact and keeps
    its consumers valid (keys are then equal across run directories); ``--force`` is the user saying
    "redo this", so it publishes a new instance and everything made from the old one is stale.
    """
    return f"{manifest.key}@{manifest.instance}" if manifest.instance else manifest.key


def key_from_identities(stage: StageModule, cfg: RunConfig, identities: Mapping[str, str]) -> str:
    """The cache key of ``stage`` given ``{input name: input_identity}``."""
    subset = stage.STAGE.config_subset(cfg)
    return cache_key(stage.STAGE.name, subset, [f"{n}:{i}" for n, i in sorted(identities.items())],
                     stage.STAGE.code_version)


def stage_key(stage: StageModule, cfg: RunConfig, inputs: Mapping[str, Path]) -> tuple[str, dict[str, str]]:
    """The cache key of ``stage`` given its (complete) input directories, and the input identities by name."""
    identities = {name: input_identity(Manifest.load(path)) for name, path in sorted(inputs.items())}
    return key_from_identities(stage, cfg, identities), identities
