"""Checks before a run starts, and the run lock's dead holders: what ``astrolabe train`` does before any work
(no server, no model, no lock taken) and what ``status`` / a rerun do about a run whose process died.
"""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from astrolabe.artifacts.lock import RunLock, RunLockedError
from astrolabe.artifacts.plan import NodeStatus, build_plan, plan_status
from astrolabe.artifacts.stagedir import run_dir
from astrolabe.config import ConfigError, RunConfig
from astrolabe.distributed import current_context
from astrolabe.tracking import RUN_ID_FILE, Tracker
from stages import STAGES


def holder_died(run_path: Path) -> bool:
    """Whether the run lock names a process of this host that is gone without releasing it (SIGKILL, OOM).

    A released lock is empty (:meth:`RunLock.release`), so only a holder that died leaves its pid behind.
    """
    h = RunLock(run_path).holder()
    pid = h.get("pid")
    if not isinstance(pid, int) or h.get("host") != socket.gethostname() or pid == os.getpid():
        return False
    from flows.server import pid_alive

    return not pid_alive(pid)


def mark_killed(tracker: Tracker, run_path: Path) -> bool:
    """Mark the run's MLflow run KILLED if it is still RUNNING (its process died); returns whether it was."""
    if not tracker.enabled or not (run_path / RUN_ID_FILE).is_file():
        return False
    return tracker.mark_killed_if_running((run_path / RUN_ID_FILE).read_text(encoding="utf-8").strip())


def mark_killed_if_dead(cfg: RunConfig, run_path: Path) -> bool:
    """:func:`mark_killed` when the lock's holder died (what ``astrolabe status`` and a cached rerun do)."""
    if not holder_died(run_path):
        return False
    return mark_killed(Tracker(cfg.tracking, cfg.pipeline.runs_root), run_path)


def check_unlocked(run_path: Path) -> None:
    """Raise :class:`RunLockedError` if another process holds the run lock (the lock is not taken)."""
    lock = RunLock(run_path)
    if not lock.path.is_file():
        return
    fd = os.open(lock.path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        h = lock.holder()
        raise RunLockedError(f"run {run_path} is locked by pid {h.get('pid', '?')} on host {h.get('host', '?')}: "
                             "another process is writing this run; wait for it or use another run name") from None
    finally:
        os.close(fd)  # closing drops the probe's lock


def check_model_files(cfg: RunConfig) -> None:
    """The base model's checkpoint files exist (one error listing the missing ones); tiny needs none."""
    from astrolabe.models.registry import check_files, get_base_model

    card = get_base_model(cfg.model.base)
    if not card.files():
        return
    if cfg.model.checkpoint_dir is None:
        raise ConfigError(f"model.checkpoint_dir is not set; base model {card.name!r} needs its checkpoint files "
                          "(see `astrolabe generate` for the list), or use model.base=tiny")  # fmt: skip
    check_files(card, Path(cfg.model.checkpoint_dir), fill_base=cfg.model.fill_missing_from_base)


def preflight(cfg: RunConfig) -> tuple[Path, list[NodeStatus]]:
    """Check everything a training run needs before anything starts (no server, no model, no lock taken).

    The config is loaded; the base model's files exist; every stage's cache key can be computed (reward
    names and options, prompt files); no other process writes the run. Returns the run directory and the
    status of every node of the plan.
    """
    check_model_files(cfg)
    for name in sorted({node.stage for node in build_plan(cfg)}):  # the stages this run plans: reward identities
        STAGES[name].STAGE.config_subset(cfg)  # (unknown names, bad options), prompt file hashes
    run_path = run_dir(cfg.pipeline.runs_root, cfg.name)
    statuses = plan_status(cfg, run_path, STAGES)
    if current_context().is_main:  # under torchrun rank 0 alone takes the lock (the others would see it held)
        check_unlocked(run_path)
    return run_path, statuses
