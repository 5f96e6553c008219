"""The Prefect flows end to end, offline: one tiny run in local (temporary server) mode, and the same run
through ``deploy/prefect.yaml`` (server + process work pool + worker; marked slow).

Both run Prefect in subprocesses with PREFECT_HOME, MLflow and runs/ under tmp_path, so nothing is
written into the repo or ``~``, and this pytest process never imports prefect.
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
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).parent / "prefect")
TINY = [
    "pipeline.iterations=1",
    "pipeline.eval_max_prompts=1",
    "pipeline.eval_seeds=[1000]",
    "rollout.prompts_per_iteration=2",
    "rl.optim.precision=fp32",
]
# One iteration: filter, evaluate the base policy (0), the four training stages, evaluate policy 1.
EXPECTED_TASKS = {
    "filter_prompts", "evaluate-it0", "rollout-it0", "score-it0", "label_uncertainty-it0", "nft_update-it0",
    "evaluate-it1",
}  # fmt: skip
EXPECTED_STAGES = {"filter_prompts", "rollout", "score", "label_uncertainty", "nft_update", "evaluate"}


def prefect_env(tmp: Path) -> dict[str, str]:
    """The parent's environment, with every Prefect/MLflow file under ``tmp`` and no API URL (local mode)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "PYTEST_CURRENT_TEST"}
    env.update(
        PREFECT_HOME=str(tmp / ".prefect"),
        ASTROLABE_PREFECT_HOME=str(tmp / ".prefect"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp / 'mlflow.db'}",
        MLFLOW_DISABLE_TELEMETRY="true",
        HF_HUB_OFFLINE="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_UI_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
        PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW="ignore",
        PYTHONPATH=os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    )
    return env


def tiny_overrides(runs_root: Path) -> list[str]:
    return [*TINY, f"pipeline.runs_root={runs_root}"]


def base_task_name(name: str) -> str:
    """Prefect suffixes task-run names with 3 hex digits (``score-it0-a79``); strip it."""
    return re.sub(r"-[0-9a-f]{3}$", "", name)


def check_summary(summary: dict, run_path: Path) -> None:
    """A fresh one-iteration run: every node computed, each stage timed, both policies evaluated."""
    assert summary["run_path"] == str(run_path)
    assert summary["computed_nodes"] == len(EXPECTED_TASKS) and summary["cached_nodes"] == 0
    assert set(summary["stage_seconds"]) == EXPECTED_STAGES
    assert all(s > 0 for s in summary["stage_seconds"].values())
    assert set(summary["eval"]) == {"0", "1"}
    assert all("combined/mean" in m for m in summary["eval"].values())  # the evaluate outputs' eval/ metrics
    evals = [json.loads(p.read_text()) for p in run_path.glob("iter-*/evaluate/*/manifest.json")]
    assert sorted(m["iteration"] for m in evals) == [0, 1]
    assert all(m["counts"]["videos"] == 1 for m in evals)  # eval_max_prompts=1 x 1 seed
    on_disk = json.loads((run_path / "run-summary.json").read_text())
    assert on_disk == summary


FLOW_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import astrolabe
    from flows.train import train
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    state = train(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), return_state=True)
    summary = state.result()
    flow_run_id = state.state_details.flow_run_id
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        flow_state = client.read_flow_run(flow_run_id).state.type.value
    tasks = [[t.name, t.state.type.value] for t in runs]
    print("RESULT " + json.dumps({"summary": summary, "tasks": tasks, "flow_state": flow_state}))
    """
)


def test_train_flow_local_mode(tmp_path):
    """``flows.train.train`` with a temporary local server: completes, writes the summary, one task run per node."""
    runs = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-c", FLOW_SCRIPT, "configs/tiny.yaml", "flowtest", json.dumps(tiny_overrides(runs))],
        cwd=REPO, env=prefect_env(tmp_path), capture_output=True, text=True, timeout=400,
    )  # fmt: skip
    assert proc.returncode == 0, f"flow failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    out = json.loads(line.removeprefix("RESULT "))

    check_summary(out["summary"], runs / "flowtest")
    assert out["flow_state"] == "COMPLETED"
    names = [base_task_name(n) for n, _ in out["tasks"]]
    assert sorted(names) == sorted(EXPECTED_TASKS)  # each node exactly once, named <stage>[-it<k>]
    assert {s for _, s in out["tasks"]} == {"COMPLETED"}
    assert (tmp_path / ".prefect" / "prefect.db").is_file()  # the flow used the tmp PREFECT_HOME


# ----------------------------------------------------------------------------------- deployments


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else "<no log>"


def start(cmd: list[str], log: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen:
    """A background process in its own session (so its whole group can be signalled), output to ``log``."""
    with open(log, "wb") as fh:
        return subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True)


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (from /proc), including ones in their own session."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def stop(procs: list[tuple[subprocess.Popen, int]], grace_s: float = 20.0) -> None:
    """Signal each process group, wait up to ``grace_s`` for all of them, then SIGKILL what is left
    (the groups and any descendant that started its own session, e.g. a worker's flow-run process)."""
    strays = {p.pid: descendants(p.pid) for p, _ in procs}
    for proc, sig in procs:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + grace_s
    for proc, _ in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
        for kill, target in [(os.killpg, proc.pid), *[(os.kill, c) for c in strays[proc.pid]]]:
            try:
                kill(target, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=10)


def wait_healthy(server: subprocess.Popen, url: str, log: Path, timeout_s: float = 90.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"prefect server exited with rc {server.returncode}; log tail:\n{tail(log)}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200 and r.read().strip() == b"true":
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"prefect server not healthy at {url} after {timeout_s:.0f}s; log tail:\n{tail(log)}")


@pytest.mark.slow
def test_train_deployment_through_worker(tmp_path):
    """deploy/prefect.yaml on a local server: create the pool, deploy all, run astrolabe-train on a worker."""
    env = prefect_env(tmp_path)
    env.pop("ASTROLABE_REPO", None)  # the build step must fall back to the directory `prefect deploy` runs in
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    procs: list[tuple[subprocess.Popen, int]] = []

    def cli(*args: str, timeout: float = 120.0, cwd: Path = REPO) -> str:
        try:
            p = subprocess.run([PREFECT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"`prefect {' '.join(args)}` timed out after {timeout}s:\n{e.stdout}\nworker log:\n"
                        f"{tail(worker_log)}\nserver log:\n{tail(server_log)}")  # fmt: skip
        out = p.stdout + p.stderr
        assert p.returncode == 0, (
            f"`prefect {' '.join(args)}` rc {p.returncode}:\n{out[-5000:]}\nworker log:\n{tail(worker_log)}"
            f"\nserver log:\n{tail(server_log, 2000)}"
        )
        return out

    try:
        server = start([PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                       server_log, env, tmp_path)  # fmt: skip
        procs.append((server, signal.SIGTERM))
        wait_healthy(server, url, server_log)
        env["PREFECT_API_URL"] = url

        cli("work-pool", "create", "astrolabe-local", "--type", "process")
        # The worker runs outside the repo: the deployment's pull step must chdir there.
        worker = start([PREFECT, "worker", "start", "--pool", "astrolabe-local"], worker_log, env, tmp_path)
        procs.insert(0, (worker, signal.SIGINT))  # SIGTERM does not stop a Prefect 3.8 worker
        out = cli("--no-prompt", "deploy", "--all", "--prefect-file", "deploy/prefect.yaml")
        for flow, dep in [("train", "astrolabe-train"), ("rescore", "astrolabe-rescore"),
                          ("evaluate", "astrolabe-evaluate")]:  # fmt: skip
            assert f"Deployment '{flow}/{dep}' successfully created" in re.sub(r"[\s│]+", " ", out), out

        runs = tmp_path / "runs"
        params = {"run_name": "deptest", "overrides": tiny_overrides(runs)}  # config: the deployment default
        out = cli("deployment", "run", "train/astrolabe-train", "--params", json.dumps(params),
                  "--watch", "--watch-timeout", "240", timeout=300, cwd=tmp_path)  # fmt: skip
        assert "Flow run finished successfully in 'Completed'" in out, out[-3000:]
        assert worker.poll() is None, f"worker died:\n{tail(worker_log)}"
        assert "set_working_directory' completed successfully" in tail(worker_log, 100_000)
        summary = json.loads((runs / "deptest" / "run-summary.json").read_text())
        check_summary(summary, runs / "deptest")
        assert not (REPO / "runs" / "deptest").exists()
    finally:
        stop(procs)
