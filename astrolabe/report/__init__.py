"""The per-run HTML report: ``<run>/report.html``, one self-contained file (``astrolabe report RUN``).

:func:`collect` reads what the report shows from the run's stage outputs (manifests and their files,
offline); :func:`render` turns it into HTML; :func:`write_report` does both and writes the file atomically.
:func:`write_comparison` writes one page of two runs side by side (:func:`~astrolabe.report.render.render_pair`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from astrolabe.artifacts.atomic import write_text
from astrolabe.config import RunConfig
from astrolabe.report.collect import ReportData, StageOutput, collect
from astrolabe.report.render import render, render_pair

REPORT_FILE = "report.html"

__all__ = [
    "REPORT_FILE", "ReportData", "StageOutput", "collect", "comparison_path", "render", "render_pair",
    "write_comparison", "write_report",
]


def write_report(run_path: Path, cfg: RunConfig, outputs: Sequence[StageOutput]) -> Path:
    """Write ``<run_path>/report.html`` of the run's complete stage ``outputs``; returns its path."""
    return write_text(Path(run_path) / REPORT_FILE, render(collect(Path(run_path), cfg, outputs)))


def comparison_path(run_path: Path, other_name: str) -> Path:
    """Where ``astrolabe report RUN --vs OTHER`` writes by default: ``<run>/report-vs-<other name>.html``."""
    return Path(run_path) / f"report-vs-{other_name}.html"


def write_comparison(a: ReportData, b: ReportData, path: Path) -> Path:
    """Write the side-by-side page of runs ``a`` and ``b`` (each from :func:`collect`) to ``path``; returns it."""
    return write_text(Path(path), render_pair(a, b))
