"""``astrolabe report RUN``: the run's self-contained HTML report (``<run>/report.html``), also logged to MLflow;
``astrolabe report RUN --vs OTHER``: one page with both runs side by side (``<run>/report-vs-<other>.html``)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape

from flows.cli_common import RootOpt, VerboseOpt, console, setup_logging, user_errors

if TYPE_CHECKING:
    from astrolabe.config import RunConfig
    from astrolabe.report import StageOutput


def run_outputs(run_path: Path, cfg: RunConfig) -> list[StageOutput]:
    """The run's complete (or damaged, still readable) stage outputs under ``cfg``'s plan."""
    from astrolabe.artifacts.manifest import Manifest
    from astrolabe.artifacts.plan import plan_status
    from astrolabe.report import StageOutput
    from stages import STAGES

    return [StageOutput(s.node.stage, s.node.iteration, s.path, Manifest.load(s.path))
            for s in plan_status(cfg, run_path, STAGES, check_sha=False)
            if s.status in ("done", "damaged") and s.path is not None]


def report_cmd(
    run: Annotated[str, typer.Argument(help="Run directory or name.")],
    vs: Annotated[str | None, typer.Option("--vs", help="Another run (directory or name): write one page with both "
                                           "runs side by side instead of RUN's own report.")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="With --vs: the HTML file to write "
                                             "(default <run>/report-vs-<other>.html).")] = None,
    runs_root: RootOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Write <run>/report.html: eval start -> end per reward, reward curves, before/after videos, selective KL,
    time and memory per stage, config changes. One offline file; also logged to the run's MLflow run.
    With --vs OTHER: both runs' results tables next to each other and their curves on shared axes."""
    setup_logging(verbose)
    from astrolabe.tracking import Tracker
    from flows.run import load_run_config, publish_report, resolve_run_path
    from flows.server import use_persistent_mlflow

    with user_errors():
        run_path = resolve_run_path(run, runs_root)
        cfg = load_run_config(run_path)
        if vs is not None:
            path = _write_pair(run_path, cfg, resolve_run_path(vs, runs_root), out)
            console.print(escape(f"wrote {path}"), highlight=False, soft_wrap=True)
            return
        use_persistent_mlflow()
        tracker = Tracker(cfg.tracking, cfg.pipeline.runs_root)
        logged = tracker.attach(run_path)
        path = publish_report(run_path, cfg, run_outputs(run_path, cfg), tracker)
    where = f" (and to MLflow run {logged})" if logged else ""
    console.print(escape(f"wrote {path}{where}"), highlight=False, soft_wrap=True)


def _write_pair(run_path: Path, cfg: RunConfig, other_path: Path, out: Path | None) -> Path:
    """The side-by-side page of ``run_path`` and ``other_path`` (offline: manifests only, nothing logged)."""
    from astrolabe.report import collect, comparison_path, write_comparison
    from flows.run import load_run_config

    other_cfg = load_run_config(other_path)
    a = collect(run_path, cfg, run_outputs(run_path, cfg))
    b = collect(other_path, other_cfg, run_outputs(other_path, other_cfg))
    return write_comparison(a, b, out if out is not None else comparison_path(run_path, other_cfg.name))
