"""Atomic file publication shared by the streaming writers (rollout shards, mp4 files).

A writer puts its bytes in a hidden temporary sibling (:func:`tmp_sibling`), then on success fsyncs
it and renames it onto the final name (:func:`publish_file`: ``os.replace`` is atomic on POSIX), so a
listing never shows a half-written file. :class:`AtomicWriter` gives such a writer its context-manager
protocol: :meth:`~AtomicWriter.close` (publish) when the ``with`` block succeeds,
:meth:`~AtomicWriter.abort` (discard) when it raises.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Any, Self

log = logging.getLogger(__name__)

__all__ = ["AtomicWriter", "close_quietly", "fsync_file", "publish_file", "tmp_sibling"]


def tmp_sibling(path: Path) -> Path:
    """Hidden per-process temporary name next to ``path``: ``<dir>/.<name>.tmp-<pid>``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_file(path: str | os.PathLike[str]) -> None:
    """Flush a closed file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_file(tmp: str | os.PathLike[str], final: str | os.PathLike[str]) -> None:
    """fsync ``tmp`` and atomically rename it onto ``final`` (replacing an existing file)."""
    fsync_file(tmp)
    os.replace(tmp, final)


def close_quietly(resource: Any, what: str) -> None:
    """``resource.close()`` on an error path: a failure is logged at debug level, never raised."""
    try:
        resource.close()
    except Exception:  # noqa: BLE001 - best effort on the error path
        log.debug("ignoring error while closing %s", what, exc_info=True)


class AtomicWriter:
    """Context-manager protocol of a writer that publishes on :meth:`close` and discards on :meth:`abort`."""

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
