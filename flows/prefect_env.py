"""Prefect's environment for quiet, offline local runs; must run before ``import prefect``.

Without ``PREFECT_API_URL`` Prefect starts a temporary local server per process (SQLite under
``PREFECT_HOME``). Defaults set here (an existing value always wins):

- ``PREFECT_HOME`` = ``$ASTROLABE_PREFECT_HOME`` or ``./.prefect`` (not ``~/.prefect``: per project);
- analytics off (offline machines log a telemetry error otherwise), server start-up timeout 90 s (a cold
  venv needs ~22 s, the default is 20 s), no API logging outside flows, WARNING log level for Prefect.
See ``shared/reference/ecosystem-probe.md`` section 2.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW": "ignore",
    "PREFECT_LOGGING_LEVEL": "WARNING",
    "PREFECT_SERVER_LOGGING_LEVEL": "WARNING",
    "PREFECT_UI_ENABLED": "false",
}


def configure(home: str | Path | None = None) -> None:
    """Set the defaults above in ``os.environ`` (call before importing prefect)."""
    prefect_home = home or os.environ.get("ASTROLABE_PREFECT_HOME") or Path.cwd() / ".prefect"
    os.environ.setdefault("PREFECT_HOME", str(Path(prefect_home).resolve()))
    for k, v in DEFAULTS.items():
        os.environ.setdefault(k, v)
