"""Spawning gloo ranks for CPU tests of torch.distributed code (``test_distributed.py``, ``test_parallel.py``)."""

from __future__ import annotations

import multiprocessing
import socket
from collections.abc import Callable
from typing import Any


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (the rendezvous port of the spawned ranks)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(target: Callable[..., None], args: Callable[[int], tuple[Any, ...]], world_size: int = 2,
              timeout: float = 240.0) -> list[int | None]:  # fmt: skip
    """Run ``target(*args(rank))`` in ``world_size`` spawned processes; kill and fail on a hung rank.

    Returns the exit codes. ``target`` must be importable by name (a module-level function of a test module).
    """
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=args(r)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung (an error was left to a collective's timeout)"
    return [p.exitcode for p in procs]
