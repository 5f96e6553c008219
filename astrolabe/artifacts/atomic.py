"""The one atomic writer: every file or directory the project publishes goes through here.

A file is written to a hidden per-process sibling (:func:`tmp_sibling`: ``<dir>/.<name>.tmp-<pid>``),
fsynced, renamed onto its final name (``os.replace`` is atomic on POSIX) and the parent directory is
fsynced, so the final name shows either the old complete file or the new complete one, never a half
(:func:`write_bytes`, :func:`write_text`, :func:`write_json`; :func:`publish_file` for a streaming
writer that filled its temporary sibling itself, see :class:`AtomicWriter`).

A directory is filled under a temporary sibling and published the same way (:func:`publish_dir`,
:func:`atomic_dir`): every file and directory in it is fsynced, an existing final directory is moved
aside to ``.<name>.old-<pid>``, the new one renamed into place, the parent fsynced, the old one deleted.
Files written *inside* such a temporary directory (a stage's output, a checkpoint) need no rename of
their own: the directory publish makes them appear together.

A write that fails for a reason of the storage (disk full, quota, read-only file system, no permission)
raises :class:`StorageError`: an ``OSError`` whose message is one line naming the path and what to do
(:func:`storage_error` finds such a cause anywhere in an exception's chain).

This is the only module that renames files (``tests/test_architecture.py`` checks it). The helpers are
module-level functions so tests can inject failures (``monkeypatch.setattr(atomic, "rename_dir", ...)``).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

PathLike = str | os.PathLike[str]


def tmp_sibling(path: PathLike, kind: str = "tmp") -> Path:
    """Hidden per-process name next to ``path``: ``<dir>/.<name>.<kind>-<pid>`` (kind: ``tmp`` or ``old``)."""
    p = Path(path)
    return p.with_name(f".{p.name}.{kind}-{os.getpid()}")


def fsync_path(path: PathLike) -> None:
    """fsync a file or directory by path (flushes a closed file's data, or a directory's entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: PathLike) -> None:
    """fsync every file and directory under ``path`` (``path`` included), deepest first."""
    for dirpath, _, filenames in os.walk(path, topdown=False):
        for name in filenames:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


# ----------------------------------------------------------------------------------- storage errors

# errno -> (what happened, what to do); the errors a user fixes on the machine, not in the code
STORAGE_ERRNOS: dict[int, tuple[str, str]] = {
    errno.ENOSPC: ("no space left on device", "free disk space there"),
    errno.EDQUOT: ("disk quota exceeded", "free space or raise the quota"),
    errno.EROFS: ("read-only file system", "make it writable or choose another pipeline.runs_root"),
    errno.EACCES: ("permission denied", "fix the permissions (chmod / chown) or choose another pipeline.runs_root"),
    errno.EPERM: ("operation not permitted", "fix the permissions (chmod / chown) or choose another pipeline.runs_root"),
}


class StorageError(OSError):
    """A write failed because of the storage; ``str()`` is one line: the path, the reason and the fix."""

    def __init__(self, code: int, path: PathLike | None, context: str = "") -> None:
        super().__init__(code, STORAGE_ERRNOS[code][0], None if path is None else str(path))
        self.context = context

    def __str__(self) -> str:
        reason, advice = STORAGE_ERRNOS[self.errno]
        where = f"cannot write {self.filename}" if self.filename else "cannot write"
        head = f"{self.context}: {where}" if self.context else where[0].upper() + where[1:]
        return (f"{head}: {reason}. Nothing partial was left behind; {advice}, then rerun the same command "
                "(it resumes where it stopped).")


def storage_error(exc: BaseException, path: PathLike | None = None, context: str = "") -> StorageError | None:
    """A :class:`StorageError` for the first storage ``OSError`` in ``exc``'s chain (cause / context); None if none.

    ``path`` (default: the ``OSError``'s file name) is the path named in the message.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            if isinstance(e, StorageError) and not context and path is None:
                return e
            ctx = context or (e.context if isinstance(e, StorageError) else "")
            return StorageError(e.errno, path if path is not None else e.filename, ctx)
        e = e.__cause__ or e.__context__
    return None


# ----------------------------------------------------------------------------------- files


def write_durable(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` in place and fsync it (for a file inside a directory published later)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def publish_file(tmp: PathLike, final: PathLike) -> None:
    """fsync ``tmp``, atomically rename it onto ``final`` (replacing an existing file), fsync the directory."""
    fsync_path(tmp)
    os.replace(tmp, final)
    fsync_path(Path(final).parent)


@contextmanager
def _discard_on_error(tmp: Path, final: Path) -> Iterator[None]:
    """On any error in the block: remove ``tmp`` (file, link or directory), and re-raise a storage failure
    (disk full, read-only, permission) as its one-line :class:`StorageError` naming ``final``."""
    try:
        yield
    except BaseException as e:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        if (se := storage_error(e, final)) is not None:
            raise se from e
        raise


def write_bytes(path: PathLike, data: bytes) -> Path:
    """Atomically replace ``path``'s content with ``data`` (tmp sibling, fsync, rename, fsync dir)."""
    final = Path(path)
    tmp = tmp_sibling(final)
    with _discard_on_error(tmp, final):
        write_durable(tmp, data)
        publish_file(tmp, final)
    return final


def write_text(path: PathLike, text: str) -> Path:
    """:func:`write_bytes` of ``text`` in UTF-8."""
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any, **dumps: Any) -> Path:
    """:func:`write_text` of ``json.dumps(obj, **dumps)``."""
    return write_text(path, json.dumps(obj, **dumps))


# ----------------------------------------------------------------------------------- directories


def rename_dir(src: PathLike, dst: PathLike) -> None:
    """Atomic rename on one file system; fails if ``dst`` exists and is not empty."""
    os.rename(src, dst)


def publish_dir(tmp: PathLike, final: PathLike) -> None:
    """fsync the complete directory ``tmp`` and rename it onto ``final``, replacing an existing ``final``.

    An existing ``final`` is moved aside to ``.<name>.old-<pid>`` first and deleted after the new one is
    in place (if the second rename fails it is moved back). A crash between the two renames leaves the
    old directory under its ``.old`` name, never a half directory under ``final``.
    """
    tmp, final = Path(tmp), Path(final)
    fsync_tree(tmp)
    old = tmp_sibling(final, "old") if final.exists() else None
    if old is not None:
        rename_dir(final, old)
    try:
        rename_dir(tmp, final)
    except BaseException:
        if old is not None:
            rename_dir(old, final)
        raise
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def set_aside(path: PathLike, label: str) -> Path:
    """Rename ``path`` to ``<path>.<label>-<UTC timestamp>`` next to it (kept for inspection); returns the new path."""
    from datetime import datetime, timezone

    p = Path(path)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
    dst = p.with_name(f"{p.name}.{label}-{stamp}")
    rename_dir(p, dst)
    fsync_path(p.parent)
    return dst


def symlink(target: PathLike, link: PathLike) -> Path:
    """Point the symbolic link ``link`` at ``target`` (relative targets stay relative), replacing it atomically.

    A real directory under ``link`` (a copy made by following links, e.g. ``cp -rL``) is removed first.
    """
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(link)
    tmp.unlink(missing_ok=True)
    with _discard_on_error(tmp, link):
        if link.is_dir() and not link.is_symlink():
            shutil.rmtree(link)
        os.symlink(target, tmp)
        os.replace(tmp, link)
    return link


def fresh_dir(path: PathLike) -> Path:
    """Create ``path`` (parents too) as an empty directory, removing what was there."""
    p = Path(path)
    if p.exists():
        shutil.rmtree(p)
    p.mkdir(parents=True)
    return p


@contextmanager
def atomic_dir(final: PathLike) -> Iterator[Path]:
    """Yield a fresh temporary sibling of ``final`` to fill; published onto ``final`` (:func:`publish_dir`)
    when the block succeeds, removed when it raises (``final`` is then untouched; a storage failure becomes
    :class:`StorageError` naming ``final``)."""
    final = Path(final)
    tmp = tmp_sibling(final)
    with _discard_on_error(tmp, final):
        fresh_dir(tmp)
        yield tmp
        publish_dir(tmp, final)


# ----------------------------------------------------------------------------------- streaming writers


def close_quietly(resource: Any, what: str) -> None:
    """``resource.close()`` on an error path: a failure is logged at debug level, never raised."""
    try:
        resource.close()
    except Exception:  # noqa: BLE001 - best effort on the error path
        log.debug("ignoring error while closing %s", what, exc_info=True)


class AtomicWriter:
    """Context-manager protocol of a writer that publishes on :meth:`close` and discards on :meth:`abort`.

    A streaming writer (rollout shards, mp4 files) fills :func:`tmp_sibling` files and publishes each
    with :func:`publish_file` when it is complete.
    """

    def close(self) -> Any:
        """Finish and publish what was written. Override this."""
        raise NotImplementedError(f"{type(self).__name__} must implement close")

    def abort(self) -> None:
        """Discard what is being written; the final name is untouched. Override this."""
        raise NotImplementedError(f"{type(self).__name__} must implement abort")

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
