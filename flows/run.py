"""What every flow of a run shares, without Prefect: the run directory, its lock and config, MLflow logging.

A run lives in ``<pipeline.runs_root>/<name>/``::

    .lock                 held by the one process writing the run (flock: released when it dies)
    config.yaml           the resolved config of the latest attempt (what `stage`, `status`, `rescore` read)
    config-history/       every earlier attempt's config, numbered
    mlflow_run_id.txt     the MLflow run continued on resume
    tracking-logged.json  stage outputs already logged to MLflow (a resumed run does not log twice)
    run-summary.json      wall time, time per stage, bookkeeping overhead of the last attempt
    reward_curves.png     reward / eval curves so far, rewritten after every evaluation
    report.html           the run's self-contained report, written at the end of `train` (`astrolabe report RUN`)
    latest/               stable names (symlinks) of the newest results: checkpoint (a policy for
                          `astrolabe generate --checkpoint`), eval (directory), grid.png, grid.mp4, metrics.json
    filter_prompts/<key>/  iter-0000/<stage>/<key>/ ...

The flows (``flows/train.py`` ...) wrap :func:`train_run` etc. in Prefect; the CLI can also call them
directly (``--engine local``). Both execute the same plan (:mod:`astrolabe.artifacts.plan`) over the
stage registry :data:`stages.STAGES`. What is logged to MLflow is what each stage's manifest carries
(``Manifest.metrics``, ``Manifest.reports``): this module does not know which stage made what.

Each node runs where ``resources`` says (:func:`flows.launch.run_node`): in this process at world size 1, else
as one torchrun job launched from here (this process keeps the lock and the bookkeeping).

Under ``torchrun`` itself (local engine only) every rank calls :func:`train_run`: rank 0 alone takes the run lock
(:func:`astrolabe.distributed.rank0_run_lock`), records the config, writes the summary and logs to MLflow;
the other ranks run the same plan without bookkeeping (:func:`astrolabe.artifacts.engine.execute` keeps them
in step).
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from astrolabe.artifacts import atomic
from astrolabe.artifacts.atomic import write_json, write_text
from astrolabe.artifacts.manifest import Manifest
from astrolabe.artifacts.plan import (
    Node, NodeResult, NodeStatus, RunResults, Runner, explain_change, run_plan,
)
from astrolabe.artifacts.stagedir import find_current, list_iterations, run_dir
from astrolabe.config import ConfigError, RunConfig, config_to_dict, dump_config, load_config
from astrolabe.distributed import current_context, rank0_run_lock
from astrolabe.report import REPORT_FILE, StageOutput, write_report
from astrolabe.tracking import Tracker, plot_curves
from flows import signals
from flows.launch import launching_runner
from flows.preflight import holder_died, mark_killed, mark_killed_if_dead
from stages import STAGES

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
HISTORY_DIR = "config-history"
LOGGED_FILE = "tracking-logged.json"
SUMMARY_FILE = "run-summary.json"
CURVES_FILE = "reward_curves.png"
LATEST_DIR = "latest"
CHECKPOINT_SUBDIR = "state"  # = stages.nft_update.STATE_SUBDIR: the policy inside an nft_update output
EVAL_FILES = ("grid.png", "grid.mp4", "metrics.json")  # of an evaluate output, linked under latest/
MIN_STD_SAMPLES = 8  # fewer eval videos than this: margins are absolute differences, not in baseline std


# ----------------------------------------------------------------------------------- run directory


def load_run_config(run_path: Path, overrides: list[str] | None = None) -> RunConfig:
    """The config a run was last trained with (``<run>/config.yaml``)."""
    path = Path(run_path) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(
            f"{path} does not exist: {run_path} is not a run directory (start one with `astrolabe train CONFIG`)"
        )
    return load_config(path, overrides)


def resolve_run_path(run: str | Path, runs_root: Path | None = None) -> Path:
    """A run given as a directory, or as a name under ``runs_root`` (default ``runs``)."""
    p = Path(run)
    if (p / CONFIG_FILE).is_file():
        return p
    cand = Path(runs_root or "runs") / str(run)
    if (cand / CONFIG_FILE).is_file():
        return cand
    raise ConfigError(f"no run at {p} or {cand} (a run directory holds {CONFIG_FILE}); pass --run <dir or name>")


def resolve_checkpoint(path: Path) -> Path:
    """A policy for generation: ``path`` itself, or for a run directory (it holds ``config.yaml``) the state
    of its newest completed ``nft_update``."""
    if not (Path(path) / CONFIG_FILE).is_file():
        return Path(path)
    for k in reversed(list_iterations(path)):
        current = find_current(path, "nft_update", k)
        if current is not None:
            log.info("using the last policy of run %s: %s", path, current.path / CHECKPOINT_SUBDIR)
            return current.path / CHECKPOINT_SUBDIR
    raise ConfigError(f"run {path} has no completed nft_update yet: train it first, or pass a checkpoint directory")


def link_latest(run_path: Path, res: NodeResult) -> list[Path]:
    """Point ``<run>/latest/...`` at a node's output (relative symlinks): ``checkpoint`` for an nft_update,
    ``eval`` and its grid / metrics files for an evaluate. Returns the links written."""
    latest = run_path / LATEST_DIR
    targets: dict[str, Path] = {}
    if res.node.stage == "nft_update":
        targets["checkpoint"] = res.path / CHECKPOINT_SUBDIR
    elif res.node.stage == "evaluate":
        targets["eval"] = res.path
        targets |= {name: res.path / name for name in EVAL_FILES if (res.path / name).is_file()}
    written = []
    for name, target in targets.items():
        rel, link = os.path.relpath(target, latest), latest / name
        if target.exists() and not (link.is_symlink() and os.readlink(link) == rel):
            written.append(atomic.symlink(rel, link))
    return written


def write_curves(run_path: Path, history: Mapping[str, list[tuple[float, float]]], title: str) -> Path | None:
    """``<run>/reward_curves.png`` of ``history`` (atomically replaced); None when there is nothing to plot."""
    if not history:
        return None
    final = run_path / CURVES_FILE
    tmp = atomic.tmp_sibling(final)
    try:
        plot_curves(history, tmp, title=title)
        atomic.publish_file(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)
    return final


def record_config(run_path: Path, cfg: RunConfig) -> str | None:
    """Save ``cfg`` as the run's config; returns the explanation of a change since the last attempt."""
    path = run_path / CONFIG_FILE
    message = None
    if path.is_file():
        previous = load_config(path)
        message = explain_change(previous, cfg, run_path, STAGES)
        if message is not None:
            hist = run_path / HISTORY_DIR
            hist.mkdir(exist_ok=True)
            n = len(list(hist.glob("*.yaml")))
            write_text(hist / f"{n:03d}.yaml", path.read_text(encoding="utf-8"))
    write_text(path, dump_config(cfg))
    return message


# ----------------------------------------------------------------------------------- metrics


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def in_namespace(metrics: Mapping[str, float], namespace: str) -> dict[str, float]:
    """The metrics ``<namespace>/<rest>`` as ``{rest: value}`` (``eval/combined/mean`` -> ``combined/mean``)."""
    return {k[len(namespace) + 1:]: v for k, v in metrics.items() if k.startswith(namespace + "/")}


@dataclass
class RunLogger:
    """Logs each stage output once to MLflow, collects curves and timings for the summary."""

    tracker: Tracker
    cfg: RunConfig
    run_path: Path
    history: dict[str, list[tuple[float, float]]] = field(default_factory=lambda: defaultdict(list))
    computed: dict[str, float] = field(default_factory=dict)  # node label -> seconds (not cached)
    logged: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        path = self.run_path / LOGGED_FILE
        if path.is_file():
            self.logged = set(json.loads(path.read_text(encoding="utf-8")))

    def __call__(self, res: NodeResult, results: RunResults) -> None:
        metrics = res.manifest.metrics
        step = res.node.iteration or 0
        for k, v in metrics.items():
            if k.startswith(("reward/", "eval/")) and k.endswith("/mean"):
                self.history[k].append((step, v))
        if not res.cached:
            self.computed[res.node.label] = res.manifest.timings["total"]
        link_latest(self.run_path, res)
        if any(k.startswith("eval/") for k in metrics) and (not res.cached or not (self.run_path / CURVES_FILE).exists()):
            write_curves(self.run_path, self.history, self.run_path.name)
        ident = f"{res.node.label}:{res.manifest.key}:{res.manifest.instance}"
        if ident in self.logged:
            return
        self.tracker.log_metrics(metrics, step=step)
        for rel, where in res.manifest.reports.items():
            self.tracker.log_artifact(res.path / rel, where)
        self.logged.add(ident)
        write_json(self.run_path / LOGGED_FILE, sorted(self.logged))

    def finish(self) -> None:
        if self.history:
            self.tracker.log_curves(dict(self.history), name="reward_curves.png", title=self.cfg.name)


# ----------------------------------------------------------------------------------- train


@dataclass
class TrainSummary:
    run_path: Path
    wall_seconds: float
    stage_seconds: dict[str, float]  # per stage name, computed (not cached) nodes only
    computed_nodes: int
    cached_nodes: int
    eval: dict[int, dict[str, float]]  # evaluated iteration -> metrics
    config_change: str | None
    locations: dict[str, str] = field(default_factory=dict)  # what -> path (see :func:`run_locations`)

    @property
    def overhead_fraction(self) -> float:
        """(wall - stage compute) / stage compute: Prefect, MLflow, bookkeeping, model building between stages."""
        compute = sum(self.stage_seconds.values())
        return (self.wall_seconds - compute) / compute if compute > 0 else float("nan")

    def to_json(self) -> dict[str, Any]:
        return {
            "run_path": str(self.run_path), "wall_seconds": self.wall_seconds, "stage_seconds": self.stage_seconds,
            "computed_nodes": self.computed_nodes, "cached_nodes": self.cached_nodes,
            "overhead_fraction": _finite(self.overhead_fraction), "eval": {str(k): v for k, v in self.eval.items()},
            "eval_margin_std": {str(k): v for k, v in eval_margins(self.eval).items()},
            "eval_delta": {str(k): v for k, v in eval_deltas(self.eval).items()},
            "config_change": self.config_change, "locations": self.locations,
        }


def eval_margins(evals: Mapping[int, Mapping[str, float]],
                 min_samples: int = MIN_STD_SAMPLES) -> dict[int, dict[str, float]]:  # fmt: skip
    """Each eval mean's change since the first evaluated iteration, in units of that baseline's std.

    ``margin_k[name] = (mean_k - mean_0) / std_0`` for every ``<name>/mean`` with a ``<name>/std`` at the
    baseline (iteration 0 when it was evaluated); names whose baseline std is 0 or missing are left out.
    A std from fewer than ``min_samples`` videos (the baseline's ``n``, when recorded) is too noisy to be a
    unit (2 videos gave "+468 std"): then there are no margins, see :func:`eval_deltas`.
    """
    if not evals:
        return {}
    base = evals[min(evals)]
    if base.get("n", min_samples) < min_samples:
        return {}
    out: dict[int, dict[str, float]] = {}
    for it in sorted(evals):
        row = {}
        for key, mean in evals[it].items():
            if not key.endswith("/mean"):
                continue
            name = key[: -len("/mean")]
            std, mean0 = base.get(f"{name}/std"), base.get(key)
            if std and mean0 is not None and math.isfinite(std) and std > 0 and math.isfinite(mean):
                row[name] = (mean - mean0) / std
        out[it] = row
    return out


def eval_deltas(evals: Mapping[int, Mapping[str, float]]) -> dict[int, dict[str, float]]:
    """Each eval mean's absolute change since the first evaluated iteration: ``mean_k - mean_0``."""
    if not evals:
        return {}
    base = evals[min(evals)]
    return {it: {k[: -len("/mean")]: v - base[k] for k, v in row.items()
                 if k.endswith("/mean") and k in base and math.isfinite(v - base[k])}
            for it, row in sorted(evals.items())}


def eval_summary(results: RunResults) -> dict[int, dict[str, float]]:
    """``{iteration: {name: value}}`` of the ``eval/<name>`` metrics of the outputs that have some."""
    out: dict[int, dict[str, float]] = {}
    for r in results.by_id.values():
        evals = in_namespace(r.manifest.metrics, "eval")
        if evals and r.node.iteration is not None:
            out[r.node.iteration] = evals | ({"n": float(r.manifest.counts["videos"])} if "videos" in r.manifest.counts
                                             else {})
    return out


def run_locations(run_path: Path, results: RunResults, tracking_uri: str | None = None) -> dict[str, str]:
    """Where to look after a run: the summary file, the report (``report.html``, once written), the last evaluation's
    reports (grid ...), the last checkpoint (``nft_update``'s ``state/``), the MLflow store."""
    out = {"summary": str(run_path / SUMMARY_FILE)}
    if (run_path / REPORT_FILE).is_file():
        out["report"] = str(run_path / REPORT_FILE)
    evals = sorted((r for r in results.by_id.values() if r.node.stage == "evaluate" and r.manifest.reports),
                   key=lambda r: r.node.iteration or 0)  # fmt: skip
    if evals:
        last = evals[-1]
        for rel in last.manifest.reports:
            out[f"eval {Path(rel).name}"] = str(last.path / rel)  # eval grid.mp4, eval grid.png, eval metrics.json
    updates = sorted((r for r in results.by_id.values() if r.node.stage == "nft_update"),
                     key=lambda r: r.node.iteration or 0)  # fmt: skip
    if updates:
        out["checkpoint"] = str(updates[-1].path / "state")
    if tracking_uri:
        out["mlflow store"] = tracking_uri
    return out


def summarize(run_path: Path, start: float, results: RunResults, change: str | None,
              tracking_uri: str | None = None) -> TrainSummary:  # fmt: skip
    """The summary of an attempt from its node results (seconds of computed, i.e. not cached, nodes)."""
    computed = {r.node.label: r.manifest.timings["total"] for r in results.by_id.values() if not r.cached}
    per_stage: dict[str, float] = defaultdict(float)
    for label, secs in computed.items():
        per_stage[label.split("[")[0]] += secs
    return TrainSummary(
        run_path=run_path, wall_seconds=time.perf_counter() - start, stage_seconds=dict(per_stage),
        computed_nodes=len(computed), cached_nodes=len(results.by_id) - len(computed),
        eval=eval_summary(results), config_change=change, locations=run_locations(run_path, results, tracking_uri),
    )


def ensure_base_model(cfg: RunConfig) -> None:
    """Build what the base model needs locally before any stage runs (the world model, cached)."""
    from astrolabe.models.registry import get_base_model

    if get_base_model(cfg.model.base).pretrained == "world":
        from astrolabe.world.pretrain import ensure_world_model

        log.info("world model: %s", ensure_world_model(cfg.model.checkpoint_dir))


def train_run(
    cfg: RunConfig,
    runner_factory: Callable[[RunConfig, Path], Runner] | None = None,
    on_done: Callable[[NodeResult, RunResults], None] | None = None,
    on_start: Callable[[Node], None] | None = None,
) -> TrainSummary:
    """Train (or resume) the run ``cfg.name`` under ``cfg.pipeline.runs_root``; returns its summary.

    Takes the run lock (a second process exits with :class:`astrolabe.artifacts.lock.RunLockedError`), records
    the config (explaining what a change makes stale), continues the MLflow run, and runs the plan
    (``on_start`` before each node, ``on_done`` after; nodes run through ``runner_factory(cfg, run_path)``, by
    default :func:`flows.launch.launching_runner`). The MLflow run ends FINISHED, FAILED on an error, or
    KILLED when interrupted (SIGINT, SIGTERM: anything raised that is not an ``Exception``); one left RUNNING by
    a SIGKILLed attempt is marked KILLED first (:func:`mark_killed_if_dead`).
    Under torchrun only rank 0 does that bookkeeping (and calls the hooks); the others only run the plan.
    """
    start = time.perf_counter()
    run_path = run_dir(cfg.pipeline.runs_root, cfg.name)
    died = holder_died(run_path)  # read before the lock is taken: taking it overwrites the holder
    with rank0_run_lock(run_path):
        if not current_context().is_main:
            runner = runner_factory(cfg, run_path) if runner_factory is not None else None
            return summarize(run_path, start, run_plan(cfg, run_path, STAGES, runner=runner), None)
        ensure_base_model(cfg)
        change = record_config(run_path, cfg)
        if change:
            log.warning("%s", change)
        tracker = Tracker(cfg.tracking, cfg.pipeline.runs_root)
        if died:
            mark_killed(tracker, run_path)
        tracker.start_or_resume(cfg.name, run_path)
        status = "FAILED"
        try:
            tracker.log_params(config_to_dict(cfg))
            tracker.log_artifact(run_path / CONFIG_FILE, "config")
            logger = RunLogger(tracker, cfg, run_path)

            def done(res: NodeResult, results: RunResults) -> None:
                logger(res, results)
                if on_done is not None:
                    on_done(res, results)

            runner = signals.interruptible((runner_factory or launching_runner)(cfg, run_path))
            results = run_plan(cfg, run_path, STAGES, runner=announcing(runner, on_start), on_done=done)
            logger.finish()
            report_after_training(run_path, cfg, results, tracker)
            status = "FINISHED"
        except BaseException as e:
            # KeyboardInterrupt (SIGINT, SIGTERM via the CLI), SystemExit, ...; or any error while a signal is
            # being handled (Prefect may turn the interrupt inside a task into its own exception)
            if not isinstance(e, Exception) or signals.RECEIVED:
                status = "KILLED"
            raise
        finally:
            tracker.end(status)
        summary = summarize(run_path, start, results, change, tracker.tracking_uri)
        write_json(run_path / SUMMARY_FILE, summary.to_json(), indent=2)
        return summary


def publish_report(run_path: Path, cfg: RunConfig, outputs: list[StageOutput], tracker: Tracker) -> Path:
    """Write ``<run>/report.html`` of the run's complete stage ``outputs`` and log it to MLflow under ``report/``."""
    path = write_report(run_path, cfg, outputs)
    tracker.log_artifact(path, "report")
    return path


def report_after_training(run_path: Path, cfg: RunConfig, results: RunResults, tracker: Tracker) -> Path | None:
    """:func:`publish_report` of a finished run; a failure is a warning (the training result stands)."""
    outputs = [StageOutput(r.node.stage, r.node.iteration, r.path, r.manifest) for r in results.by_id.values()]
    try:
        return publish_report(run_path, cfg, outputs, tracker)
    except Exception as e:  # noqa: BLE001 - the report is a view: `astrolabe report RUN` writes it again
        log.warning("the report of %s could not be written (%s: %s); retry with `astrolabe report %s`",
                    run_path, type(e).__name__, e, run_path)
        return None


def announcing(runner: Runner, on_start: Callable[[Node], None] | None) -> Runner:
    """``runner`` calling ``on_start(node)`` first (a progress display's "now running")."""
    if on_start is None:
        return runner

    def run(node: Node, inputs: Mapping[str, Path], force: bool) -> Manifest:
        on_start(node)
        return runner(node, inputs, force)

    return run


# ----------------------------------------------------------------------------------- cached runs


def cached_summary(cfg: RunConfig, run_path: Path, statuses: list[NodeStatus]) -> TrainSummary | None:
    """The summary of a finished run with nothing to do (same config, every node done); None otherwise.

    Nothing is started: no Prefect, no MLflow logging, no model. A run left RUNNING in MLflow by a
    SIGKILLed attempt is marked KILLED on the way.
    """
    start = time.perf_counter()
    recorded = run_path / CONFIG_FILE
    if not recorded.is_file() or recorded.read_text(encoding="utf-8") != dump_config(cfg):
        return None
    if any(s.status != "done" or s.path is None for s in statuses):
        return None
    mark_killed_if_dead(cfg, run_path)
    results = RunResults()
    for s in statuses:
        assert s.path is not None
        results.by_id[s.node.id] = NodeResult(s.node, Manifest.load(s.path), s.path, cached=True)
    uri = Tracker(cfg.tracking, cfg.pipeline.runs_root).tracking_uri
    return summarize(run_path, start, results, None, uri)


def stage_times(results: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}s" for k, v in sorted(results.items(), key=lambda kv: -kv[1]))
