"""torchrun helpers: the rank context, process-group setup and the few object collectives stages need.

Under ``torchrun --nproc_per_node=N`` every rank runs the same program with ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its environment. A plain ``python`` process has
none of them and is simply world size 1: every helper here is then a no-op (no process group is
created), so single-process code paths need no ``if distributed`` branches.

Collectives move small picklable Python objects (paths, flags, stage results, error texts), never
tensors: stages exchange data through files. :func:`gather_objects` is an *all*-gather: every rank gets
the list, so every rank can raise the same error when one of them failed (nobody is left waiting in a
barrier for a rank that died).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from astrolabe.artifacts.lock import RunLock, RunLockedError

log = logging.getLogger(__name__)

T = TypeVar("T")

TIMEOUT_ENV = "ASTROLABE_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 4 * 3600.0  # ranks wait in a collective while rank 0 runs a "main" stage (e.g. nft_update)
LAUNCH_HINT = "launch with torchrun, e.g. `torchrun --nproc_per_node=2 -m flows.cli train CONFIG --engine local`"


class DistributedSetupError(RuntimeError):
    """The torchrun environment is inconsistent, or the process group is missing."""


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise DistributedSetupError(f"{name}={raw!r} is not an integer; {LAUNCH_HINT} (it sets {name})") from None


@dataclass(frozen=True)
class DistContext:
    """Where this process stands among the ranks: ``rank`` of ``world_size``, ``local_rank`` on its host."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise DistributedSetupError(f"WORLD_SIZE must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise DistributedSetupError(f"RANK must be in [0, WORLD_SIZE={self.world_size}), got {self.rank}")
        if self.local_rank < 0:
            raise DistributedSetupError(f"LOCAL_RANK must be >= 0, got {self.local_rank}")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that publishes, takes the run lock and does the bookkeeping."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> DistContext:
        """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (set by torchrun); absent means a single process (0, 1, 0)."""
        env = os.environ if env is None else env
        return cls(
            rank=_env_int(env, "RANK", 0),
            world_size=_env_int(env, "WORLD_SIZE", 1),
            local_rank=_env_int(env, "LOCAL_RANK", 0),
        )


def dist_rank_world() -> tuple[int, int]:
    """``(RANK, WORLD_SIZE)`` from the environment (torchrun sets them), default ``(0, 1)``."""
    ctx = DistContext.from_env()
    return ctx.rank, ctx.world_size


def backend_for(device: str) -> str:
    """``nccl`` for a CUDA device (``"cuda"``, ``"cuda:1"``), ``gloo`` otherwise."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


def _timeout() -> timedelta:
    raw = os.environ.get(TIMEOUT_ENV)
    try:
        seconds = float(raw) if raw else DEFAULT_TIMEOUT_S
    except ValueError:
        raise DistributedSetupError(f"{TIMEOUT_ENV}={raw!r} must be a number of seconds") from None
    if seconds <= 0:
        raise DistributedSetupError(f"{TIMEOUT_ENV}={raw!r} must be > 0 seconds")
    return timedelta(seconds=seconds)


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def init_distributed(device: str, env: Mapping[str, str] | None = None) -> DistContext:
    """Read the rank context and, when ``WORLD_SIZE > 1``, initialise the default process group.

    gloo on CPU, nccl on CUDA (after ``torch.cuda.set_device(local_rank)``, so ``"cuda"`` means this rank's
    GPU). Idempotent: an existing group is kept. Ranks wait for each other in collectives for at most
    ``$ASTROLABE_DIST_TIMEOUT_S`` seconds (default 4 h: the longest rank-0-only stage, e.g. ``nft_update``).
    Raises :class:`DistributedSetupError` when ``MASTER_ADDR`` / ``MASTER_PORT`` are missing.
    """
    env = os.environ if env is None else env
    ctx = DistContext.from_env(env)
    if not ctx.is_distributed:
        return ctx
    if is_initialized():
        if dist.get_world_size() != ctx.world_size or dist.get_rank() != ctx.rank:
            raise DistributedSetupError(
                f"the process group is rank {dist.get_rank()} of {dist.get_world_size()} but the environment says "
                f"RANK={ctx.rank} WORLD_SIZE={ctx.world_size}"
            )
        return ctx
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
    if missing:
        raise DistributedSetupError(
            f"WORLD_SIZE={ctx.world_size} but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set: "
            f"{LAUNCH_HINT}, which sets them (or export MASTER_ADDR and MASTER_PORT yourself)"
        )
    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(ctx.local_rank)
    dist.init_process_group(backend, rank=ctx.rank, world_size=ctx.world_size, timeout=_timeout())
    log.info("initialised %s process group: rank %d of %d (local rank %d)", backend, ctx.rank, ctx.world_size,
             ctx.local_rank)
    return ctx


def shutdown_distributed() -> None:
    """Destroy the default process group if one exists (call once every rank is done)."""
    if is_initialized():
        dist.destroy_process_group()


def current_context() -> DistContext:
    """The rank context of a process that may run collectives.

    Raises :class:`DistributedSetupError` when ``WORLD_SIZE > 1`` but no process group exists (every rank
    would otherwise act as rank 0 of its own world and publish on its own).
    """
    ctx = DistContext.from_env()
    if ctx.is_distributed and not is_initialized():
        raise DistributedSetupError(
            f"WORLD_SIZE={ctx.world_size} but the process group is not initialised: call "
            "astrolabe.distributed.init_distributed(device) first (the `astrolabe` CLI does)"
        )
    return ctx


def _active() -> bool:
    return is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    """Wait for every rank (no-op without a process group of size > 1)."""
    if _active():
        dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """``obj`` of rank ``src`` on every rank (picklable); the other ranks' argument is ignored."""
    if not _active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` on **every** rank (an all-gather); ``[obj]`` at world size 1."""
    if not _active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


@contextmanager
def rank0_run_lock(run_path: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the run's :class:`~astrolabe.artifacts.lock.RunLock` on rank 0 for the block; ranks enter once it is held.

    Rank 0's outcome is broadcast (which also synchronises the ranks, so none starts before the lock is
    taken): if rank 0 cannot take the lock, every rank raises :class:`RunLockedError` with its message.
    At world size 1 this is ``with RunLock(run_path):``.
    """
    lock = RunLock(Path(run_path))
    error = None
    if current_context().is_main:
        try:
            lock.acquire()
        except RunLockedError as e:
            error = str(e)
    error = broadcast_object(error)
    if error is not None:
        raise RunLockedError(error)
    try:
        yield
    finally:
        lock.release()
