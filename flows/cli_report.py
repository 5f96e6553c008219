"""``astrolabe report RUN``: the run's self-contained HTML report (``<run>/report.html``), also logged to MLflow."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from flows.cli_common import RootOpt, VerboseOpt, console, setup_logging, user_errors


def report_cmd(
    run: Annotated[str, typer.Argument(help="Run directory or name.")],
    runs_root: RootOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Write <run>/report.html: eval start -> end per reward, reward curves, before/after videos, selective KL,
    time and memory per stage, config changes. One offline file; also logged to the run's MLflow run."""
    setup_logging(verbose)
    from astrolabe.artifacts.manifest import Manifest
    from astrolabe.artifacts.plan import plan_status
    from astrolabe.report import StageOutput
    from astrolabe.tracking import Tracker
    from flows.run import load_run_config, publish_report, resolve_run_path
    from flows.server import use_persistent_mlflow
    from stages import STAGES

    use_persistent_mlflow()
    with user_errors():
        run_path = resolve_run_path(run, runs_root)
        cfg = load_run_config(run_path)
        outputs = [StageOutput(s.node.stage, s.node.iteration, s.path, Manifest.load(s.path))
                   for s in plan_status(cfg, run_path, STAGES, check_sha=False)
                   if s.status in ("done", "damaged") and s.path is not None]
        tracker = Tracker(cfg.tracking, cfg.pipeline.runs_root)
        logged = tracker.attach(run_path)
        path = publish_report(run_path, cfg, outputs, tracker)
    where = f" (and to MLflow run {logged})" if logged else ""
    console.print(escape(f"wrote {path}{where}"), highlight=False, soft_wrap=True)
