"""Process hygiene: no process outlives ``astrolabe`` however it dies, nothing starts before the inputs are
checked, nothing starts when there is nothing to do, ``up``/``down``, KILLED in MLflow, the progress model.

The ``astrolabe`` subprocesses run with PREFECT_HOME, MLflow and runs/ under tmp_path.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from astrolabe.artifacts.manifest import Manifest
from astrolabe.artifacts.plan import Node, NodeResult, run_plan
from astrolabe.artifacts.stage import StageResult
from astrolabe.artifacts.stagedir import run_dir
from astrolabe.config import load_config
from flows import server as srv
from flows.progress import RunProgress, step_of
from flows.preflight import mark_killed_if_dead, preflight
from flows.run import cached_summary, record_config
from stages import STAGES

REPO = Path(__file__).resolve().parents[1]
FAST = ["pipeline.iterations=1", "pipeline.eval_max_prompts=1", "pipeline.eval_seeds=[1000]",
        "rollout.prompts_per_iteration=2", "rl.epochs=1", "rl.optim.precision=fp32"]  # fmt: skip


def cli() -> list[str]:
    script = Path(sys.executable).parent / "astrolabe"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "flows.cli"]


def env_for(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(PREFECT_HOME=str(tmp / ".prefect"), ASTROLABE_PREFECT_HOME=str(tmp / ".prefect"),
               MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}", MLFLOW_DISABLE_TELEMETRY="true",
               HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))  # fmt: skip
    return env


def train_args(tmp: Path, name: str, *extra: str) -> list[str]:
    sets = [a for s in [*FAST, f"pipeline.runs_root={tmp / 'runs'}", f"name={name}", *extra] for a in ("--set", s)]
    return [*cli(), "train", "configs/tiny.yaml", *sets]


def wait_until(cond, timeout_s: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:] if log else ''}")
        time.sleep(0.1)
    pytest.fail(f"{what}: not within {timeout_s:.0f}s\n{log.read_text()[-3000:] if log else ''}")


def recorded_servers(home: Path) -> list[dict]:
    d = home / srv.PIDFILE_DIR
    out = []
    for f in d.glob("*.json") if d.is_dir() else []:
        try:
            out.append(json.loads(f.read_text()))
        except ValueError:
            pass
    return out


def mlflow_status(tmp: Path, run: Path) -> str:
    from mlflow.tracking import MlflowClient

    run_id = (run / "mlflow_run_id.txt").read_text().strip()
    return MlflowClient(tracking_uri=f"sqlite:///{tmp / 'mlflow.db'}").get_run(run_id).info.status


def sleeper(marker: str = srv.SERVER_APP) -> list[str]:
    """A stand-in server: sleeps, and carries the marker a recorded server is recognised by."""
    return [sys.executable, "-c", "import time; time.sleep(120)", marker]


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ----------------------------------------------------------------------------------- the server child


def test_server_child_dies_with_its_parent(tmp_path):
    """PR_SET_PDEATHSIG: SIGKILL the process that started the server, the kernel kills the server."""
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path; from flows import server as s; "
            f"s.server_command = lambda port: {sleeper()!r}; t = s.start_temporary_server(Path({str(tmp_path)!r})); "
            "print(t.proc.pid, flush=True); import time; time.sleep(120)")  # fmt: skip
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    assert srv.pid_alive(child)
    parent.kill()
    parent.wait()
    wait_until(lambda: not srv.pid_alive(child), 10, "the server child is gone")


def test_stale_server_is_reaped_at_next_start(tmp_path, monkeypatch):
    """A recorded server whose parent is dead is stopped by the next start; one of a live parent is kept."""
    home = tmp_path
    (home / srv.PIDFILE_DIR).mkdir()
    orphan = subprocess.Popen(sleeper(), start_new_session=True)
    owned = subprocess.Popen(sleeper(), start_new_session=True)
    try:
        for p, parent in ((orphan, dead_pid()), (owned, os.getppid())):
            (home / srv.PIDFILE_DIR / f"{p.pid}.json").write_text(json.dumps({"pid": p.pid, "parent": parent}))
        monkeypatch.setattr(srv, "server_command", lambda port: sleeper())
        started = srv.start_temporary_server(home)
        try:
            assert orphan.wait(timeout=15) is not None  # reaped
            assert not (home / srv.PIDFILE_DIR / f"{orphan.pid}.json").exists()
            assert owned.poll() is None and (home / srv.PIDFILE_DIR / f"{owned.pid}.json").exists()
            assert json.loads(started.pidfile.read_text())["parent"] == os.getpid()
        finally:
            started.stop()
        assert started.proc.poll() is not None and not started.pidfile.exists()
    finally:
        for p in (orphan, owned):
            p.kill()
            p.wait()


def test_recycled_pid_is_not_killed(tmp_path):
    """A pidfile whose pid now runs something else (not our server command) leaves that process alone."""
    (tmp_path / srv.PIDFILE_DIR).mkdir()
    other = subprocess.Popen(sleeper(marker="something-else"), start_new_session=True)
    try:
        record = {"pid": other.pid, "parent": dead_pid()}
        (tmp_path / srv.PIDFILE_DIR / f"{other.pid}.json").write_text(json.dumps(record))
        assert srv.reap_stale_servers(tmp_path) == []
        assert other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_slow_start_gives_one_clear_error(tmp_path):
    """A server that never answers: a ServerStartError naming the timeout knob and the log, not a traceback."""
    proc = subprocess.Popen(sleeper())
    try:
        with pytest.raises(srv.ServerStartError, match=srv.STARTUP_TIMEOUT_ENV):
            url = f"http://127.0.0.1:{srv.free_port()}/api/health"
            srv.wait_healthy(proc, url, "test server", tmp_path / "x.log", 1.0)
    finally:
        proc.kill()
        proc.wait()


# ----------------------------------------------------------------------------------- astrolabe train, killed


def start_train(tmp: Path, name: str, log: Path, *extra: str) -> subprocess.Popen:
    with open(log, "wb") as f:
        return subprocess.Popen(train_args(tmp, name, *extra), cwd=REPO, env=env_for(tmp), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip


def running_stage(run: Path) -> bool:
    """A stage's temporary output directory exists (not a file being written atomically, e.g. config.yaml)."""
    return any(p.name.startswith(".") and ".tmp-" in p.name and p.is_dir() for p in run.glob("**/.*"))


@pytest.mark.slow  # ~40 s each on an idle 2-core machine (imports, server start, the first stage)
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_train_leaves_no_process(tmp_path, sig):
    """SIGKILL / SIGTERM of `astrolabe train` (Prefect engine) mid-stage: its Prefect server is gone too.
    SIGTERM marks the MLflow run KILLED at once; after SIGKILL `status` (here: its check) does."""
    log, home, run = tmp_path / "train.log", tmp_path / ".prefect", tmp_path / "runs" / "killme"
    # more iterations than the kill needs: on a loaded machine the poll may first see a late stage running
    proc = start_train(tmp_path, "killme", log, "pipeline.iterations=4")
    try:
        servers = wait_until(lambda: recorded_servers(home), 240, "the server is recorded", proc, log)
        wait_until(lambda: running_stage(run), 240, "a stage runs", proc, log)
        server_pid = servers[0]["pid"]
        assert srv.pid_alive(server_pid)
        os.kill(proc.pid, sig)  # the process only, as a user's `kill` would
        assert proc.wait(timeout=60) == -sig
        wait_until(lambda: not srv.pid_alive(server_pid), 15, "the server is gone")
        if sig == signal.SIGTERM:
            assert mlflow_status(tmp_path, run) == "KILLED"
            assert recorded_servers(home) == []  # stopped cleanly: pidfile removed
            assert "stopped by SIGTERM" in log.read_text()
        else:
            assert mlflow_status(tmp_path, run) == "RUNNING"
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp_path / 'mlflow.db'}"
            try:
                assert mark_killed_if_dead(load_config(run / "config.yaml"), run)
            finally:
                del os.environ["MLFLOW_TRACKING_URI"]
            assert mlflow_status(tmp_path, run) == "KILLED"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


# ----------------------------------------------------------------------------------- nothing to do: no server


def finished_run(runs_root: Path, name: str):
    """A run whose every node is done (stages replaced by no-ops with the real keys); returns its config."""
    cfg = load_config(REPO / "configs" / "tiny.yaml", [*FAST, f"pipeline.runs_root={runs_root}", f"name={name}"])
    noop = {n: SimpleNamespace(STAGE=m.STAGE, run=lambda *args: StageResult()) for n, m in STAGES.items()}
    path = run_dir(runs_root, name)
    path.mkdir(parents=True)
    record_config(path, cfg)
    run_plan(cfg, path, noop)
    return cfg, path


def test_cached_rerun_starts_no_server(tmp_path):
    """A finished run with the same config: nothing runs, no server starts, the summary still prints."""
    cfg, path = finished_run(tmp_path / "runs", "done")
    summary = cached_summary(cfg, *preflight(cfg))
    assert summary is not None and summary.computed_nodes == 0 and summary.cached_nodes == 7
    start = time.monotonic()
    p = subprocess.run(train_args(tmp_path, "done"), cwd=REPO, env=env_for(tmp_path), capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    took = time.monotonic() - start
    assert p.returncode == 0, p.stderr[-3000:]
    assert "0 stages computed, 7 cached" in p.stderr, p.stderr
    assert not (tmp_path / ".prefect" / srv.PIDFILE_DIR).exists()  # no server was ever started
    assert not (tmp_path / "mlflow.db").exists()  # nor MLflow touched
    print(f"cached rerun: {took:.1f}s")


def test_changed_config_is_not_cached(tmp_path):
    cfg, path = finished_run(tmp_path / "runs", "done")
    other = load_config(path / "config.yaml", ["rl.optim.lr=0.5"])
    assert cached_summary(other, *preflight(other)) is None


def test_bad_reward_fails_before_any_server(tmp_path):
    """A misspelt reward name: exit 1 with the registry's message, and no server was started."""
    args = [*train_args(tmp_path, "bad"), "--set", "rewards.rewards=[{name: colourfulnes}]",
            "--set", "rl.selective_kl=null"]
    p = subprocess.run(args, cwd=REPO, env=env_for(tmp_path), capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "unknown reward 'colourfulnes'" in p.stderr, p.stderr[-3000:]
    assert "Traceback" not in p.stderr
    assert not (tmp_path / ".prefect" / srv.PIDFILE_DIR).exists()


# ----------------------------------------------------------------------------------- up / down


def test_up_and_down(tmp_path):
    """`astrolabe up` starts a Prefect server on loopback (its URL answers); `down` stops exactly it."""
    env = {**env_for(tmp_path), srv.STARTUP_TIMEOUT_ENV: "150"}
    p = subprocess.run([*cli(), "up"], cwd=REPO, env=env, capture_output=True, text=True, timeout=200)
    state = srv.read_up_state(tmp_path / ".prefect")
    try:
        assert p.returncode == 0, p.stderr[-3000:]
        assert state is not None and state["prefect"]["url"].startswith("http://127.0.0.1:")
        assert state["prefect"]["url"] in p.stderr
        with urllib.request.urlopen(state["prefect"]["api_url"] + "/health", timeout=5) as r:
            assert r.read().strip() == b"true"
        if not srv.mlflow_server_available():
            assert "starting Prefect only" in p.stderr
        p = subprocess.run([*cli(), "down"], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and "stopped prefect" in p.stderr, p.stderr
        assert not srv.pid_alive(state["prefect"]["pid"])
        assert srv.read_up_state(tmp_path / ".prefect") is None
    finally:
        if state and srv.pid_alive(state["prefect"]["pid"]):
            os.kill(state["prefect"]["pid"], signal.SIGKILL)


# ----------------------------------------------------------------------------------- progress


def _res(node: Node, seconds: float, cached: bool = False) -> NodeResult:
    m = Manifest.model_construct(timings={"total": seconds})
    return NodeResult(node, m, Path("."), cached)


def test_progress_iteration_stage_and_eta():
    """ETA = sum of the remaining nodes' mean stage time; unknown before a computed node; cached nodes are free."""
    nodes = [Node("filter_prompts", None), Node("evaluate", 0)]
    for k in range(2):
        nodes += [Node(s, k) for s in ("rollout", "score", "label_uncertainty", "nft_update")]
        nodes.append(Node("evaluate", k + 1))
    now = [0.0]
    p = RunProgress(nodes, iterations=2, clock=lambda: now[0])
    assert p.describe() == "set-up" and p.eta_s() is None
    p.start(nodes[0])
    p.done(_res(nodes[0], 0.0, cached=True))
    p.start(nodes[1])
    p.done(_res(nodes[1], 10.0))  # evaluate: 10 s; the rest unknown -> mean of all computed (10 s)
    assert p.eta_s() == pytest.approx(10.0 * 10)
    for node, secs in zip(nodes[2:6], (4.0, 1.0, 1.0, 2.0)):
        p.start(node)
        assert p.describe() == f"iteration 1/2 · {node.label}"
        p.done(_res(node, secs))
    # left: evaluate[1] (10), rollout (4), score (1), label (1), nft (2), evaluate[2] (10)
    assert p.eta_s() == pytest.approx(28.0)
    p.start(nodes[6])
    now[0] = 3.0
    assert p.eta_s() == pytest.approx(25.0)  # 3 s of the running evaluation already spent
    assert p.describe() == "iteration 1/2 · evaluate[1]"
    assert [step_of(n) for n in nodes] == [0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2, 2]
