"""The per-run HTML report: ``<run>/report.html``, one self-contained file (``astrolabe report RUN``).

:func:`collect` reads what the report shows from the run's stage outputs (manifests and their files,
offline); :func:`render` turns it into HTML; :func:`write_report` does both and writes the file atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from astrolabe.artifacts.atomic import write_text
from astrolabe.config import RunConfig
from astrolabe.report.collect import ReportData, StageOutput, collect
from astrolabe.report.render import render

REPORT_FILE = "report.html"

__all__ = ["REPORT_FILE", "ReportData", "StageOutput", "collect", "render", "write_report"]


def write_report(run_path: Path, cfg: RunConfig, outputs: Sequence[StageOutput]) -> Path:
    """Write ``<run_path>/report.html`` of the run's complete stage ``outputs``; returns its path."""
    return write_text(Path(run_path) / REPORT_FILE, render(collect(Path(run_path), cfg, outputs)))
