"""MLflow tracking: start, resume, params/metrics/artifacts read back, run comparison."""

from __future__ import annotations

from pathlib import Path

import pytest

from astrolabe.tracking import (
    MAX_PARAM_VALUE,
    RUN_ID_FILE,
    TRUNCATION_MARKER,
    Tracker,
    TrackingConfig,
    compare_runs,
    flatten_params,
    plot_curves,
    resolve_tracking_uri,
)


def test_config_rejects_file_store_and_relative_sqlite():
    with pytest.raises(ValueError, match="file store"):
        TrackingConfig(tracking_uri="file:///tmp/mlruns")
    with pytest.raises(ValueError, match="file store"):
        TrackingConfig(tracking_uri="./mlruns")
    with pytest.raises(ValueError, match="four slashes"):
        TrackingConfig(tracking_uri="sqlite:///mlflow.db")
    assert TrackingConfig(tracking_uri="http://127.0.0.1:5000").tracking_uri == "http://127.0.0.1:5000"


def test_resolve_tracking_uri_order(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(TrackingConfig(), tmp_path / "runs") == f"sqlite:///{tmp_path}/runs/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////env/mlflow.db")
    assert resolve_tracking_uri(TrackingConfig(), tmp_path) == "sqlite:////env/mlflow.db"
    explicit = TrackingConfig(tracking_uri="sqlite:////cfg/mlflow.db")
    assert resolve_tracking_uri(explicit, tmp_path) == "sqlite:////cfg/mlflow.db"


def test_flatten_params_and_truncation():
    flat = flatten_params({"model": {"name": "wan", "lora": {"rank": 32}}, "rewards": ["hps", "motion"],
                           "empty": {}, "none": None, "long": "x" * 7000})
    assert flat["model.name"] == "wan" and flat["model.lora.rank"] == "32"
    assert flat["rewards"] == '["hps", "motion"]' and flat["empty"] == "{}" and flat["none"] == "None"
    assert len(flat["long"]) == MAX_PARAM_VALUE and flat["long"].endswith(TRUNCATION_MARKER)
    assert flat["long"][: MAX_PARAM_VALUE - len(TRUNCATION_MARKER)] == "x" * (MAX_PARAM_VALUE - len(TRUNCATION_MARKER))


def test_plot_curves_writes_png(tmp_path):
    out = plot_curves({"reward/hpsv2/mean": [(2, 0.3), (1, 0.1)], "loss/policy": [(1, 1.0)]}, tmp_path / "c.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_disabled_tracker_is_noop(tmp_path):
    for tracker in (Tracker(TrackingConfig(enabled=False), tmp_path), Tracker(TrackingConfig(), tmp_path, rank=1)):
        assert tracker.start_or_resume("r", tmp_path / "r") is None
        tracker.log_params({"a": 1})
        tracker.log_metrics({"m": 1.0}, step=0)
        tracker.log_curves({"m": [(0, 1.0)]})
        tracker.set_tags({"t": "x"})
        tracker.end()
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


def test_start_log_resume_and_compare(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    cfg = TrackingConfig(tracking_uri=tracking_uri, experiment="exp-test")
    run_dir = tmp_path / "runs" / "demo"
    tracker = Tracker(cfg, tmp_path / "runs")
    run_id = tracker.start_or_resume("demo", run_dir)
    assert (run_dir / RUN_ID_FILE).read_text().strip() == run_id
    tracker.log_params({"rl": {"beta": 0.1, "group_size": 8}, "model": "wan-1.3b"})
    tracker.log_metrics({"reward/hpsv2/mean": 0.2, "loss/policy": 1.5}, step=0)
    tracker.log_metrics({"reward/hpsv2/mean": 0.3}, step=1)
    artifact = tmp_path / "note.txt"
    artifact.write_text("hello")
    tracker.log_artifact(artifact, "notes")
    tracker.log_curves({"reward/hpsv2/mean": [(0, 0.2), (1, 0.3)]}, name="reward.png")
    tracker.set_tags({"base_model": "self_forcing"})
    tracker.end()

    client = MlflowClient(tracking_uri=tracking_uri)
    run = client.get_run(run_id)
    assert run.info.run_name == "demo" and run.info.status == "FINISHED"
    assert run.data.params == {"rl.beta": "0.1", "rl.group_size": "8", "model": "wan-1.3b"}
    assert run.data.tags["base_model"] == "self_forcing"
    hist = client.get_metric_history(run_id, "reward/hpsv2/mean")
    assert [(m.step, m.value) for m in sorted(hist, key=lambda m: m.step)] == [(0, 0.2), (1, 0.3)]
    assert {a.path for a in client.list_artifacts(run_id, "notes")} == {"notes/note.txt"}
    assert {a.path for a in client.list_artifacts(run_id, "plots")} == {"plots/reward.png"}
    local = client.download_artifacts(run_id, "notes/note.txt", str(tmp_path / "dl"))
    assert Path(local).read_text() == "hello"
    assert Path(run.info.artifact_uri.removeprefix("file://")).is_relative_to(Path(tracking_uri[10:]).parent)

    resumed = Tracker(cfg, tmp_path / "runs")
    assert resumed.start_or_resume("demo", run_dir) == run_id
    assert client.get_run(run_id).info.status == "RUNNING"
    resumed.log_params({"rl": {"beta": 0.2}, "new_knob": 1})  # changed value -> tag, new param -> logged
    resumed.log_metrics({"reward/hpsv2/mean": 0.5}, step=2)
    resumed.end()

    other = Tracker(cfg, tmp_path / "runs")
    other.start_or_resume("baseline", tmp_path / "runs" / "baseline")
    other.log_params({"rl": {"beta": 0.0}})
    other.log_metrics({"reward/hpsv2/mean": 0.1}, step=5)
    other.end("FAILED")

    rows = compare_runs(["demo", "baseline"], tracking_uri, experiment="exp-test", param_keys=["rl.beta"])
    assert [(r["run_name"], r["status"]) for r in rows] == [("demo", "FINISHED"), ("baseline", "FAILED")]
    assert rows[0]["params"] == {"rl.beta": "0.1"} and rows[1]["params"] == {"rl.beta": "0.0"}
    assert rows[0]["metrics"] == {"reward/hpsv2/mean": 0.5, "loss/policy": 1.5}
    run = client.get_run(run_id)
    assert run.data.params["new_knob"] == "1" and run.data.tags["resume.changed.rl.beta"] == "0.2"
    assert [r["run_name"] for r in compare_runs(None, tracking_uri, experiment="exp-test")] == ["baseline", "demo"]
    assert compare_runs(None, tracking_uri, experiment="no-such-experiment") == []


def test_resume_with_unknown_run_id_is_an_error(tmp_path, tracking_uri):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / RUN_ID_FILE).write_text("0123456789abcdef0123456789abcdef\n")
    tracker = Tracker(TrackingConfig(tracking_uri=tracking_uri), tmp_path)
    with pytest.raises(RuntimeError, match="delete .*mlflow_run_id.txt"):
        tracker.start_or_resume("r", run_dir)


class _RecordingTracker:
    def __init__(self) -> None:
        self.metrics: list[tuple[dict, int]] = []
        self.artifacts: list[tuple[Path, str]] = []

    def log_metrics(self, metrics: dict, step: int) -> None:
        self.metrics.append((dict(metrics), step))

    def log_artifact(self, path: Path, where: str) -> None:
        self.artifacts.append((path, where))


def test_run_logger_logs_what_the_manifest_carries_whatever_the_stage(tmp_path):
    """flows.run.RunLogger knows no stage: a made-up one gets its typed metrics and reports logged, once."""
    from astrolabe.artifacts.manifest import Manifest
    from astrolabe.artifacts.plan import Node, NodeResult, RunResults
    from flows.run import LOGGED_FILE, RunLogger, eval_summary

    metrics = {"time/made_up": 2.5, "reward/x/mean": 0.25, "eval/combined/mean": 1.5}
    m = Manifest(stage="made_up", key="k1", iteration=3, timings={"total": 2.5}, metrics=metrics,
                 reports={"plot.png": "made_up/iter-0003"})
    res = NodeResult(Node("made_up", 3), m, tmp_path / "out", cached=False)
    tracker = _RecordingTracker()
    logger = RunLogger(tracker, None, tmp_path)  # type: ignore[arg-type]
    logger(res, RunResults())
    logger(res, RunResults())  # already logged: not again
    assert tracker.metrics == [(metrics, 3)]
    assert tracker.artifacts == [(tmp_path / "out" / "plot.png", "made_up/iter-0003")]
    assert (tmp_path / LOGGED_FILE).is_file()
    assert dict(logger.history) == {"reward/x/mean": [(3, 0.25), (3, 0.25)], "eval/combined/mean": [(3, 1.5), (3, 1.5)]}
    assert eval_summary(RunResults({res.node.id: res})) == {3: {"combined/mean": 1.5}}


def test_processes_creating_one_fresh_sqlite_store_at_once_all_succeed(tmp_path):
    """Two ``train`` commands started together used to race in MLflow's schema migrations of a fresh store
    (``AttributeError: dimension_attributes``); ``_client`` creates it under a file lock."""
    import subprocess
    import sys

    uri = "sqlite:///" + str((tmp_path / "runs" / "mlflow.db").resolve())
    code = (
        "import sys; from astrolabe.tracking import _client; "
        f"c = _client({uri!r}); c.search_experiments(); sys.exit(0)"
    )
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert all(rc == 0 for rc, _ in results), [err[-2000:] for rc, err in results if rc]
    assert (tmp_path / "runs" / "mlflow.db").is_file() and (tmp_path / "runs" / "mlflow.db.init.lock").is_file()
