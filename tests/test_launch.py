"""The flow launching distributed stages itself (flows/launch.py, issue 11 point 4).

* unit: layouts from ``resources`` (overrides, main stages at 1), the torchrun / srun commands, the Slurm node
  list, torchrun's failure report -> "rank R: <error line>", the inherited run lock.
* end to end (slow, CPU, gloo): the Prefect train flow with ``resources.nproc_per_node=2`` (every heavy stage a
  2-rank job, one task per stage, adapters equal to the 1-process reference run); then, on copies of that run:
  two torchrun launchers on localhost (``nnodes=2``), the Slurm launcher through a stand-in ``srun``, and a rank
  SIGKILLed in the middle of ``nft_update`` (the launch fails naming it, nothing published, no rank left, the
  rerun equals the uninterrupted update).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import pipeline_helpers as ph
from pipeline_helpers import base, ref  # noqa: F401  (shared fixtures)
from spawn_helpers import free_port
from astrolabe.artifacts.lock import RunLock, RunLockedError
from astrolabe.artifacts.manifest import MANIFEST_NAME
from astrolabe.config import ConfigError, load_config
from flows import launch
from flows.launch import Layout, RankFailure, StageLaunchError
from stages import STAGES

# torchrun 2.13's report of a rank that raised (its error file) and of a rank SIGKILLed (abridged)
REPORT_EXC = """\
torch.distributed.elastic.multiprocessing.errors.ChildFailedError:
============================================================
flows.cli FAILED
------------------------------------------------------------
Failures:
[1]:
  time      : 2026-11-30_10:59:27
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : -15 (pid: 13758)  (SIGTERM)
  error_file: <N/A>
  traceback : Signal 15 (SIGTERM) received by PID 13758
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_10:59:27
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : 1 (pid: 13759)
  error_file: /tmp/torchelastic_056_ygie/none_7wbdpby8/attempt_0/1/error.json
  traceback : Traceback (most recent call last):
    File "/x/errors/__init__.py", line 367, in wrapper
      return f(*args, **kwargs)
    File "/x/stages/score.py", line 8, in run
      raise ValueError("boom on rank 1")
  ValueError: boom on rank 1

============================================================
"""
REPORT_KILL = """\
Failures:
[1]:
  time      : 2026-11-30_10:59:42
  host      : localhost
  rank      : 0 (local_rank: 0)
  exitcode  : 1 (pid: 15308)
  error_file: /tmp/e/0/error.json
  traceback : Traceback (most recent call last):
  RuntimeError: Connection closed by peer [127.0.0.1]:29500
------------------------------------------------------------
Root Cause (first observed failure):
[0]:
  time      : 2026-11-30_10:59:42
  host      : localhost
  rank      : 1 (local_rank: 1)
  exitcode  : -9 (pid: 15309)  (SIGKILL)
  error_file: <N/A>
  traceback : Signal 9 (SIGKILL) received by PID 15309
=======================================================
"""


def tiny(*sets: str):
    return load_config(ph.TINY, list(sets))


# ----------------------------------------------------------------------------------- layouts and commands


def test_stage_layout_from_resources():
    cfg = tiny("resources.nproc_per_node=4", "resources.nnodes=2", "resources.stages={score: {nproc_per_node: 1}}")
    assert launch.stage_layout(cfg, STAGES["rollout"]) == Layout(4, 2) and Layout(4, 2).world_size == 8
    assert launch.stage_layout(cfg, STAGES["nft_update"]).world_size == 8
    assert launch.stage_layout(cfg, STAGES["score"]) == Layout(1, 2)  # the per-stage override wins
    for main in ("filter_prompts", "label_uncertainty"):  # rank 0 only: never launched
        assert launch.stage_layout(cfg, STAGES[main]) == Layout(1, 1)
    assert launch.stage_layout(tiny(), STAGES["rollout"]).world_size == 1


def test_torchrun_command_single_node_uses_a_free_local_port():
    args = launch.stage_args("nft_update", Path("runs/x"), 3, force=True)
    assert args == ["-m", "flows.cli", "stage", "nft_update", "--run-dir", str(Path("runs/x").resolve()),
                    "--iteration", "3", "--force", "-v"]
    assert launch.stage_args("filter_prompts", Path("/r"), None) == ["-m", "flows.cli", "stage", "filter_prompts",
                                                                     "--run-dir", "/r", "-v"]
    cmd = launch.job_command(tiny("resources.nproc_per_node=2"), Layout(2, 1), args, "x-nft_update-3", env={})
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    i = cmd.index("--rdzv_endpoint")
    host, port = cmd[i + 1].rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0 and int(port) != 29500
    assert cmd[3:i + 1] == ["--nnodes", "1", "--nproc_per_node", "2", "--max-restarts", "0", "--rdzv_backend",
                            "c10d", "--rdzv_endpoint"]
    assert cmd[i + 2:] == ["--rdzv_id", "x-nft_update-3", *args]
    assert launch.rdzv_id(Path("/runs/my run"), "score", 0) == "my_run-score-0"


def test_multi_node_torchrun_uses_the_configured_endpoint():
    cfg = tiny("resources.nnodes=2", "resources.rdzv_endpoint=node0:29400")
    cmd = launch.job_command(cfg, Layout(1, 2), ["-m", "flows.cli"], "j", env={})
    assert cmd[3:] == ["--nnodes", "2", "--nproc_per_node", "1", "--max-restarts", "0", "--rdzv_backend", "c10d",
                       "--rdzv_endpoint", "node0:29400", "--rdzv_id", "j", "-m", "flows.cli"]


def test_slurm_command_inside_an_allocation():
    cfg = tiny("resources.launcher=slurm", "resources.nnodes=2", "resources.nproc_per_node=8",
               "resources.rdzv_endpoint=ignored:29555")
    env = {"SLURM_JOB_NODELIST": "gpu-[007-008]", "SLURM_NNODES": "2"}
    cmd = launch.job_command(cfg, Layout(8, 2), ["-m", "flows.cli"], "j", env=env)
    assert cmd[:7] == ["srun", "--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1", sys.executable]
    assert cmd[7:] == ["-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "8", "--max-restarts", "0",
                       "--rdzv_backend", "c10d", "--rdzv_endpoint", "gpu-007:29555", "--rdzv_id", "j", "-m",
                       "flows.cli"]


def test_slurm_outside_an_allocation_or_too_small_is_a_clear_error():
    cfg = tiny("resources.launcher=slurm", "resources.nnodes=2")
    with pytest.raises(ConfigError, match=r"not inside a Slurm allocation.*inside `salloc --nodes N"):
        launch.job_command(cfg, Layout(1, 2), [], "j", env={})
    with pytest.raises(ConfigError, match=r"allocation has 1 node\(s\) but the stage needs resources.nnodes=2"):
        launch.job_command(cfg, Layout(1, 2), [], "j", env={"SLURM_JOB_NODELIST": "a1", "SLURM_JOB_NUM_NODES": "1"})


@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"), ("gpu-[003-005,9],cpu1", "gpu-003"), ("n[1-2]-ib", "n1-ib"), ("a,b", "a"),
    ("c[12,4]", "c12"), ("10.0.0.[5-6]", "10.0.0.5"),
])  # fmt: skip
def test_first_node_of_a_slurm_node_list(nodelist, first):
    assert launch.first_node(nodelist) == first


# ----------------------------------------------------------------------------------- failure report


def test_parse_failures_root_cause_first_with_its_error_line():
    assert launch.parse_failures(REPORT_EXC.splitlines()) == [
        RankFailure(1, 1, "ValueError: boom on rank 1"),
        RankFailure(0, -15, "Signal 15 (SIGTERM) received by PID 13758"),
    ]  # fmt: skip
    assert launch.parse_failures(REPORT_KILL.splitlines())[0] == RankFailure(
        1, -9, "Signal 9 (SIGKILL) received by PID 15309"
    )
    assert launch.parse_failures(["no report", "at all"]) == []


def test_failure_message_names_the_rank():
    msg = launch.failure_message("score (iteration 0)", Layout(2, 1), 1, ["noise", *REPORT_EXC.splitlines()])
    assert msg.startswith("score (iteration 0) failed in its 2-rank job (exit code 1); nothing was published: "
                          "rank 1: ValueError: boom on rank 1.")
    assert "SIGTERM" not in msg  # the ranks torchrun stopped afterwards are not failures of their own
    msg = launch.failure_message("nft_update (iteration 0)", Layout(2, 1), 1, REPORT_KILL.splitlines())
    assert "rank 1: Signal 9 (SIGKILL) received by PID 15309 (then rank 0: RuntimeError: Connection closed" in msg
    msg = launch.failure_message("x", Layout(2, 1), 2, ["a", "srun: error: bad"])
    assert "printed no failure report" in msg and msg.endswith("a\nsrun: error: bad")


# ----------------------------------------------------------------------------------- run lock


def test_stage_lock_is_inherited_only_from_the_named_holder(tmp_path, monkeypatch):
    me = launch.job_env({})[launch.LOCK_HOLDER_ENV]
    assert me == f"{socket.gethostname()}:{os.getpid()}"
    with RunLock(tmp_path):  # this process plays the launching flow
        monkeypatch.setenv(launch.LOCK_HOLDER_ENV, me)
        with launch.stage_lock(tmp_path):
            pass
        monkeypatch.setenv(launch.LOCK_HOLDER_ENV, "otherhost:1")
        with pytest.raises(RunLockedError), launch.stage_lock(tmp_path):
            pass  # a holder the job was not launched by: the lock is taken (and refused)
    with launch.stage_lock(tmp_path):  # nobody holds it: taken as before
        assert RunLock(tmp_path).holder()["pid"] == os.getpid()


# ----------------------------------------------------------------------------------- end to end

FLOW_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import astrolabe
    from flows.train import train
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterTaskRunId

    state = train(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), nproc_per_node=2, return_state=True)
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        nft = [t.id for t in runs if t.name.startswith("nft_update")]
        logs = client.read_logs(log_filter=LogFilter(task_run_id=LogFilterTaskRunId(any_=nft)))
    print("RESULT " + json.dumps({"state": state.type.value, "tasks": sorted(t.name for t in runs),
                                  "nft_log": [l.message for l in logs]}))
    """
)
HEAVY = ("rollout", "score", "nft_update", "evaluate")


@pytest.fixture(scope="module")
def prefect2(tmp_path_factory):
    """The Prefect train flow, 1 iteration, ``nproc_per_node=2``, in a subprocess (temporary local server)."""
    from test_flows_prefect import prefect_env

    b = ph.base_dir(tmp_path_factory)
    tmp = tmp_path_factory.mktemp("prefect2")
    sets = [*ph.SMALL_OVERRIDES, "pipeline.iterations=1", f"pipeline.runs_root={b / 'runs'}"]
    env = {**prefect_env(tmp), "MLFLOW_TRACKING_URI": ph.mlflow_uri(b), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", FLOW_SCRIPT, str(ph.TINY), "prefect2", json.dumps(sets)],
                          cwd=ph.REPO, env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    assert proc.returncode == 0, f"flow failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1].removeprefix("RESULT "))
    return b / "runs" / "prefect2", out


@pytest.mark.slow
def test_prefect_flow_runs_every_heavy_stage_on_two_ranks(prefect2, ref):
    from test_flows_prefect import EXPECTED_TASKS, base_task_name

    run, out = prefect2
    assert out["state"] == "COMPLETED"
    assert sorted(base_task_name(n) for n in out["tasks"]) == sorted(EXPECTED_TASKS)  # one task per stage, as at 1
    for stage, its in (("rollout", [0]), ("score", [0]), ("nft_update", [0]), ("evaluate", [0, 1]),
                       ("filter_prompts", [None]), ("label_uncertainty", [0])):  # fmt: skip
        for it in its:
            m = json.loads((ph.node_dir(run, stage, it) / MANIFEST_NAME).read_text())
            assert m["world_size"] == (2 if stage in HEAVY else 1), (stage, it)
            assert ph.node_dir(run, stage, it).name == ph.node_dir(ref, stage, it).name  # same keys as 1 process
    assert any("[rank 1] stages.nft_update" in line for line in out["nft_log"])  # the job's output, in the task log
    worst = max_diff(ph.node_dir(run, "nft_update", 0), ph.node_dir(ref, "nft_update", 0))
    print(f"nproc_per_node=2 (Prefect) vs 1 process: adapters max abs diff {worst:.3g}")
    assert worst <= 1e-5
    assert ph.temporary_dirs(run) == []


def max_diff(a: Path, b: Path) -> float:
    ta, tb = ph.checkpoint_tensors(a), ph.checkpoint_tensors(b)
    assert set(ta) == set(tb) and any("adapters/old.safetensors" in k for k in ta)
    return max(float((ta[k].double() - tb[k].double()).abs().max()) for k in ta)


def _score_job(run: Path, extra: list[str]) -> tuple:
    """The run's config with ``extra`` resources, the score stage and its current inputs (iteration 0)."""
    cfg = load_config(run / "config.yaml", extra)
    return cfg, STAGES["score"], {"rollout": ph.node_dir(run, "rollout", 0)}


@pytest.mark.slow
def test_two_torchrun_launchers_on_localhost_complete_a_stage(prefect2):
    """nnodes=2, one process each: the flow's launcher and a second node started by hand, c10d on 127.0.0.1."""
    run = ph.copy_run(prefect2[0], "twonodes")
    port = free_port()
    cfg, stage, inputs = _score_job(run, ["resources.nnodes=2", "resources.nproc_per_node=1",
                                          f"resources.rdzv_endpoint=127.0.0.1:{port}"])
    before = json.loads((ph.node_dir(run, "score", 0) / MANIFEST_NAME).read_text())
    layout = launch.stage_layout(cfg, stage)
    other = launch.job_command(cfg, layout, launch.stage_args("score", run, 0, force=True),
                               launch.rdzv_id(run, "score", 0))  # what the log tells the other node to run
    lines: list[str] = []
    node1_log = run.parent / "twonodes-node1.log"
    with RunLock(run), open(node1_log, "w") as fh:
        node1 = subprocess.Popen(other, env=launch.job_env(), cwd=ph.REPO, stdout=fh, stderr=subprocess.STDOUT)
        m = launch.launch_stage(cfg, run, stage, inputs, 0, force=True, log_line=lines.append)
        node1.wait(timeout=120)
    rest = node1_log.read_text()
    assert node1.returncode == 0, rest[-3000:]
    assert m.world_size == 2 and m.created != before["created"] and m.key == before["key"]
    assert any("[rank 0] stages.score" in ln for ln in lines + rest.splitlines())
    assert any("[rank 1] stages.score" in ln for ln in lines + rest.splitlines())
    assert m.counts == before["counts"]


SRUN = """#!/bin/bash
# stand-in srun: records its arguments, starts the command once per node locally (SLURM_NODEID = i)
echo "$@" > "$(dirname "$0")/srun-args.txt"
nodes=1
while [[ $# -gt 0 && "$1" == -* ]]; do
  case "$1" in --nodes) nodes=$2; shift 2;; --ntasks-per-node) shift 2;; *) shift;; esac
done
pids=()
for ((i = 0; i < nodes; i++)); do SLURM_NODEID=$i SLURM_PROCID=$i "$@" & pids+=($!); done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=$?; done
exit $rc
"""


@pytest.mark.slow
def test_slurm_launcher_with_a_stand_in_srun(prefect2, tmp_path, monkeypatch):
    run = ph.copy_run(prefect2[0], "slurm2")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(SRUN)
    (bin_dir / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost")
    monkeypatch.setenv("SLURM_NNODES", "2")
    endpoint = f"resources.rdzv_endpoint=127.0.0.1:{free_port()}"
    cfg, stage, inputs = _score_job(run, ["resources.launcher=slurm", "resources.nnodes=2",
                                          "resources.nproc_per_node=1", endpoint])
    lines: list[str] = []
    with RunLock(run):
        m = launch.launch_stage(cfg, run, stage, inputs, 0, force=True, log_line=lines.append)
    assert m.world_size == 2
    args = (bin_dir / "srun-args.txt").read_text().split()
    assert args[:5] == ["--nodes", "2", "--ntasks-per-node", "1", "--kill-on-bad-exit=1"]
    assert args[args.index("--rdzv_endpoint") + 1].startswith("localhost:")
    assert any("[rank 1] stages.score" in ln for ln in lines)


def _rank_pids(holder: str) -> dict[int, int]:
    """``{rank: pid}`` of the live stage processes launched with ``holder`` as the lock holder."""
    out = {}
    for env_file in Path("/proc").glob("[0-9]*/environ"):
        try:
            raw = env_file.read_bytes().decode(errors="replace").split("\0")
            env = dict(kv.split("=", 1) for kv in raw if "=" in kv)
            state = (env_file.parent / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if env.get(launch.LOCK_HOLDER_ENV) == holder and "RANK" in env and state != "Z":
            out[int(env["RANK"])] = int(env_file.parent.name)
    return out


@pytest.mark.slow
def test_sigkill_of_a_rank_in_nft_update_fails_naming_it_and_the_rerun_equals(prefect2):
    src = prefect2[0]
    run = ph.copy_run(src, "killrank")
    ph.delete_nodes(run, [("nft_update", 0), ("evaluate", 1)])
    cfg = load_config(run / "config.yaml")
    inputs = {"rollout": ph.node_dir(run, "rollout", 0), "labels": ph.node_dir(run, "label_uncertainty", 0)}
    holder = launch.job_env({})[launch.LOCK_HOLDER_ENV]
    killed: list[int] = []
    seen: list[int] = []

    def log_line(line: str) -> None:  # rank 1 has started training: kill it
        if not killed and "[rank 1] stages.nft_update" in line:
            pids = _rank_pids(holder)
            seen.extend(pids.values())
            os.kill(pids[1], signal.SIGKILL)
            killed.append(pids[1])

    with RunLock(run):
        with pytest.raises(StageLaunchError) as info:
            launch.launch_stage(cfg, run, STAGES["nft_update"], inputs, 0, log_line=log_line)
    msg = str(info.value)
    print(f"the launch after SIGKILL of rank 1: {msg}")
    assert killed and f"rank 1: Signal 9 (SIGKILL) received by PID {killed[0]}" in msg, msg
    assert "nft_update (iteration 0) failed in its 2-rank job" in msg and "nothing was published" in msg
    assert not (ph.stage_root(run, "nft_update", 0)).exists() or not [
        p for p in ph.stage_root(run, "nft_update", 0).iterdir() if (p / MANIFEST_NAME).is_file()
    ]
    assert len(seen) == 2 and _rank_pids(holder) == {}  # torchrun stopped rank 0 too: no rank left
    with RunLock(run):
        m = launch.launch_stage(cfg, run, STAGES["nft_update"], inputs, 0)
    assert m.world_size == 2
    worst = max_diff(ph.node_dir(run, "nft_update", 0), ph.node_dir(src, "nft_update", 0))
    print(f"rerun after SIGKILL vs uninterrupted: adapters max abs diff {worst:.3g}")
    assert worst <= 1e-6 and ph.temporary_dirs(run) == []


def test_launch_in_process_at_world_size_1(tmp_path, monkeypatch):
    """World size 1 (or already inside a torchrun job) never starts a subprocess."""
    calls = []
    monkeypatch.setattr(launch, "execute", lambda *a, **k: calls.append(a[0].STAGE.name) or "manifest")
    monkeypatch.setattr(launch, "launch_stage", lambda *a, **k: pytest.fail("launched"))
    cfg = tiny("resources.stages={rollout: {nproc_per_node: 1}}", "resources.nproc_per_node=2")
    assert launch.run_node(cfg, tmp_path, "rollout", 0, {}) == "manifest"
    assert launch.run_node(cfg, tmp_path, "label_uncertainty", 0, {}) == "manifest"
    assert calls == ["rollout", "label_uncertainty"]


def test_prefect_engine_under_torchrun_points_to_resources(tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "COLUMNS": "300"}
    res = CliRunner().invoke(app, ["train", str(ph.TINY), "--set", f"pipeline.runs_root={tmp_path}"], env=env)
    assert res.exit_code == 2 and "--engine prefect cannot run under torchrun" in res.output
    assert "astrolabe train CONFIG --set resources.nproc_per_node=N" in res.output


@pytest.mark.slow
def test_a_rank_error_fails_the_launch_with_that_ranks_error_line(prefect2):
    """A Python error on the ranks (here: a damaged input) reaches the caller as "rank R: <error line>" through
    the ranks' error files (``record``) and torchrun's report; nothing is published."""
    run = ph.copy_run(prefect2[0], "rankerror")
    shard = sorted(ph.node_dir(run, "rollout", 0).glob("*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size, other checksum
    shard.write_bytes(bytes(data))
    cfg, stage, inputs = _score_job(run, [])
    before = json.loads((ph.node_dir(run, "score", 0) / MANIFEST_NAME).read_text())
    with RunLock(run), pytest.raises(StageLaunchError) as info:
        launch.launch_stage(cfg, run, stage, inputs, 0, force=True, log_line=lambda line: None)
    msg = str(info.value)
    print(f"the launch with a damaged input: {msg}")
    assert re.search(r"failed in its 2-rank job \(exit code 1\); nothing was published: "
                     r"rank [01]: [\w.]*StageInputError: input 'rollout' of score\[0\] \(rollout\[0\]\) is damaged",
                     msg), msg
    assert json.loads((ph.node_dir(run, "score", 0) / MANIFEST_NAME).read_text())["created"] == before["created"]


def test_run_job_streams_lines_and_returns_the_exit_code(tmp_path):
    seen: list[str] = []
    script = "import sys; print('a'); print('b', file=sys.stderr); sys.exit(3)"
    code, lines = launch.run_job([sys.executable, "-c", script], launch.job_env(), seen.append)
    assert code == 3 and lines == seen and sorted(seen) == ["a", "b"]
