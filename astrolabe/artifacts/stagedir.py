"""Stage output directories: the run layout, begin -> write -> publish, stale temporaries, the current output.

Layout (see DESIGN.md, "Artifacts, caching and resume")::

    runs/<run>/.lock                                  RunLock: one writing process per run
    runs/<run>/<stage>/<key>/                         iteration-independent stage (e.g. filter_prompts)
    runs/<run>/iter-<kkkk>/<stage>/<key>/             stage output of training iteration k (zero-padded)
    runs/<run>/iter-<kkkk>/<stage>/.<key>.tmp-<pid>/  being written by process <pid>

A stage writes into the temporary directory from :meth:`StageDir.begin`, then :meth:`StageDir.publish`
lists every file with size and sha256, writes ``manifest.json`` **last** and publishes the directory
(:func:`astrolabe.artifacts.atomic.publish_dir`: fsync, rename into place). So a directory under its
final name always holds a complete artifact, and "manifest present, parseable, right key"
(:meth:`StageDir.is_complete`) means done: skip it. That is resume.

A complete directory whose files no longer match its manifest (:meth:`StageDir.damage`: a file changed,
deleted or added) is *damaged*: the engine moves it aside to ``<key>.damaged-<UTC time>``
(:meth:`StageDir.set_aside`) and recomputes it; the repaired output keeps the old ``instance`` when its
files are identical (so its consumers stay valid), and gets a fresh one otherwise (they become stale).

Distributed stages (``torchrun``): rank 0 calls ``begin()`` and broadcasts the temporary path; ranks write
rank-named files into it; after a barrier rank 0 alone calls ``publish()`` (:mod:`astrolabe.artifacts.engine`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from astrolabe.artifacts import atomic
from astrolabe.artifacts.manifest import (
    MANIFEST_NAME,
    OWNER_NAME,
    ArtifactError,
    ArtifactPublishError,
    FileEntry,
    Manifest,
    compute_files,
    file_problems,
    now_utc,
)

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TMP_RE = re.compile(r"^\.(?P<key>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")
DAMAGED_LABEL = "damaged"  # a damaged output moved aside: <key>.damaged-<UTC time>
_ITER_RE = re.compile(r"^iter-(\d+)$")


def _check_name(kind: str, name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"{kind} {name!r} must match [A-Za-z0-9][A-Za-z0-9_.-]* (it becomes a directory name)")
    return name


# ----------------------------------------------------------------------------------- stale temporaries


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


# ----------------------------------------------------------------------------------- layout


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


# ----------------------------------------------------------------------------------- stage directories


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
        self.tmp_path = atomic.tmp_sibling(self.path)

    def __repr__(self) -> str:
        return f"StageDir({self.path})"

    def is_complete(self) -> bool:
        """Manifest present, parseable, and for this stage and key."""
        return _read_complete(self.path, self.stage, self.key) is not None

    def damage(self, check_sha: bool = True) -> list[str] | None:
        """None when there is no complete output; else its files' differences from the manifest ([]: intact).

        ``check_sha=False`` compares sizes and names only (see :func:`astrolabe.artifacts.manifest.file_problems`).
        """
        m = _read_complete(self.path, self.stage, self.key)
        return None if m is None else file_problems(self.path, m, check_sha)

    def set_aside(self, problems: list[str]) -> Manifest:
        """Move a damaged complete output aside (``<key>.damaged-<time>``); returns its manifest (for a repair)."""
        m = self.load_manifest()
        dst = atomic.set_aside(self.path, DAMAGED_LABEL)
        log.warning("%s/%s is damaged (%s): moved aside to %s (delete it when done looking) and recomputing",
                    self.stage, self.key, "; ".join(problems), dst)
        return m

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
        atomic.fresh_dir(self.tmp_path)
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "created": now_utc()}
        (self.tmp_path / OWNER_NAME).write_text(json.dumps(owner), encoding="utf-8")  # inside the tmp dir
        return self.tmp_path

    def abort(self) -> None:
        """Remove the temporary directory (nothing is published)."""
        shutil.rmtree(self.tmp_path, ignore_errors=True)

    def publish(self, manifest: Manifest, hash_files: bool = True, replace: bool = False,
                repair_of: Manifest | None = None) -> Manifest:  # fmt: skip
        """List files, write ``manifest.json`` last, fsync, rename into place; returns the written manifest.

        ``replace`` allows replacing a complete directory of the same key (a forced rerun); the old one
        stays in place until the new one is complete. ``repair_of`` is the manifest of the damaged output
        this one replaces: identical files keep its ``instance`` (consumers stay valid), other files get a
        fresh one (consumers become stale), see :func:`repaired_instance`.

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
            (self.tmp_path / OWNER_NAME).unlink(missing_ok=True)
            update: dict[str, Any] = {"files": files}
            if repair_of is not None:
                update["instance"] = repaired_instance(repair_of, files)
            final = manifest.model_copy(update=update)
            atomic.write_durable(self.tmp_path / MANIFEST_NAME, final.to_json().encode("utf-8"))
            self._check_replaceable(replace)
            atomic.publish_dir(self.tmp_path, self.path)
        except OSError as e:
            self.abort()
            raise ArtifactPublishError(self._publish_failure_message(e)) from e
        except BaseException:
            self.abort()
            raise
        log.info("published %s/%s -> %s (%d files)", self.stage, self.key, self.path, len(files))
        return final

    def _check_replaceable(self, replace: bool) -> None:
        if not self.path.exists():
            return
        if self.is_complete() and not replace:
            raise ArtifactError(
                f"{self.path} is already published; delete it to redo the stage, or skip when is_complete()"
            )
        log.warning("replacing %s directory %s", "complete" if replace else "incomplete", self.path)

    def _publish_failure_message(self, e: OSError) -> str:
        where = f"publishing {self.stage} artifact {self.key} to {self.path} failed"
        if e.errno == errno.ENOSPC:
            return (
                f"{where}: no space left on device ({e}). Nothing was published and the temporary directory "
                f"was removed; free disk space under {self.run_path} and rerun: the stage will redo this step."
            )
        if e.errno in atomic.STORAGE_ERRNOS:
            reason, advice = atomic.STORAGE_ERRNOS[e.errno]
            return (f"{where}: {reason} ({e.filename or self.path}). Nothing was published and the temporary "
                    f"directory was removed; {advice} and rerun: the stage will redo this step.")
        return f"{where}: {e}. Nothing was published; fix the cause and rerun the stage."


def repaired_instance(damaged: Manifest, files: dict[str, FileEntry]) -> str:
    """The ``instance`` of an output recomputed in place of the damaged ``damaged``.

    Its own instance when the new files equal what its manifest recorded (same names, sizes and sha256:
    the stage is deterministic, so consumers made from it stay valid); otherwise a fresh id, so every
    consumer's key changes and they are recomputed.
    """
    same = files.keys() == damaged.files.keys() and all(
        files[k].size == e.size and (e.sha256 is None or files[k].sha256 == e.sha256) for k, e in damaged.files.items()
    )
    if same:
        return damaged.instance
    log.warning("the recomputed %s/%s differs from the damaged one: its consumers will be recomputed",
                damaged.stage, damaged.key)
    return uuid.uuid4().hex


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
