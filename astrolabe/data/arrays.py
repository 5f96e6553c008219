"""zarr v3 column stores for per-record rewards and labels, aligned to rollout shard records.

Layout of ``<name>.zarr``::

    zarr.json          group attributes: {"astrolabe": {"columns": [...order...], "n": N}, "attrs": {...user...}}
    _keys/             (N,) str     record keys, in shard read order (see shards.index_shards)
    <column>/          (N,) float32 one per reward / label; NaN marks a failed or missing value

Every write goes to a hidden sibling directory published by :func:`astrolabe.artifacts.atomic.atomic_dir`,
so a crash never leaves a half store under the final name. :func:`add_columns` (rescoring) rewrites the store
with the old columns plus the new ones and swaps it in: the old store is moved aside, the new one
renamed into place, then the old one deleted (if the process dies between the two renames, the old
store survives as ``.<name>.old-<pid>``).
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astrolabe.artifacts.atomic import atomic_dir

log = logging.getLogger(__name__)

KEYS_ARRAY = "_keys"
_META = "astrolabe"
_USER = "attrs"
_COLUMN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CHUNK = 65536


class KeyAlignmentError(ValueError):
    """The keys of a column store do not match the shard records they are meant to annotate."""


def _check_column(name: str, values: Any, n: int) -> np.ndarray:
    if not _COLUMN_RE.match(name) or name == KEYS_ARRAY:
        raise ValueError(
            f"column name {name!r} must match [A-Za-z0-9][A-Za-z0-9_.-]* (no '/': use e.g. 'hpsv2.mean' "
            "or 'hpsv2_mean')"
        )
    arr = np.asarray(values)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise TypeError(f"column {name!r} must be numeric (stored as float32), got dtype {arr.dtype}")
    if np.iscomplexobj(arr):
        raise TypeError(f"column {name!r} is complex; store real and imaginary parts as two columns")
    if arr.shape != (n,):
        raise ValueError(f"column {name!r} has shape {arr.shape}, expected ({n},) to match the {n} keys")
    return arr.astype(np.float32)


def _check_keys(keys: Sequence[str]) -> list[str]:
    keys = [str(k) for k in keys]
    seen: set[str] = set()
    for k in keys:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}; each record key must appear once")
        seen.add(k)
    return keys


def _write_store(path: Path, keys: list[str], columns: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> None:
    import zarr

    n = len(keys)
    chunks = (max(1, min(n, _CHUNK)),)
    root = zarr.open_group(str(path), mode="w")
    k = root.create_array(KEYS_ARRAY, shape=(n,), chunks=chunks, dtype=str)
    if n:
        k[:] = np.asarray(keys, dtype=str)
    for name, values in columns.items():
        a = root.create_array(name, shape=(n,), chunks=chunks, dtype="float32", fill_value=np.nan)
        if n:
            a[:] = values
    root.attrs.update({_META: {"columns": list(columns), "n": n}, _USER: dict(attrs)})


def _atomic_write(path: Path, keys: list[str], columns: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> None:
    with atomic_dir(path) as tmp:
        _write_store(tmp, keys, columns, attrs)


def write_columns(
    path: str | os.PathLike[str],
    keys: Sequence[str],
    columns: Mapping[str, Any],
    attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write (or replace) a column store: ``keys`` (N,) and one float32 (N,) array per column.

    Values are cast to float32 (booleans become 0/1); NaN is allowed. ``attrs`` must be JSON.
    """
    keys = _check_keys(keys)
    cols = {name: _check_column(name, v, len(keys)) for name, v in columns.items()}
    out = Path(path)
    _atomic_write(out, keys, cols, attrs or {})
    return out


def read_columns(path: str | os.PathLike[str]) -> tuple[list[str], dict[str, np.ndarray], dict[str, Any]]:
    """Read ``(keys, {column: float32 (N,)}, attrs)`` from a store written by :func:`write_columns`."""
    import zarr

    p = Path(path)
    if not (p / "zarr.json").is_file():
        raise FileNotFoundError(f"no zarr column store at {p} (missing zarr.json); was the stage that writes it run?")
    root = zarr.open_group(str(p), mode="r")
    meta = root.attrs.get(_META)
    if not isinstance(meta, dict) or "columns" not in meta:
        raise ValueError(f"{p} is a zarr group but not an astrolabe column store (no '{_META}' attribute)")
    n = int(meta["n"])
    keys = [str(k) for k in root[KEYS_ARRAY][:]] if n else []
    columns = {name: np.asarray(root[name][:], dtype=np.float32) if n else np.zeros(0, np.float32)
               for name in meta["columns"]}
    return keys, columns, dict(root.attrs.get(_USER, {}))


def add_columns(
    path: str | os.PathLike[str],
    new_columns: Mapping[str, Any],
    attrs: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Add columns to an existing store (rescoring), keeping the old ones; atomic.

    ``attrs`` are merged into the stored attributes (new values win). Replacing an existing column
    needs ``overwrite=True``.
    """
    p = Path(path)
    keys, columns, old_attrs = read_columns(p)
    clash = sorted(set(new_columns) & set(columns))
    if clash and not overwrite:
        raise ValueError(f"{p} already has columns {clash}; pass overwrite=True to replace them")
    merged = dict(columns)
    for name, v in new_columns.items():
        merged[name] = _check_column(name, v, len(keys))
    _atomic_write(p, keys, merged, {**old_attrs, **(attrs or {})})
    return p


def check_keys_aligned(keys: Sequence[str], shard_keys: Sequence[str], what: str = "column store") -> None:
    """Raise :class:`KeyAlignmentError` unless ``keys`` equals ``shard_keys`` element by element.

    ``shard_keys`` is normally ``index_shards(paths)``: row i of every column annotates record i.
    """
    if list(keys) == list(shard_keys):
        return
    if len(keys) != len(shard_keys):
        detail = f"{len(keys)} keys vs {len(shard_keys)} shard records"
    else:
        i = next(i for i, (a, b) in enumerate(zip(keys, shard_keys)) if a != b)
        detail = f"first mismatch at row {i}: {keys[i]!r} vs shard record {shard_keys[i]!r}"
    raise KeyAlignmentError(
        f"{what} does not match the rollout shards ({detail}); it was computed from other rollouts: "
        "rerun the stage that wrote it on the current shards"
    )
