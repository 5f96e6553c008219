"""Launching one stage on N processes: a ``torchrun`` job (one node, or nodes started by hand) or ``srun`` +
``torchrun`` across a Slurm allocation. Used by both engines (the Prefect task body, the local runner).

The process layout of a stage comes from ``resources`` (:class:`astrolabe.config.ResourcesConfig`)::

    world_size(stage) = nproc_per_node x nnodes        (a per-stage override in resources.stages wins)

and only for a ``"sliced"`` stage (rollout, score, nft_update, evaluate, arcopo_buffer): a ``"main"`` stage
(filter_prompts, label_uncertainty) runs on rank 0 while every other rank waits, so it always runs at world size
1, in the caller's process. World size 1: the stage runs in the caller's process as before
(:func:`astrolabe.artifacts.engine.execute`). Greater: the caller runs, as one subprocess,

    torchrun --nnodes N --nproc_per_node P --max-restarts 0 --rdzv_backend c10d --rdzv_endpoint HOST:PORT
             --rdzv_id ID -m flows.cli stage NAME --run-dir RUN [--iteration K] [--force] -v

(``python -m torch.distributed.run``, the same interpreter; single node: ``127.0.0.1`` and a free port; several
nodes: ``resources.rdzv_endpoint``, and the command is logged for the other nodes to run by hand), or with
``resources.launcher: slurm``, inside an allocation, ``srun --nodes N --ntasks-per-node 1 --kill-on-bad-exit=1``
followed by that command with the first allocated node as the rendezvous host.

The job's output (stdout and stderr, every rank) streams line by line into the caller's ``log_line`` (the
Prefect task's logger). **The published manifest decides success**: the stage's output for the expected key
(computed here, as the job computes it) must be newly published. A job that publishes nothing fails with
:class:`StageLaunchError` naming the failing rank and its error line (``rank 1: ValueError: ...``), read from
torchrun's failure report (the ranks' entry, ``flows.cli stage``, is decorated with torch elastic's ``record``,
so the report carries the rank's traceback). ``--max-restarts 0``: a failed stage is not retried by torchrun
(the stage starts over on the next run; the engine published nothing).

The run lock stays with the caller (the flow process): the job's ranks skip taking it when the lock file names
the holder given in ``$ASTROLABE_RUN_LOCK_HOLDER`` (:func:`stage_lock`).
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from astrolabe.artifacts.engine import execute
from astrolabe.artifacts.keys import stage_key
from astrolabe.artifacts.lock import RunLock
from astrolabe.artifacts.manifest import Manifest
from astrolabe.artifacts.plan import Node, Runner
from astrolabe.artifacts.stage import StageModule
from astrolabe.artifacts.stagedir import StageDir
from astrolabe.config import ConfigError, RunConfig
from astrolabe.distributed import broadcast_object, current_context, rank0_run_lock
from stages import STAGES

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[1]  # holds flows/ (the jobs run `-m flows.cli`)
LOCK_HOLDER_ENV = "ASTROLABE_RUN_LOCK_HOLDER"
OUTPUT_TAIL_LINES = 5000  # of a job's output kept for its failure report
TERMINATE_GRACE_S = 60.0  # after SIGTERM, how long the job may take to stop before SIGKILL
SLURM_HINT = ("resources.launcher=slurm launches inside a Slurm allocation: run `astrolabe train` (or the Prefect "
              "worker) inside `salloc --nodes N ...` or an `sbatch` script")

LogLine = Callable[[str], None]


class StageLaunchError(RuntimeError):
    """A launched stage job published nothing (a rank failed, or the launch itself failed)."""


# ----------------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class Layout:
    """Processes of one stage job: ``nproc_per_node`` on each of ``nnodes`` nodes."""

    nproc_per_node: int = 1
    nnodes: int = 1

    @property
    def world_size(self) -> int:
        return self.nproc_per_node * self.nnodes


def stage_layout(cfg: RunConfig, stage: StageModule) -> Layout:
    """The layout of ``stage``: ``resources`` (per-stage override first) for a sliced stage, 1 x 1 for a main one."""
    if stage.STAGE.distribution != "sliced":
        return Layout()
    nproc, nnodes = cfg.resources.for_stage(stage.STAGE.name)
    return Layout(nproc, nnodes)


# ----------------------------------------------------------------------------------- commands (pure)


def stage_args(stage: str, run_path: Path, iteration: int | None, force: bool = False) -> list[str]:
    """``-m flows.cli stage NAME --run-dir RUN [--iteration K] [--force] -v``: what every rank runs."""
    args = ["-m", "flows.cli", "stage", stage, "--run-dir", str(Path(run_path).resolve())]
    args += ["--iteration", str(iteration)] if iteration is not None else []
    return args + (["--force"] if force else []) + ["-v"]


def rdzv_id(run_path: Path, stage: str, iteration: int | None) -> str:
    """The rendezvous id every node of one job passes (same run, stage and iteration -> same id)."""
    raw = f"{Path(run_path).name}-{stage}" + ("" if iteration is None else f"-{iteration}")
    return re.sub(r"[^A-Za-z0-9_.-]", "_", raw)


def torchrun_command(layout: Layout, endpoint: str, job_id: str, args: Sequence[str],
                     python: str = sys.executable) -> list[str]:  # fmt: skip
    """``torchrun`` (as ``python -m torch.distributed.run``) of ``args`` with a c10d rendezvous at ``endpoint``."""
    return [python, "-m", "torch.distributed.run", "--nnodes", str(layout.nnodes),
            "--nproc_per_node", str(layout.nproc_per_node), "--max-restarts", "0",
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", job_id, *args]  # fmt: skip


def srun_command(layout: Layout, torchrun: Sequence[str]) -> list[str]:
    """``srun`` starting one ``torchrun`` per node (it spawns that node's ranks); a failed node stops the others."""
    return ["srun", "--nodes", str(layout.nnodes), "--ntasks-per-node", "1", "--kill-on-bad-exit=1", *torchrun]


def first_node(nodelist: str) -> str:
    """The first host of a Slurm node list: ``gpu-[003-005,9],cpu1`` -> ``gpu-003``; ``n[1-2]-ib`` -> ``n1-ib``.

    (What ``scontrol show hostnames $SLURM_JOB_NODELIST | head -1`` prints, without needing scontrol.)
    """
    m = re.match(r"([^,\[]*)(?:\[([^\]]*)\]([^,]*))?", nodelist.strip())
    if not m or not (m.group(1) or m.group(2)):
        raise ConfigError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, ranges, suffix = m.group(1), m.group(2), m.group(3) or ""
    if ranges is None:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0] + suffix


def slurm_endpoint(env: Mapping[str, str], layout: Layout, port: int) -> str:
    """``<first allocated node>:port``; a clear error outside an allocation or when it has too few nodes."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise ConfigError(f"not inside a Slurm allocation (no SLURM_JOB_NODELIST): {SLURM_HINT}")
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 0)
    if nnodes and nnodes < layout.nnodes:
        raise ConfigError(f"the Slurm allocation has {nnodes} node(s) but the stage needs resources.nnodes="
                          f"{layout.nnodes}: allocate more (`salloc --nodes {layout.nnodes}`) or lower nnodes")
    return f"{first_node(nodelist)}:{port}"


def job_command(cfg: RunConfig, layout: Layout, args: Sequence[str], job_id: str,
                env: Mapping[str, str] | None = None) -> list[str]:  # fmt: skip
    """The command the caller runs for a stage job of ``layout`` (module docstring)."""
    env = os.environ if env is None else env
    res = cfg.resources
    port = int(res.rdzv_endpoint.rsplit(":", 1)[1])
    if res.launcher == "slurm":
        return srun_command(layout, torchrun_command(layout, slurm_endpoint(env, layout, port), job_id, args))
    from flows.server import free_port

    endpoint = f"127.0.0.1:{free_port()}" if layout.nnodes == 1 else res.rdzv_endpoint
    return torchrun_command(layout, endpoint, job_id, args)


def job_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The job's environment: the caller's, unbuffered output, ``flows`` importable, and this process as the run
    lock's holder (the job's ranks skip the lock only if the lock file names this process: :func:`stage_lock`)."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("COLUMNS", "200")  # the stage command's last line, unwrapped
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env[LOCK_HOLDER_ENV] = lock_holder_id({"pid": os.getpid(), "host": socket.gethostname()}) or ""
    return env


# ----------------------------------------------------------------------------------- torchrun's failure report


@dataclass(frozen=True)
class RankFailure:
    """One failed rank of torchrun's report: its ``rank``, ``exitcode`` and last error line."""

    rank: int
    exitcode: int | None
    error: str

    def __str__(self) -> str:
        return f"rank {self.rank}: {self.error}"


_FIELD = re.compile(r"^\s*(time|host|rank|exitcode|error_file|traceback)\s*:\s?(.*)$")


def _failure_block(lines: Sequence[str]) -> RankFailure | None:
    """One ``[i]:`` entry of the report; ``traceback`` is its last field and may span several lines."""
    fields: dict[str, str] = {}
    trace: list[str] = []
    for line in lines:
        m = _FIELD.match(line)
        if trace:
            trace.append(line)
        elif m:
            fields[m.group(1)] = m.group(2).strip()
            if m.group(1) == "traceback":
                trace = [m.group(2)]
    rank = re.match(r"\d+", fields.get("rank", ""))
    if rank is None:
        return None
    code = re.match(r"-?\d+", fields.get("exitcode", ""))
    error = next((t.strip() for t in reversed(trace) if t.strip()), fields.get("exitcode", "failed"))
    return RankFailure(int(rank.group()), int(code.group()) if code else None, error)


def parse_failures(output: Sequence[str]) -> list[RankFailure]:
    """The failed ranks of torchrun's last failure report in ``output`` (its lines), root cause first.

    The report (``ChildFailedError``) lists ``Failures:`` then ``Root Cause (first observed failure):``, each an
    ``[i]:`` entry of ``rank : R (local_rank: L)``, ``exitcode : C``, ``traceback : ...`` (the rank's traceback
    from its error file, or ``Signal 9 (SIGKILL) received by PID ...``); the error line is its last line.
    """
    start = max((i for i, ln in enumerate(output) if "Failures:" in ln), default=None)
    if start is None:
        return []
    blocks: list[tuple[bool, list[str]]] = []
    root = False
    for line in output[start + 1:]:
        if line.startswith("====="):
            break
        if "Root Cause" in line:
            root = True
        elif re.match(r"^\[\d+\]:\s*$", line):
            blocks.append((root, []))
        elif blocks and not line.startswith("-----"):
            blocks[-1][1].append(line)
    parsed = [(is_root, _failure_block(b)) for is_root, b in blocks]
    return [f for r, f in parsed if r and f] + [f for r, f in parsed if not r and f]


def failure_message(label: str, layout: Layout, returncode: int, output: Sequence[str]) -> str:
    """What a failed job raises: the failing ranks (root cause first) or, without a report, the output's tail."""
    failures = parse_failures(output)
    head = f"{label} failed in its {layout.world_size}-rank job (exit code {returncode}); nothing was published"
    if failures:
        root, others = failures[0], [f for f in failures[1:] if f.exitcode != -signal.SIGTERM]
        more = f" (then {'; '.join(map(str, others))})" if others else ""
        return f"{head}: {root}{more}. Fix the cause and rerun: the stage starts over."
    tail = "\n".join(output[-20:])
    return f"{head}, and the job printed no failure report; its last lines:\n{tail}"


# ----------------------------------------------------------------------------------- running a job


def _die_with_parent_term() -> None:  # pragma: no cover - runs in the forked child
    """``preexec_fn``: SIGTERM when the caller dies (torchrun / srun then stop their ranks)."""
    from flows.server import die_with_parent

    die_with_parent(signal.SIGTERM)


def run_job(cmd: Sequence[str], env: Mapping[str, str], log_line: LogLine,
            cwd: Path | None = None) -> tuple[int, list[str]]:  # fmt: skip
    """Run ``cmd`` in its own session, each output line to ``log_line``; returns ``(returncode, last lines)``
    (the last :data:`OUTPUT_TAIL_LINES`: enough for torchrun's failure report).

    An interrupt of the caller (SIGINT, SIGTERM as KeyboardInterrupt) stops the job: SIGTERM to its process
    group (torchrun stops its ranks), SIGKILL after :data:`TERMINATE_GRACE_S`; then the interrupt goes on.
    """
    lines: deque[str] = deque(maxlen=OUTPUT_TAIL_LINES)
    proc = subprocess.Popen(list(cmd), env=dict(env), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, errors="replace", bufsize=1,
                            start_new_session=True, preexec_fn=_die_with_parent_term)  # fmt: skip
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            lines.append(line)
            log_line(line)
        return proc.wait(), list(lines)
    except BaseException:
        stop_job(proc)
        raise


def stop_job(proc: subprocess.Popen) -> None:
    """SIGTERM the job's process group, SIGKILL it after :data:`TERMINATE_GRACE_S`."""
    for sig, wait_s in ((signal.SIGTERM, TERMINATE_GRACE_S), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue


def launch_stage(cfg: RunConfig, run_path: Path, stage: StageModule, inputs: Mapping[str, Path], iteration: int | None,
                 force: bool = False, log_line: LogLine | None = None,
                 layout: Layout | None = None) -> Manifest:  # fmt: skip
    """Run one stage as a job of ``layout`` (default :func:`stage_layout`) and return its published manifest.

    Cached (complete, intact, not forced): returned without starting anything. Otherwise the job runs
    (:func:`job_command`) and must publish the expected key anew, else :class:`StageLaunchError`.
    """
    layout = layout or stage_layout(cfg, stage)
    log_line = log_line or log.info
    name = stage.STAGE.name
    key, _ = stage_key(stage, cfg, inputs)
    sd = StageDir(run_path, name, key, iteration if stage.STAGE.per_iteration else None)
    label = name if sd.iteration is None else f"{name} (iteration {sd.iteration})"
    before = sd.damage()
    if before == [] and not force:
        log.info("%s is cached at %s", label, sd.path)
        return sd.load_manifest()
    created = sd.load_manifest().created if before is not None else None
    job_id = rdzv_id(run_path, name, sd.iteration)
    cmd = job_command(cfg, layout, stage_args(name, run_path, sd.iteration, force), job_id)
    env = job_env()
    log.info("%s: launching %d ranks: %s", label, layout.world_size, shlex.join(cmd))
    if layout.nnodes > 1 and cfg.resources.launcher == "torchrun":
        log.warning("%s needs %d nodes: start the same job on each of the other %d node(s) (same run directory "
                    "on a shared file system): %s=%s %s", label, layout.nnodes, layout.nnodes - 1, LOCK_HOLDER_ENV,
                    shlex.quote(env[LOCK_HOLDER_ENV]), shlex.join(cmd))  # fmt: skip
    returncode, output = run_job(cmd, env, log_line)
    if sd.damage(check_sha=False) == [] and sd.load_manifest().created != created:  # published by this job
        if returncode != 0:
            log.warning("%s was published but its job exited with code %d", label, returncode)
        return sd.load_manifest()
    if returncode == 0:
        raise StageLaunchError(f"{label}: its {layout.world_size}-rank job exited 0 but published nothing at {sd.path}")
    raise StageLaunchError(failure_message(label, layout, returncode, output))


def run_node(cfg: RunConfig, run_path: Path, stage: str, iteration: int | None, inputs: Mapping[str, Path],
             force: bool = False, log_line: LogLine | None = None) -> Manifest:  # fmt: skip
    """One node, where its layout says: in this process at world size 1 (or when this process is already one
    of a torchrun job's ranks), else as a launched job (:func:`launch_stage`)."""
    module = STAGES[stage]
    layout = stage_layout(cfg, module)
    if layout.world_size == 1 or current_context().is_distributed:
        return execute(module, cfg, run_path, inputs, iteration, force=force)
    return launch_stage(cfg, run_path, module, inputs, iteration, force, log_line, layout)


def launching_runner(cfg: RunConfig, run_path: Path) -> Runner:
    """The local engine's runner: each node through :func:`run_node`."""

    def run(node: Node, inputs: Mapping[str, Path], force: bool) -> Manifest:
        return run_node(cfg, run_path, node.stage, node.iteration, inputs, force)

    return run


# ----------------------------------------------------------------------------------- inside the job

F = TypeVar("F", bound=Callable[..., Any])


def recorded(fn: F) -> F:
    """Under torchrun (``$TORCHELASTIC_ERROR_FILE`` set), ``fn`` decorated with torch elastic's ``record``: an
    exception writes the rank's traceback to its error file, which torchrun's failure report shows (and
    :func:`parse_failures` reads). Elsewhere ``fn`` itself."""
    if not os.environ.get("TORCHELASTIC_ERROR_FILE"):
        return fn
    from torch.distributed.elastic.multiprocessing.errors import record

    return record(fn)


def lock_holder_id(holder: Mapping[str, object]) -> str | None:
    """``host:pid`` of a run lock's holder (its lock file content), None when it names nobody."""
    pid, host = holder.get("pid"), holder.get("host")
    return f"{host}:{pid}" if pid is not None and host else None


def parent_holds_lock(run_path: Path, env: Mapping[str, str] | None = None) -> bool:
    """Whether ``$ASTROLABE_RUN_LOCK_HOLDER`` names the current holder of the run lock (the launching flow)."""
    env = os.environ if env is None else env
    given = env.get(LOCK_HOLDER_ENV)
    return bool(given) and given == lock_holder_id(RunLock(run_path).holder())


@contextmanager
def stage_lock(run_path: Path) -> Iterator[None]:
    """The run lock for a single-stage command: :func:`astrolabe.distributed.rank0_run_lock`, unless the process
    that launched this job holds it (rank 0 decides, every rank follows)."""
    ctx = current_context()
    inherited = broadcast_object(parent_holds_lock(run_path) if ctx.is_main else None)
    if inherited:
        log.info("run lock held by the launching process %s", os.environ.get(LOCK_HOLDER_ENV))
        yield
        return
    with rank0_run_lock(run_path):
        yield

