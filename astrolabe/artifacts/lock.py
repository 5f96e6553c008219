"""The run lock: one writing process per run directory (``<run>/.lock``)."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from types import TracebackType
from typing import Any

from astrolabe.artifacts.manifest import now_utc

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run's lock."""


class RunLock:
    """Exclusive lock of a run directory: ``fcntl.flock`` on ``<run_dir>/.lock``.

    The kernel drops the lock when the holder's process dies, so no stale lock survives a crash.
    flock may not work across hosts on some network file systems (NFS): keep one writer host per run.
    The lock file's content (pid, host, start, argv) only informs the message of a refused second writer.
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
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_utc(), "argv": sys.argv[:8]}
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
