"""MLflow tracking: one MLflow run per training run, resumable, plus a run comparison table.

MLflow is imported lazily inside functions, so ``import astrolabe.tracking`` stays light.

Where runs are recorded (first match wins):
1. ``TrackingConfig.tracking_uri``;
2. the ``MLFLOW_TRACKING_URI`` environment variable;
3. ``sqlite:///<runs_root>/mlflow.db`` (absolute), with artifacts in ``<runs_root>/mlartifacts``.

MLflow's own defaults are relative to the working directory and its file store (``file:``) is
disabled in 3.x, so both are rejected with a message saying what to use instead. The MLflow run id
is kept in ``<run_dir>/mlflow_run_id.txt``: resuming a training run continues the same MLflow run.
Only rank 0 logs; on other ranks, or when ``enabled=False``, :class:`Tracker` is a no-op with the
same API.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Any

from pydantic import Field, field_validator

from astrolabe.artifacts.atomic import write_text
from astrolabe.configbase import Frozen

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id.txt"
MAX_PARAM_VALUE = 6000  # MLflow's limit on a param value
TRUNCATION_MARKER = "...[truncated]"
_MAX_PARAMS_PER_BATCH = 100
_MAX_METRICS_PER_BATCH = 1000


def _check_uri(uri: str) -> str:
    if uri.startswith("file:") or "://" not in uri:
        raise ValueError(
            f"tracking_uri {uri!r} uses MLflow's file store, which MLflow 3 disables; use a database such as "
            "'sqlite:////abs/path/mlflow.db' or a server 'http://host:port'"
        )
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        raise ValueError(
            f"tracking_uri {uri!r} is a relative sqlite path (it depends on the working directory); "
            "use an absolute one: 'sqlite:////abs/path/mlflow.db' (four slashes)"
        )
    return uri


class TrackingConfig(Frozen):
    """MLflow tracking settings."""

    enabled: bool = Field(True, description="log to MLflow; False makes the tracker a no-op")
    tracking_uri: str | None = Field(
        None, description="None: $MLFLOW_TRACKING_URI, else sqlite:///<runs_root>/mlflow.db"
    )
    experiment: str = Field("astrolabe", min_length=1, description="MLflow experiment holding all runs")

    @field_validator("tracking_uri")
    @classmethod
    def _valid_uri(cls, v: str | None) -> str | None:
        return None if v is None else _check_uri(v)


def quiet_mlflow_env() -> None:
    """Environment defaults for quiet, offline MLflow use (existing values are kept)."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")  # no warning when git is missing
    warnings.filterwarnings("ignore", message=".*noload.*loader strategy")  # SQLAlchemy 2.1 deprecation noise
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def resolve_tracking_uri(config: TrackingConfig, runs_root: str | os.PathLike[str]) -> str:
    """The tracking URI for ``config`` (see module docstring for the order)."""
    if config.tracking_uri is not None:
        return config.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return _check_uri(env)
    return "sqlite:///" + str((Path(runs_root) / "mlflow.db").resolve())


def _artifact_location(uri: str) -> str | None:
    """``<db dir>/mlartifacts`` for sqlite stores (MLflow would use ./mlruns); None lets a server decide."""
    if uri.startswith("sqlite:////"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def _client(uri: str) -> Any:
    """An MlflowClient for ``uri``. A SQLite store is created (and migrated) under an exclusive ``flock`` on
    ``<db>.init.lock``: two processes creating the same fresh store at once race in MLflow's schema migrations
    (seen: ``AttributeError: dimension_attributes`` when two ``train`` commands started together)."""
    quiet_mlflow_env()
    from mlflow.tracking import MlflowClient

    if not uri.startswith("sqlite:////"):
        return MlflowClient(tracking_uri=uri)
    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".init.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        client = MlflowClient(tracking_uri=uri)
        client.search_experiments(max_results=1)  # the store (and its schema) exists from here on
    return client


def _experiment_id(client: Any, name: str, uri: str, create: bool) -> str | None:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    return client.create_experiment(name, artifact_location=_artifact_location(uri))


# ----------------------------------------------------------------------------------------------
# params


def truncate_value(value: str, limit: int = MAX_PARAM_VALUE) -> str:
    """``value`` if it fits in ``limit`` characters, else its head plus :data:`TRUNCATION_MARKER` (``limit`` long)."""
    if len(value) <= limit:
        return value
    return value[: limit - len(TRUNCATION_MARKER)] + TRUNCATION_MARKER


def _param_str(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, (list, tuple)):
        return json.dumps(v, default=str)
    return str(v)


def flatten_params(nested: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}, "c": [1, 2]}`` -> ``{"a.b": "1", "c": "[1, 2]"}``; values truncated to 6000 chars."""
    out: dict[str, str] = {}
    for k, v in nested.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten_params(v, prefix=f"{key}."))
        else:
            out[key] = truncate_value(_param_str(dict(v) if isinstance(v, Mapping) else v))
    return out


def _chunks(items: Sequence[Any], n: int) -> Iterable[Sequence[Any]]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


# ----------------------------------------------------------------------------------------------
# plots


def plot_curves(
    history: Mapping[str, Sequence[tuple[float, float]]], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """One subplot per series of ``(step, value)`` points, saved as PNG (atomically, Agg canvas, no pyplot)."""
    if not history:
        raise ValueError("plot_curves needs at least one series")
    return _plot_panels({name: {"": sorted(points)} for name, points in history.items()}, path, title, legend=False)


# ----------------------------------------------------------------------------------------------
# tracker


class Tracker:
    """One MLflow run per training run. A no-op when disabled or on ranks other than 0.

    ::

        tracker = Tracker(cfg.tracking, runs_root, rank=rank)
        tracker.start_or_resume(run_name, run_dir)
        tracker.log_params(cfg.model_dump(mode="json"))
        tracker.log_metrics({"reward/hpsv2/mean": 0.31}, step=10)
        tracker.end()
    """

    def __init__(self, config: TrackingConfig, runs_root: str | os.PathLike[str], rank: int = 0) -> None:
        self.config = config
        self.runs_root = Path(runs_root)
        self.enabled = bool(config.enabled and rank == 0)
        self.tracking_uri = resolve_tracking_uri(config, runs_root) if self.enabled else None
        self.run_id: str | None = None
        self._client: Any = None

    def _require_run(self) -> Any:
        if self.run_id is None:
            raise RuntimeError("call Tracker.start_or_resume(run_name, run_dir) before logging")
        return self._client

    def start_or_resume(self, run_name: str, run_dir: str | os.PathLike[str]) -> str | None:
        """Start the MLflow run of ``run_dir``, or continue the one recorded in ``mlflow_run_id.txt``."""
        if not self.enabled:
            return None
        assert self.tracking_uri is not None
        self._client = client = _client(self.tracking_uri)
        id_file = Path(run_dir) / RUN_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text(encoding="utf-8").strip()
            self.run_id = self._resume(client, run_id, id_file)
            log.info("resumed MLflow run %s (%s)", run_id, run_name)
            return self.run_id
        exp_id = _experiment_id(client, self.config.experiment, self.tracking_uri, create=True)
        run = client.create_run(exp_id, run_name=run_name, tags={"astrolabe.run_dir": str(Path(run_dir).resolve())})
        self.run_id = run.info.run_id
        id_file.parent.mkdir(parents=True, exist_ok=True)
        write_text(id_file, self.run_id + "\n")
        log.info("started MLflow run %s (%s) at %s", self.run_id, run_name, self.tracking_uri)
        return self.run_id

    def _resume(self, client: Any, run_id: str, id_file: Path) -> str:
        from mlflow.exceptions import MlflowException

        try:
            client.get_run(run_id)
        except MlflowException as e:
            raise RuntimeError(
                f"{id_file} names MLflow run {run_id}, which {self.tracking_uri} does not have (was tracking_uri "
                f"changed?). Point tracking_uri at the original store, or delete {id_file} to start a new MLflow run."
            ) from e
        client.update_run(run_id, status="RUNNING")
        return run_id

    def attach(self, run_dir: str | os.PathLike[str]) -> str | None:
        """Log into the MLflow run recorded in ``run_dir`` without changing its status (an artifact made after
        training, e.g. the report); None when tracking is off or no run / store is recorded."""
        id_file = Path(run_dir) / RUN_ID_FILE
        if not self.enabled or not id_file.is_file():
            return None
        assert self.tracking_uri is not None
        if missing_store(self.tracking_uri) is not None:
            return None
        self._client = _client(self.tracking_uri)
        self.run_id = id_file.read_text(encoding="utf-8").strip()
        return self.run_id

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log a (nested) config as dotted params. On resume, a changed value is kept as a tag and warned about."""
        if not self.enabled:
            return
        from mlflow.entities import Param, RunTag

        client = self._require_run()
        flat = flatten_params(params)
        existing = client.get_run(self.run_id).data.params
        new = [Param(k, v) for k, v in flat.items() if k not in existing]
        changed = {k: v for k, v in flat.items() if k in existing and existing[k] != v}
        for k, v in changed.items():
            log.warning("param %s changed on resume: %r -> %r (kept as tag resume.changed.%s)", k, existing[k], v, k)
        for chunk in _chunks(new, _MAX_PARAMS_PER_BATCH):
            client.log_batch(self.run_id, params=list(chunk))
        if changed:
            client.log_batch(self.run_id, tags=[RunTag(f"resume.changed.{k}", v) for k, v in changed.items()])

    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None:
        """Log namespaced scalars (``reward/<name>/mean``, ``loss/policy``, ...) at ``step``."""
        if not self.enabled or not metrics:
            return
        from mlflow.entities import Metric

        client = self._require_run()
        ts = int(datetime.now(timezone.utc).timestamp() * 1000)
        items = []
        for k, v in metrics.items():
            value = float(v)
            if not math.isfinite(value):
                log.debug("metric %s=%s at step %d is not finite", k, value, step)
            items.append(Metric(k, value, ts, int(step)))
        for chunk in _chunks(items, _MAX_METRICS_PER_BATCH):
            client.log_batch(self.run_id, metrics=list(chunk))

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        """Copy a local file into the run's artifacts (under ``artifact_path``)."""
        if not self.enabled:
            return
        self._require_run().log_artifact(self.run_id, str(path), artifact_path)

    def log_curves(
        self,
        history: Mapping[str, Sequence[tuple[float, float]]],
        name: str = "curves.png",
        artifact_path: str = "plots",
        title: str | None = None,
    ) -> None:
        """Plot ``history`` (see :func:`plot_curves`) and log the PNG as ``<artifact_path>/<name>``."""
        if not self.enabled:
            return
        with tempfile.TemporaryDirectory() as d:
            self.log_artifact(plot_curves(history, Path(d) / name, title=title), artifact_path)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled or not tags:
            return
        from mlflow.entities import RunTag

        self._require_run().log_batch(self.run_id, tags=[RunTag(k, truncate_value(str(v))) for k, v in tags.items()])

    def end(self, status: str = "FINISHED") -> None:
        """Mark the run ``FINISHED`` (or ``FAILED`` / ``KILLED``); a later resume sets it RUNNING again."""
        if not self.enabled or self.run_id is None:
            return
        self._client.set_terminated(self.run_id, status=status)

    def mark_killed_if_running(self, run_id: str) -> bool:
        """Set MLflow run ``run_id`` to KILLED if it is RUNNING (its process died unannounced, e.g. SIGKILL)."""
        if not self.enabled:
            return False
        assert self.tracking_uri is not None
        client = self._client or _client(self.tracking_uri)
        from mlflow.exceptions import MlflowException

        try:
            if client.get_run(run_id).info.status != "RUNNING":
                return False
        except MlflowException:
            return False
        client.set_terminated(run_id, status="KILLED")
        log.info("MLflow run %s was RUNNING but its process is gone: marked KILLED", run_id)
        return True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.end("FINISHED" if exc_type is None else ("KILLED" if exc_type is KeyboardInterrupt else "FAILED"))


# ----------------------------------------------------------------------------------------------
# comparison


def missing_store(uri: str) -> str | None:
    """The path of a local sqlite store ``uri`` names when that file does not exist (None otherwise: it exists,
    or the store is a server). Reading commands check this first, so they never create an empty store."""
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        return None if Path(path).is_file() else path
    return None


def metric_histories(run_ids: Mapping[str, str], metrics: Sequence[str], tracking_uri: str
                     ) -> dict[str, dict[str, list[tuple[float, float]]]]:  # fmt: skip
    """``{metric: {label: [(step, value), ...]}}`` of the runs ``{label: run_id}`` (runs without it left out)."""
    client = _client(_check_uri(tracking_uri))
    out: dict[str, dict[str, list[tuple[float, float]]]] = {}
    for m in metrics:
        for label, run_id in run_ids.items():
            points = [(float(h.step), float(h.value)) for h in client.get_metric_history(run_id, m)]
            if points:
                out.setdefault(m, {})[label] = sorted(points)
    return out


def plot_runs(
    histories: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: str | os.PathLike[str],
    title: str | None = None,
) -> Path:
    """One subplot per metric with one line per run (``{metric: {run label: points}}``, see
    :func:`metric_histories`), saved as PNG with the Agg canvas; the file is written atomically."""
    if not histories:
        raise ValueError("none of the runs has any of these metrics: nothing to plot (choose them with --metric)")
    return _plot_panels(histories, path, title, legend=True)


def _plot_panels(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], path: str | os.PathLike[str],
    title: str | None, legend: bool,
) -> Path:
    """:func:`panels_png` written to ``path`` (atomically)."""
    from astrolabe.artifacts.atomic import write_bytes

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(out, panels_png(panels, title, legend))


def panels_png(
    panels: Mapping[str, Mapping[str, Sequence[tuple[float, float]]]], title: str | None = None, legend: bool = True,
    xlabel: str = "step",
) -> bytes:
    """PNG bytes of a grid of at most 3 columns, one panel per ``{panel: {line label: points}}`` entry
    (Agg canvas, no pyplot)."""
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    names = list(panels)
    ncols = min(3, len(names))
    nrows = -(-len(names) // ncols)
    fig = Figure(figsize=(4.5 * ncols, 3.2 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for i, name in enumerate(names):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        for label, points in panels[name].items():
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="." if len(points) < 50 else None, label=label or None)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and iterations are whole numbers
        ax.grid(True, alpha=0.3)
        if legend and any(panels[name]):
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _iso_ms(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, timezone.utc).isoformat(timespec="seconds")


def compare_runs(
    run_names: Sequence[str] | None,
    tracking_uri: str,
    experiment: str = "astrolabe",
    param_keys: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Rows for a comparison table: ``run_name, run_id, status, start_time, params, metrics`` (last values).

    ``run_names=None`` lists every run of the experiment, newest first; otherwise the named runs in
    that order (several MLflow runs with one name all appear). ``param_keys`` selects params (all if None).
    """
    client = _client(_check_uri(tracking_uri))
    exp_id = _experiment_id(client, experiment, tracking_uri, create=False)
    if exp_id is None:
        return []
    runs, token = [], None
    while True:
        page = client.search_runs([exp_id], order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    if run_names is not None:
        order = {name: i for i, name in enumerate(run_names)}
        runs = sorted((r for r in runs if r.info.run_name in order), key=lambda r: order[r.info.run_name])
    rows = []
    for r in runs:
        params = dict(r.data.params)
        if param_keys is not None:
            params = {k: params[k] for k in param_keys if k in params}
        rows.append(
            {
                "run_name": r.info.run_name,
                "run_id": r.info.run_id,
                "status": r.info.status,
                "start_time": _iso_ms(r.info.start_time),
                "params": params,
                "metrics": dict(r.data.metrics),
            }
        )
    return rows
