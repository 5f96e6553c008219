"""The end-of-train summary on the terminal: stage times, the eval table, where the results are."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from flows.cli_common import console


def print_summary(summary: dict) -> None:
    from rich.table import Table

    from flows.run import stage_times

    console.print(f"run {summary['run_path']}: {summary['wall_seconds']:.1f}s wall, "
                  f"{summary['computed_nodes']} stages computed, {summary['cached_nodes']} cached")
    if summary["stage_seconds"]:
        console.print("stage time: " + stage_times(summary["stage_seconds"]))
        if summary.get("overhead_fraction") is not None:
            console.print(f"overhead (Prefect + MLflow + bookkeeping) / stage compute: {summary['overhead_fraction']:.1%}")
    evals = summary.get("eval") or {}
    if evals:
        margins = summary.get("eval_margin_std") or {}
        deltas = summary.get("eval_delta") or {}
        names = sorted({k for m in evals.values() for k in m if k.endswith("/mean")})
        videos = min((m["n"] for m in evals.values() if "n" in m), default=None)
        caption = ("(change since the first eval, in units of its std)" if any(margins.values()) else
                   "(absolute change since the first eval"
                   + ("" if videos is None else f"; {videos:.0f} videos per eval, too few for std units") + ")")
        table = Table("eval iteration", *names, caption=caption)
        for it in sorted(evals, key=int):
            table.add_row(str(it), *[eval_cell(evals[it].get(n), margins.get(it, {}).get(n[: -len("/mean")]),
                                                deltas.get(it, {}).get(n[: -len("/mean")])) for n in names])
        Console().print(table)
    print_locations(summary.get("locations") or {})


def short_path(path: str) -> str:
    """``path`` relative to the working directory when it is under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def print_locations(locations: dict[str, str]) -> None:
    """Where the results are, and how to open the MLflow UI."""
    from flows.server import prefect_home, read_up_state

    if not locations:
        return
    width = max(len(k) for k in locations)
    for what, where in locations.items():
        console.print(f"  {what:<{width}}  {where if '://' in where else short_path(where)}", markup=False,
                      highlight=False, soft_wrap=True)
    ui = ((read_up_state(prefect_home()) or {}).get("mlflow") or {}).get("url")
    if ui:
        console.print(f"MLflow UI: {ui}", highlight=False)
    elif "mlflow store" in locations:
        console.print("MLflow UI: `astrolabe up` (needs the ui extra: pip install -e '.[ui]'), or "
                      f"`mlflow ui --backend-store-uri {locations['mlflow store']}`", markup=False, highlight=False,
                      soft_wrap=True)


def eval_cell(mean: float | None, margin: float | None, delta: float | None = None) -> str:
    """``0.7906 (+1.81 sd)`` with a margin, ``0.7906 (+0.0123)`` with an absolute change; ``-`` when missing."""
    if mean is None:
        return "-"
    if margin is not None:
        return f"{mean:.4f} ({margin:+.2f} sd)"
    return f"{mean:.4f}" if delta is None else f"{mean:.4f} ({delta:+.4f})"
