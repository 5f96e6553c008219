"""WebDataset rollout shards: size-bounded ``.tar`` files of per-sample records.

One record per generated candidate, stored as tar members ``<key>.<name>``:

* ``latents.npy``   float32 or float16 array (clean latents of the candidate's clip window)
* ``meta.json``     JSON object: prompt, group id, candidate index, window start/end, seeds, ...
* ``video.mp4``     optional mp4 bytes (stored and returned raw)
* ``<name>.npy``    optional extra arrays passed by name

Shards are named ``{prefix}-r{rank:03d}-{i:06d}.tar``, so every rank of a distributed rollout writes
its own files and a sorted listing is rank-major, then shard order. Each shard is written under a
hidden temporary name and renamed when it is complete, so a listing never shows a half shard.
The files are plain WebDataset tars: ``webdataset.WebDataset(paths, shardshuffle=False)`` reads them.

Reading (:func:`read_rollout_shards`) uses :mod:`tarfile` directly so that a truncated or corrupt
shard raises :class:`CorruptShardError` naming the file, including a tar cut exactly at a member
boundary (detected by the missing end-of-archive block).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from astrolabe.configbase import Frozen
from astrolabe.artifacts.atomic import AtomicWriter, close_quietly, publish_file

log = logging.getLogger(__name__)

LATENTS = "latents"
META = "meta"
VIDEO = "video"
RESERVED_FIELDS = frozenset({LATENTS, META, VIDEO})
LATENT_DTYPES = (np.dtype(np.float32), np.dtype(np.float16))
_KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")  # no '.', webdataset splits member names at the first dot
_NAME_RE = re.compile(r"^[a-z0-9_]+$")
_PREFIX_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_TAR_BLOCK = 512


class CorruptShardError(RuntimeError):
    """A shard file is truncated or unreadable."""


class ShardWriterConfig(Frozen):
    """Bounds of one rollout shard; a shard is closed when either bound is reached."""

    max_samples_per_shard: int = Field(256, ge=1, description="records per shard before starting a new one")
    max_bytes_per_shard: int = Field(
        1_000_000_000,
        ge=1024,
        description="payload bytes per shard before starting a new one (one record may overshoot it)",
    )


def shard_name(prefix: str, rank: int, index: int) -> str:
    """``{prefix}-r{rank:03d}-{index:06d}.tar``."""
    return f"{prefix}-r{rank:03d}-{index:06d}.tar"


def list_shards(directory: str | os.PathLike[str], prefix: str | None = None) -> list[Path]:
    """Complete shards in ``directory`` (hidden temporaries excluded), sorted by name (rank, then index)."""
    pattern = f"{prefix}-r*.tar" if prefix else "*.tar"
    return sorted(p for p in Path(directory).glob(pattern) if not p.name.startswith("."))


# ----------------------------------------------------------------------------------------------
# encoding


def _npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def _json_bytes(obj: Mapping[str, Any], key: str) -> bytes:
    try:
        return json.dumps(obj, sort_keys=True, ensure_ascii=False).encode("utf-8")
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"record {key!r}: meta is not JSON-serialisable ({e}); convert tensors / numpy scalars to "
            "Python numbers or lists first"
        ) from e


def _check_latents(key: str, latents: Any) -> np.ndarray:
    if not isinstance(latents, np.ndarray):
        raise TypeError(
            f"record {key!r}: latents must be a numpy array, got {type(latents).__name__}; "
            "use tensor.detach().float().cpu().numpy()"
        )
    if latents.dtype not in LATENT_DTYPES:
        raise TypeError(
            f"record {key!r}: latents dtype {latents.dtype} is not float32/float16 "
            "(bfloat16 has no numpy form: convert with tensor.float() first)"
        )
    return latents


def encode_record(
    key: str,
    latents: np.ndarray,
    meta: Mapping[str, Any],
    video_mp4: bytes | None = None,
    extras: Mapping[str, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Validate and encode one record to the ``{"__key__": ..., "<name>.<ext>": bytes}`` form of webdataset."""
    if not _KEY_RE.match(key):
        raise ValueError(f"record key {key!r} may only contain letters, digits, '_' and '-' (no dots or slashes)")
    if not isinstance(meta, Mapping):
        raise TypeError(f"record {key!r}: meta must be a dict, got {type(meta).__name__}")
    sample: dict[str, Any] = {
        "__key__": key,
        f"{LATENTS}.npy": _npy_bytes(_check_latents(key, latents)),
        f"{META}.json": _json_bytes(meta, key),
    }
    if video_mp4 is not None:
        if not isinstance(video_mp4, (bytes, bytearray)):
            raise TypeError(f"record {key!r}: video_mp4 must be bytes (see astrolabe.data.video.encode_mp4)")
        sample[f"{VIDEO}.mp4"] = bytes(video_mp4)
    for name, arr in (extras or {}).items():
        if not _NAME_RE.match(name) or name in RESERVED_FIELDS:
            raise ValueError(
                f"record {key!r}: extra array name {name!r} must match [a-z0-9_]+ and not be one of "
                f"{sorted(RESERVED_FIELDS)}"
            )
        if not isinstance(arr, np.ndarray) or arr.dtype == object:
            raise TypeError(f"record {key!r}: extra {name!r} must be a numeric numpy array")
        sample[f"{name}.npy"] = _npy_bytes(arr)
    return sample


# ----------------------------------------------------------------------------------------------
# writing


class RolloutShardWriter(AtomicWriter):
    """Write rollout records into size-bounded shards ``{prefix}-r{rank:03d}-{i:06d}.tar`` in ``out_dir``.

    ::

        with RolloutShardWriter(out_dir, "rollout", rank=rank, config=cfg) as w:
            w.write(key, latents, meta, video_mp4=mp4, extras={"noise": eps})
        w.paths  # completed shards, in order

    Shards are written as ``.<name>.tmp-<pid>`` and renamed after they are closed and fsynced.
    An exception inside the ``with`` block removes the shard being written; completed shards stay.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        prefix: str,
        rank: int = 0,
        config: ShardWriterConfig | None = None,
    ) -> None:
        import webdataset as wds

        if not _PREFIX_RE.match(prefix):
            raise ValueError(f"shard prefix {prefix!r} may only contain letters, digits, '_' and '-'")
        if not 0 <= rank <= 999:
            raise ValueError(f"rank must be in [0, 999], got {rank}")
        self.config = config or ShardWriterConfig()
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prefix, self.rank = prefix, rank
        self.paths: list[Path] = []
        self.n_records = 0
        self._keys: set[str] = set()
        tmp_pattern = str(self.out_dir / f".{prefix}-r{rank:03d}-%06d.tar.tmp-{os.getpid()}")
        self._writer = wds.ShardWriter(
            tmp_pattern,
            maxcount=self.config.max_samples_per_shard,
            maxsize=self.config.max_bytes_per_shard,
            post=self._on_shard_closed,
            verbose=0,
            encoder=False,
            mtime=0.0,  # reproducible tar bytes
        )
        self._closed = False

    def _final_path(self, tmp_name: str) -> Path:
        index = int(Path(tmp_name).name.split("-")[-2].split(".")[0])  # ".{prefix}-rRRR-IIIIII.tar.tmp-PID"
        return self.out_dir / shard_name(self.prefix, self.rank, index)

    def _on_shard_closed(self, tmp_name: str) -> None:
        tmp = Path(tmp_name)
        if self._writer.count == 0:  # a shard with no records (nothing written after the last rollover)
            tmp.unlink(missing_ok=True)
            return
        final = self._final_path(tmp_name)
        publish_file(tmp, final)
        self.paths.append(final)
        log.debug("closed shard %s (%d records)", final, self._writer.count)

    def write(
        self,
        key: str,
        latents: np.ndarray,
        meta: Mapping[str, Any],
        video_mp4: bytes | None = None,
        extras: Mapping[str, np.ndarray] | None = None,
    ) -> None:
        """Append one record. ``key`` must be unique (within this writer) and match ``[A-Za-z0-9_-]+``."""
        if self._closed:
            raise RuntimeError("RolloutShardWriter is closed")
        if key in self._keys:
            raise ValueError(f"duplicate record key {key!r}; keys must be unique (e.g. '<group>-<candidate>')")
        self._writer.write(encode_record(key, latents, meta, video_mp4=video_mp4, extras=extras))
        self._keys.add(key)
        self.n_records += 1

    def close(self) -> list[Path]:
        """Finish the last shard; returns all shard paths written, in order."""
        if not self._closed:
            self._closed = True
            self._writer.close()
        return list(self.paths)

    def abort(self) -> None:
        """Stop writing and remove the shard in progress (completed shards are kept)."""
        if self._closed:
            return
        self._closed = True
        stream = self._writer.tarstream
        tmp = self._writer.fname
        if stream is not None:
            close_quietly(stream, "an aborted shard")
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# reading


def _split_member(path: Path, name: str) -> tuple[str, str]:
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        raise CorruptShardError(f"{path}: member {name!r} has no '<key>.<field>' form; not a rollout shard")
    key, field = base.split(".", 1)
    return key, field


def _iter_members(path: Path, read_data: bool) -> Iterator[tuple[str, str, bytes | None]]:
    """Yield ``(key, field, data)`` for each member; raises CorruptShardError on truncation / damage."""
    try:
        with tarfile.open(path, mode="r:") as tf:
            for member in tf:
                if not member.isfile():
                    continue
                key, field = _split_member(path, member.name)
                data = None
                if read_data:
                    fobj = tf.extractfile(member)
                    assert fobj is not None
                    data = fobj.read()
                yield key, field, data
            end = tf.offset  # where the tar reader stopped: must be the end-of-archive block
        with open(path, "rb") as f:
            f.seek(end)
            block = f.read(_TAR_BLOCK)
        if len(block) < _TAR_BLOCK or block.count(0) != _TAR_BLOCK:
            raise CorruptShardError(
                f"{path}: truncated shard (no end-of-archive marker at byte {end}); "
                "the writer was interrupted or the copy is incomplete: delete it and rerun the rollout stage"
            )
    except CorruptShardError:
        raise
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptShardError(
            f"{path}: corrupt or truncated shard ({type(e).__name__}: {e}); delete it and rerun the rollout stage"
        ) from e


def _group_records(path: Path, read_data: bool) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """Group consecutive members with the same key into records."""
    current: str | None = None
    fields: dict[str, bytes | None] = {}
    seen: set[str] = set()
    for key, field, data in _iter_members(path, read_data):
        if key != current:
            if current is not None:
                yield current, fields
            if key in seen:
                raise CorruptShardError(f"{path}: members of record {key!r} are not contiguous")
            seen.add(key)
            current, fields = key, {}
        fields[field] = data
    if current is not None:
        yield current, fields


def _check_complete(path: Path, key: str, fields: Mapping[str, Any]) -> None:
    missing = [f for f in (f"{LATENTS}.npy", f"{META}.json") if f not in fields]
    if missing:
        raise CorruptShardError(f"{path}: record {key!r} lacks {missing}; the shard is damaged")


def _decode_record(path: Path, key: str, fields: Mapping[str, bytes | None]) -> dict[str, Any]:
    _check_complete(path, key, fields)
    record: dict[str, Any] = {"__key__": key, "__shard__": str(path), VIDEO: None}
    for field, data in fields.items():
        assert data is not None
        name, _, ext = field.partition(".")
        try:
            if ext == "npy":
                record[name] = np.load(io.BytesIO(data), allow_pickle=False)
            elif ext == "json":
                record[name] = json.loads(data.decode("utf-8"))
            else:
                record[name] = data  # video.mp4 and anything else: raw bytes
        except (ValueError, UnicodeDecodeError, OSError) as e:
            raise CorruptShardError(f"{path}: record {key!r} field {field!r} cannot be decoded ({e})") from e
    return record


def read_rollout_shards(paths: Sequence[str | os.PathLike[str]]) -> Iterator[dict[str, Any]]:
    """Iterate records of ``paths`` in the given order (and tar order inside each shard).

    Each record is ``{"__key__": str, "__shard__": str, "latents": ndarray, "meta": dict,
    "video": bytes | None, <extra name>: ndarray, ...}``.
    """
    for p in paths:
        path = Path(p)
        for key, fields in _group_records(path, read_data=True):
            yield _decode_record(path, key, fields)


def index_shards(paths: Sequence[str | os.PathLike[str]]) -> list[str]:
    """Record keys of ``paths`` in read order, reading tar headers only. Duplicate keys are an error."""
    keys: list[str] = []
    where: dict[str, Path] = {}
    for p in paths:
        path = Path(p)
        for key, fields in _group_records(path, read_data=False):
            _check_complete(path, key, fields)
            if key in where:
                raise ValueError(f"record key {key!r} appears in both {where[key]} and {path}; keys must be unique")
            where[key] = path
            keys.append(key)
    return keys
