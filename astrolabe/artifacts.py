"""Stage artifacts: content-keyed directories, manifests, atomic publish, run locks, rank slicing.

Layout (see DESIGN.md, "Artifacts, caching and resume")::

    runs/<run>/.lock                                  RunLock: one writing process per run
    runs/<run>/<stage>/<key>/                         iteration-independent stage (e.g. filter_prompts)
    runs/<run>/iter-<kkkk>/<stage>/<key>/             stage output of training iteration k (zero-padded)
    runs/<run>/iter-<kkkk>/<stage>/.<key>.tmp-<pid>/  being written by process <pid>

``key = sha256(canonical_json({stage, config, inputs, code_version}))[:16]``. A stage writes into the
temporary directory from :meth:`StageDir.begin`, then :meth:`StageDir.publish` lists every file with
size and sha256, writes ``manifest.json`` **last**, fsyncs and renames the directory into place.
So a directory under its final name always holds a complete artifact, and "manifest present,
parseable, right key" (:meth:`StageDir.is_complete`) means done: skip it. That is resume.

Distributed stages (``torchrun``): every rank computes its share with :func:`rank_slice`; rank 0
calls ``begin()`` and broadcasts the temporary path; ranks write rank-named files
(:func:`rank_filename`) into it; after a barrier rank 0 alone calls ``publish()``.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError

from astrolabe.configbase import Frozen

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
OWNER_NAME = ".owner.json"  # inside a temporary directory: who is writing it
LOCK_NAME = ".lock"
KEY_LENGTH = 16  # hex characters of sha256 kept in a cache key (64 bits)
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TMP_RE = re.compile(r"^\.(?P<key>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
_ITER_RE = re.compile(r"^iter-(\d+)$")


class ArtifactError(RuntimeError):
    """A stage artifact is missing, malformed or cannot be written."""


class ArtifactPublishError(ArtifactError):
    """Publishing failed; nothing was left under the final name."""


class ArtifactVerificationError(ArtifactError):
    """Files of a published artifact do not match its manifest."""


class RunLockedError(RuntimeError):
    """Another live process holds the run's lock."""


def _check_name(kind: str, name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"{kind} {name!r} must match [A-Za-z0-9][A-Za-z0-9_.-]* (it becomes a directory name)")
    return name


# ----------------------------------------------------------------------------------------------
# cache keys


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


# ----------------------------------------------------------------------------------------------
# manifest


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class FileEntry(Frozen):
    size: int = Field(ge=0)
    sha256: str | None = None  # None when published with hash_files=False


class Manifest(Frozen):
    """What a stage directory holds and how it was made; written last, so its presence means complete."""

    schema_version: Literal[1] = 1
    stage: str
    key: str
    iteration: int | None = None
    inputs: dict[str, str] = Field(default_factory=dict, description="input stage -> its key")
    config: dict[str, Any] = Field(default_factory=dict, description="the config subset the stage reads")
    seeds: dict[str, Any] = Field(default_factory=dict)
    files: dict[str, FileEntry] = Field(default_factory=dict, description="relative posix path -> size, sha256")
    counts: dict[str, int] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict, description="seconds")
    created: str = Field(default_factory=_now, description="UTC ISO-8601")
    instance: str = Field(
        "",
        description="'' for a normal publication; a forced rerun gets a fresh id, so what consumed the old output "
        "becomes stale (consumers' keys include it).",
    )
    rank: int = Field(0, ge=0)
    world_size: int = Field(1, ge=1)
    host: str = Field(default_factory=socket.gethostname)
    code_version: str = ""
    extra: dict[str, Any] = Field(default_factory=dict)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike[str]) -> Manifest:
        """Read ``<directory>/manifest.json``; :class:`ArtifactError` if missing or invalid."""
        path = Path(directory) / MANIFEST_NAME
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as e:
            raise ArtifactError(
                f"{path} does not exist: the stage output is missing or incomplete; rerun the stage"
            ) from e
        try:
            return cls.model_validate_json(text)
        except ValidationError as e:
            raise ArtifactError(f"{path} is not a valid manifest ({e.error_count()} errors): {e}") from e


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def list_files(directory: Path) -> list[str]:
    """Relative posix paths of all regular files under ``directory`` except the manifest and owner file."""
    out = []
    for dirpath, _, filenames in os.walk(directory):
        for name in filenames:
            rel = Path(dirpath, name).relative_to(directory).as_posix()
            if rel not in (MANIFEST_NAME, OWNER_NAME):
                out.append(rel)
    return sorted(out)


def compute_files(directory: str | os.PathLike[str], hash_files: bool = True) -> dict[str, FileEntry]:
    """``{relative path: FileEntry(size, sha256)}`` for the files of ``directory``."""
    d = Path(directory)
    return {
        rel: FileEntry(size=(d / rel).stat().st_size, sha256=sha256_file(d / rel) if hash_files else None)
        for rel in list_files(d)
    }


def verify(directory: str | os.PathLike[str], check_sha: bool = True) -> Manifest:
    """Recompute sizes (and sha256 unless ``check_sha=False``) and compare with the manifest.

    Raises :class:`ArtifactVerificationError` listing every missing, unexpected or changed file.
    """
    d = Path(directory)
    manifest = Manifest.load(d)
    present = set(list_files(d))
    listed = set(manifest.files)
    problems = [f"missing: {p}" for p in sorted(listed - present)]
    problems += [f"not in manifest: {p}" for p in sorted(present - listed)]
    for rel in sorted(listed & present):
        entry, path = manifest.files[rel], d / rel
        size = path.stat().st_size
        if size != entry.size:
            problems.append(f"size changed: {rel} ({size} bytes, manifest says {entry.size})")
        elif check_sha and entry.sha256 is not None and sha256_file(path) != entry.sha256:
            problems.append(f"checksum changed: {rel}")
    if problems:
        raise ArtifactVerificationError(
            f"{d} does not match its manifest: " + "; ".join(problems) + ". Delete the directory and rerun the stage."
        )
    return manifest


# ----------------------------------------------------------------------------------------------
# durable file system helpers (separate functions so tests can inject failures)


def _write_durable(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` and fsync it."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def fsync_path(path: Path) -> None:
    """fsync a file or directory by path."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _rename_dir(src: Path, dst: Path) -> None:
    """Atomic rename (same file system); fails if ``dst`` exists and is not empty."""
    os.rename(src, dst)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_of(tmp: Path) -> tuple[int | None, str | None]:
    """(pid, host) written by the process that created ``tmp``; (None, None) if unknown."""
    try:
        info = json.loads((tmp / OWNER_NAME).read_text(encoding="utf-8"))
        return int(info["pid"]), str(info["host"])
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def clean_stale_tmp_dirs(directory: str | os.PathLike[str]) -> list[Path]:
    """Remove ``.<key>.tmp-<pid>`` / ``.<key>.old-<pid>`` entries of ``directory`` left by dead processes.

    A directory is removed only if its writer ran on this host (from its owner file, or assumed when
    there is none) and that pid is no longer alive. Returns the removed paths.
    """
    d = Path(directory)
    if not d.is_dir():
        return []
    here, removed = socket.gethostname(), []
    for entry in d.iterdir():
        m = _TMP_RE.match(entry.name)
        if not m or not entry.is_dir():
            continue
        pid, host = _owner_of(entry)
        pid = pid if pid is not None else int(m["pid"])
        if (host is not None and host != here) or pid == os.getpid() or _pid_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
        log.info("removed stale temporary directory %s (writer pid %d is gone)", entry, pid)
    return removed


# ----------------------------------------------------------------------------------------------
# stage directories


def run_dir(runs_root: str | os.PathLike[str], run_name: str) -> Path:
    """``<runs_root>/<run_name>`` with the run name validated (no timestamps: same name = resume)."""
    return Path(runs_root) / _check_name("run name", run_name)


def iteration_dirname(iteration: int) -> str:
    if iteration < 0:
        raise ValueError(f"iteration must be >= 0, got {iteration}")
    return f"iter-{iteration:04d}"


def list_iterations(run_path: str | os.PathLike[str]) -> list[int]:
    """Iterations that have a directory under the run, ascending."""
    p = Path(run_path)
    if not p.is_dir():
        return []
    return sorted(int(m[1]) for e in p.iterdir() if e.is_dir() and (m := _ITER_RE.match(e.name)))


def stage_root(run_path: str | os.PathLike[str], stage: str, iteration: int | None = None) -> Path:
    """``<run>/<stage>`` or ``<run>/iter-<kkkk>/<stage>``: the parent of that stage's keyed directories."""
    base = Path(run_path) if iteration is None else Path(run_path) / iteration_dirname(iteration)
    return base / _check_name("stage", stage)


def _read_complete(path: Path, stage: str, key: str) -> Manifest | None:
    try:
        m = Manifest.load(path)
    except ArtifactError:
        return None
    return m if (m.key == key and m.stage == stage) else None


class StageDir:
    """One keyed output directory of a stage: begin -> write files -> publish(manifest).

    ::

        sd = StageDir(run_path, "score", key, iteration=3)
        if not sd.is_complete():
            tmp = sd.begin()
            ...write into tmp...
            sd.publish(sd.manifest(inputs={...}, config=subset, counts={...}))
    """

    def __init__(self, run_path: str | os.PathLike[str], stage: str, key: str, iteration: int | None = None) -> None:
        self.run_path = Path(run_path)
        self.stage = stage
        self.key = _check_name("key", key)
        self.iteration = iteration
        self.root = stage_root(self.run_path, stage, iteration)
        self.path = self.root / key
        self.tmp_path = self.root / f".{key}.tmp-{os.getpid()}"

    def __repr__(self) -> str:
        return f"StageDir({self.path})"

    def is_complete(self) -> bool:
        """Manifest present, parseable, and for this stage and key."""
        return _read_complete(self.path, self.stage, self.key) is not None

    def load_manifest(self) -> Manifest:
        m = Manifest.load(self.path)
        if m.key != self.key or m.stage != self.stage:
            raise ArtifactError(
                f"{self.path}/{MANIFEST_NAME} is for {m.stage}/{m.key}, expected {self.stage}/{self.key}"
            )
        return m

    def manifest(self, **fields: Any) -> Manifest:
        """A :class:`Manifest` with stage, key and iteration filled in; ``files`` are set by :meth:`publish`."""
        return Manifest(stage=self.stage, key=self.key, iteration=self.iteration, **fields)

    def begin(self) -> Path:
        """Create (fresh) and return this process's temporary directory; stale ones are removed first."""
        self.root.mkdir(parents=True, exist_ok=True)
        clean_stale_tmp_dirs(self.root)
        if self.tmp_path.exists():
            shutil.rmtree(self.tmp_path)
        self.tmp_path.mkdir()
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "created": _now()}
        (self.tmp_path / OWNER_NAME).write_text(json.dumps(owner), encoding="utf-8")
        return self.tmp_path

    def abort(self) -> None:
        """Remove the temporary directory (nothing is published)."""
        shutil.rmtree(self.tmp_path, ignore_errors=True)

    def publish(self, manifest: Manifest, hash_files: bool = True, replace: bool = False) -> Manifest:
        """List files, write ``manifest.json`` last, fsync, rename into place; returns the written manifest.

        ``replace`` allows replacing a complete directory of the same key (a forced rerun); the old one
        stays in place until the new one is complete.

        On any OS error the temporary directory is removed and :class:`ArtifactPublishError` is raised;
        the final directory is never left partial.
        """
        if not self.tmp_path.is_dir():
            raise ArtifactError(f"{self.tmp_path} does not exist: call begin() before publish()")
        if (manifest.stage, manifest.key, manifest.iteration) != (self.stage, self.key, self.iteration):
            raise ArtifactError(
                f"manifest is for {manifest.stage}/{manifest.key} (iteration {manifest.iteration}) but this directory "
                f"is {self.stage}/{self.key} (iteration {self.iteration}); build it with StageDir.manifest()"
            )
        try:
            files = compute_files(self.tmp_path, hash_files=hash_files)
            for rel in files:
                fsync_path(self.tmp_path / rel)
            (self.tmp_path / OWNER_NAME).unlink(missing_ok=True)
            final = manifest.model_copy(update={"files": files})
            _write_durable(self.tmp_path / MANIFEST_NAME, final.to_json().encode("utf-8"))
            fsync_path(self.tmp_path)
            self._move_into_place(replace)
            fsync_path(self.root)
        except OSError as e:
            self.abort()
            raise ArtifactPublishError(self._publish_failure_message(e)) from e
        except BaseException:
            self.abort()
            raise
        log.info("published %s/%s -> %s (%d files)", self.stage, self.key, self.path, len(files))
        return final

    def _move_into_place(self, replace: bool = False) -> None:
        if self.path.exists():
            if self.is_complete() and not replace:
                raise ArtifactError(
                    f"{self.path} is already published; delete it to redo the stage, or skip when is_complete()"
                )
            old = self.root / f".{self.key}.old-{os.getpid()}"
            log.warning("replacing %s directory %s", "complete" if replace else "incomplete", self.path)
            _rename_dir(self.path, old)
            _rename_dir(self.tmp_path, self.path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            _rename_dir(self.tmp_path, self.path)

    def _publish_failure_message(self, e: OSError) -> str:
        where = f"publishing {self.stage} artifact {self.key} to {self.path} failed"
        if e.errno == errno.ENOSPC:
            return (
                f"{where}: no space left on device ({e}). Nothing was published and the temporary directory "
                f"was removed; free disk space under {self.run_path} and rerun: the stage will redo this step."
            )
        return f"{where}: {e}. Nothing was published; fix the cause and rerun the stage."


@dataclass(frozen=True)
class CurrentArtifact:
    """A complete output of a stage; ``stale`` when its key differs from the expected one."""

    path: Path
    key: str
    manifest: Manifest
    stale: bool


def find_current(
    run_path: str | os.PathLike[str], stage: str, iteration: int | None = None, expected_key: str | None = None
) -> CurrentArtifact | None:
    """The complete directory of ``stage`` (any key): ``expected_key``'s if complete, else the newest.

    ``stale`` is True when an ``expected_key`` was given and the returned artifact has another key
    (e.g. config changed since it was made). None when the stage has no complete output.
    """
    root = stage_root(run_path, stage, iteration)
    if not root.is_dir():
        return None
    complete = []
    for entry in root.iterdir():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        m = _read_complete(entry, stage, entry.name)
        if m is not None:
            complete.append((entry, m))
    if not complete:
        return None
    for entry, m in complete:
        if entry.name == expected_key:
            return CurrentArtifact(entry, m.key, m, stale=False)
    entry, m = max(complete, key=lambda em: (em[1].created, em[0].name))
    return CurrentArtifact(entry, m.key, m, stale=expected_key is not None)


# ----------------------------------------------------------------------------------------------
# run lock


class RunLock:
    """Exclusive lock of a run directory: ``fcntl.flock`` on ``<run_dir>/.lock``.

    The kernel drops the lock when the holder's process dies, so no stale lock survives a crash.
    flock may not work across hosts on some network file systems (NFS): keep one writer host per run.
    """

    def __init__(self, run_path: str | os.PathLike[str]) -> None:
        self.run_path = Path(run_path)
        self.path = self.run_path / LOCK_NAME
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def holder(self) -> dict[str, Any]:
        """Contents of the lock file (pid, host, started, argv) or {} if unreadable."""
        try:
            return json.loads(self.path.read_text(encoding="utf-8") or "{}")
        except (OSError, ValueError):
            return {}

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.run_path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            h = self.holder()
            raise RunLockedError(
                f"run {self.run_path} is locked by pid {h.get('pid', '?')} on host {h.get('host', '?')} "
                f"(since {h.get('started', '?')}). Another process is writing this run: wait for it to finish, "
                f"stop it (kill {h.get('pid', '<pid>')}), or use another run name."
            ) from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": _now(), "argv": sys.argv[:8]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode("utf-8"), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------
# distributed helpers


def rank_slice(n_items: int, rank: int, world_size: int) -> range:
    """Contiguous, balanced share of ``range(n_items)`` for ``rank``.

    With ``q, r = divmod(n_items, world_size)`` rank ``i`` gets ``q + (i < r)`` items starting at
    ``i * q + min(i, r)``; the slices of all ranks partition ``range(n_items)`` in order.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    q, r = divmod(n_items, world_size)
    start = rank * q + min(rank, r)
    return range(start, start + q + (1 if rank < r else 0))


def rank_filename(stem: str, rank: int, suffix: str = "") -> str:
    """``{stem}-r{rank:03d}{suffix}``, e.g. ``rank_filename("rewards", 2, ".npy") == "rewards-r002.npy"``."""
    if rank < 0:
        raise ValueError(f"rank must be >= 0, got {rank}")
    return f"{stem}-r{rank:03d}{suffix}"
