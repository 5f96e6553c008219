"""``astrolabe up`` / ``down`` (the persistent local Prefect server and MLflow UI) and ``compare`` (runs side
by side from MLflow)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from flows.cli_common import console, error, fail, user_errors


def _default_store() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``runs/mlflow.db`` (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str(Path("runs/mlflow.db").resolve())


def up_cmd(
    prefect_port: Annotated[int | None, typer.Option("--prefect-port", help="Default: a free port.")] = None,
    mlflow_port: Annotated[int | None, typer.Option("--mlflow-port", help="Default: a free port.")] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="The MLflow store the UI shows (default: "
                                                     "$MLFLOW_TRACKING_URI or sqlite:///runs/mlflow.db).")] = None,
) -> None:
    """Start a persistent local Prefect server and MLflow UI on 127.0.0.1; later commands use them."""
    from flows.server import ServerStartError, mlflow_server_available, prefect_home, up

    store = tracking_uri or _default_store()
    if not mlflow_server_available():
        console.print("the MLflow UI needs the full mlflow package (pip install -e '.[ui]'): starting Prefect only",
                      style="yellow", markup=False, soft_wrap=True)
    try:
        state = up(prefect_home(), store, prefect_port, mlflow_port)
    except ServerStartError as e:
        fail(e)
    lines = [f"Prefect UI: {state['prefect']['url']}  (API {state['prefect']['api_url']})"]
    if state.get("mlflow"):
        lines.append(f"MLflow UI:  {state['mlflow']['url']}  (store {state['mlflow']['store']})")
    lines.append("train, rescore and compare now use them; `astrolabe down` stops them")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


def down_cmd() -> None:
    """Stop the servers started by `astrolabe up` (nothing else)."""
    from flows.server import down, prefect_home

    stopped = down(prefect_home())
    console.print("stopped " + ", ".join(stopped) if stopped else "no server of `astrolabe up` was running",
                  highlight=False, soft_wrap=True)


def compare(
    runs: Annotated[list[str] | None, typer.Argument(help="Run names (default: all runs of the experiment).")] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="Default: $MLFLOW_TRACKING_URI or "
                                                     "sqlite:///runs/mlflow.db")] = None,
    experiment: str = "astrolabe",
    metric: Annotated[list[str] | None, typer.Option("--metric", help="Metrics to show (default: eval means).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw the runs' curves of these metrics into "
                                              "one PNG.")] = None,
) -> None:
    """A table of runs from MLflow: status, and the last value of each chosen metric (creates nothing)."""
    from rich.table import Table

    from astrolabe.tracking import compare_runs, metric_histories, missing_store, plot_runs

    from flows.server import use_persistent_mlflow

    use_persistent_mlflow()
    uri = tracking_uri or _default_store()
    with user_errors():
        if (absent := missing_store(uri)) is not None:
            error(f"no MLflow store at {absent}: train a run first, or pass --tracking-uri")
            raise typer.Exit(1)
        rows = compare_runs(runs or None, uri, experiment)
        if not rows:
            console.print(escape(f"no runs in experiment {experiment!r} at {uri}"))
            raise typer.Exit(1)
        names = metric or sorted({k for r in rows for k in r["metrics"] if k.startswith("eval/") and k.endswith("/mean")})
        table = Table("run", "status", "started", *names)
        for r in rows:
            table.add_row(escape(r["run_name"]), r["status"], r["start_time"],
                          *[f"{r['metrics'][n]:.4f}" if n in r["metrics"] else "-" for n in names])
        Console().print(table)
        if plot is not None:
            ids = {f"{r['run_name']} ({r['run_id'][:6]})": r["run_id"] for r in rows}
            plot_runs(metric_histories(ids, names, uri), plot, title=f"{experiment}: {len(rows)} runs")
            console.print(escape(f"wrote {plot}"))
