"""Prefect (and MLflow UI) servers that never outlive ``astrolabe``: the temporary one of a run, and ``up``/``down``.

Without ``PREFECT_API_URL`` a flow needs a Prefect API. Prefect's own ephemeral server is a uvicorn child
that survives a SIGKILL or SIGTERM of its parent (~235 MB each) and fails the run when it is slow to start.
So ``astrolabe`` starts that server itself (:func:`temporary_server`), only once every argument was
checked, with:

- the same uvicorn command Prefect uses (``prefect.server.api.server:create_app``, ephemeral: no UI, no
  services) on a free loopback port, ``PREFECT_API_URL`` pointing at it *before* ``prefect`` is imported;
- ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in the child (Linux): the kernel kills it when its parent dies,
  however the parent dies (SIGKILL included);
- a pidfile ``<PREFECT_HOME>/astrolabe-servers/<pid>.json``; a later start reaps a recorded server whose
  parent is gone (:func:`reap_stale_servers`: where the death signal is not available, or was lost);
- a health poll of ``/api/health`` that tolerates a slow machine (``ASTROLABE_SERVER_STARTUP_TIMEOUT_S``,
  default 300 s) and ends with one clear error naming the server's log.

``astrolabe up`` starts a *persistent* Prefect server (with its UI) and, when the full ``mlflow`` package
is installed (the ``ui`` extra), an MLflow UI, both on 127.0.0.1, in their own sessions; their pids and
URLs go to ``<PREFECT_HOME>/astrolabe-up.json``, which later commands read (:func:`use_persistent_servers`):
flows then run against that Prefect server (no temporary one) and MLflow logs into the store the UI shows.
``astrolabe down`` stops exactly the processes recorded there.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SERVER_APP = "prefect.server.api.server:create_app"  # also how a recorded pid is recognised as our server
PIDFILE_DIR = "astrolabe-servers"
UP_STATE = "astrolabe-up.json"
STARTUP_TIMEOUT_ENV = "ASTROLABE_SERVER_STARTUP_TIMEOUT_S"
DEFAULT_STARTUP_TIMEOUT_S = 300.0
_PR_SET_PDEATHSIG = 1


class ServerStartError(RuntimeError):
    """A server did not become healthy (it exited, or the start-up timeout passed)."""


# ----------------------------------------------------------------------------------- small helpers


def prefect_home() -> Path:
    """``$PREFECT_HOME`` after :func:`flows.prefect_env.configure` (``./.prefect`` by default)."""
    from flows.prefect_env import configure

    configure()
    return Path(os.environ["PREFECT_HOME"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:  # gone, or no /proc (not Linux): ask the kernel
        try:
            os.kill(pid, 0)
        except OSError as e:
            return e.errno == errno.EPERM  # exists, another user's
        return True


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def healthy(url: str, timeout_s: float = 1.0) -> bool:
    """True if ``url`` answers 200 (``.../api/health`` for Prefect, ``/health`` for MLflow)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


def startup_timeout_s() -> float:
    raw = os.environ.get(STARTUP_TIMEOUT_ENV)
    return float(raw) if raw else DEFAULT_STARTUP_TIMEOUT_S


def die_with_parent(sig: int = signal.SIGKILL) -> None:  # pragma: no cover - runs in the forked child
    """``preexec_fn``: the kernel sends ``sig`` (SIGKILL) to this process when its parent dies (Linux only)."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    except (OSError, AttributeError):
        return  # not Linux: the pidfile reaping is the fallback
    if os.getppid() != parent:  # the parent died before prctl: die now
        os._exit(1)


def stop_pid(pid: int, marker: str, grace_s: float = 10.0) -> bool:
    """SIGTERM ``pid`` if its command line contains ``marker`` (a recycled pid is left alone), SIGKILL after
    ``grace_s``; returns whether it was ours and is gone."""
    if not pid_alive(pid) or marker not in cmdline(pid):
        return False
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if not pid_alive(pid):
                return True
            time.sleep(0.05)
    return not pid_alive(pid)


def wait_healthy(proc: subprocess.Popen, url: str, what: str, log_path: Path, timeout_s: float) -> None:
    """Poll ``url`` until it answers; :class:`ServerStartError` if ``proc`` exits or ``timeout_s`` passes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerStartError(f"{what} exited with code {proc.returncode} while starting; its log: {log_path}"
                                   f"\n{_tail(log_path)}")
        if healthy(url):
            return
        time.sleep(0.2)
    raise ServerStartError(
        f"{what} did not answer {url} within {timeout_s:.0f}s (machine overloaded?). Its log: {log_path}. "
        f"Raise {STARTUP_TIMEOUT_ENV}, or start a persistent server once with `astrolabe up`."
    )


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


# ----------------------------------------------------------------------------------- temporary server


def server_command(port: int) -> list[str]:
    """The uvicorn command of Prefect's own temporary server (``SubprocessASGIServer``), on ``port``."""
    return [sys.executable, "-m", "uvicorn", "--factory", SERVER_APP, "--host", "127.0.0.1", "--port", str(port),
            "--log-level", "error", "--lifespan", "on"]  # fmt: skip


def server_env(ui: bool = False) -> dict[str, str]:
    env = {**os.environ, "PREFECT_UI_ENABLED": "1" if ui else "0", "PREFECT_SERVER_UI_ENABLED": "1" if ui else "0"}
    env.pop("PREFECT_API_URL", None)
    if not ui:
        env.update(PREFECT__SERVER_EPHEMERAL="1", PREFECT__SERVER_FINAL="1")  # no UI, no background services
    return env


def _pidfile_dir(home: Path) -> Path:
    return home / PIDFILE_DIR


def reap_stale_servers(home: Path) -> list[int]:
    """Stop every recorded temporary server whose recording ``astrolabe`` process is gone; returns their pids.

    A pidfile whose server is already gone is removed; a live server of a live parent is left alone.
    """
    reaped = []
    d = _pidfile_dir(home)
    for f in sorted(d.glob("*.json")) if d.is_dir() else []:
        try:
            rec = json.loads(f.read_text())
            pid, parent = int(rec["pid"]), int(rec["parent"])
        except (OSError, ValueError, KeyError, TypeError):
            f.unlink(missing_ok=True)
            continue
        if pid_alive(parent) and parent != os.getpid():
            continue
        if stop_pid(pid, SERVER_APP):
            log.warning("stopped a temporary Prefect server (pid %d) left behind by pid %d", pid, parent)
            reaped.append(pid)
        f.unlink(missing_ok=True)
        if rec.get("log"):
            Path(rec["log"]).unlink(missing_ok=True)
    return reaped


@dataclass
class TemporaryServer:
    """A running temporary Prefect server: its process, API URL and pidfile."""

    proc: subprocess.Popen
    api_url: str
    pidfile: Path
    log_path: Path

    def wait(self, timeout_s: float | None = None) -> None:
        wait_healthy(self.proc, f"{self.api_url}/health", "the temporary Prefect server", self.log_path,
                     startup_timeout_s() if timeout_s is None else timeout_s)  # fmt: skip

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.pidfile.unlink(missing_ok=True)
        self.log_path.unlink(missing_ok=True)


def start_temporary_server(home: Path) -> TemporaryServer:
    """Start a temporary Prefect server tied to this process (does not wait for it: see ``wait``)."""
    reap_stale_servers(home)
    d = _pidfile_dir(home)
    d.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = d / f"server-{os.getpid()}-{port}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(server_command(port), env=server_env(), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)  # fmt: skip
    pidfile = d / f"{proc.pid}.json"
    rec = {"pid": proc.pid, "parent": os.getpid(), "port": port, "log": str(log_path), "started": time.time()}
    pidfile.write_text(json.dumps(rec))
    return TemporaryServer(proc, f"http://127.0.0.1:{port}/api", pidfile, log_path)


@dataclass
class PrefectApi:
    """The Prefect API of a block: its URL, and the temporary server behind it (None: not ours to start)."""

    url: str
    server: TemporaryServer | None = None

    def wait(self) -> None:
        """Block until the API answers (the temporary server starts while the caller imports prefect)."""
        if self.server is not None:
            self.server.wait()


@contextmanager
def prefect_api() -> Iterator[PrefectApi]:
    """A Prefect API for the flows of this block; enter it before ``prefect`` is imported.

    ``$PREFECT_API_URL`` if set; else the persistent server of ``astrolabe up`` if it answers; else a
    temporary server tied to this process (stopped on exit, killed by the kernel if this process dies).
    """
    if os.environ.get("PREFECT_API_URL"):
        yield PrefectApi(os.environ["PREFECT_API_URL"])
        return
    home = prefect_home()
    up_state = read_up_state(home) or {}
    persistent = (up_state.get("prefect") or {}).get("api_url")
    server = None
    if persistent and healthy(persistent + "/health"):
        api = PrefectApi(persistent)
    else:
        server = start_temporary_server(home)
        api = PrefectApi(server.api_url, server)
    os.environ["PREFECT_API_URL"] = api.url
    _refresh_prefect_settings()
    try:
        yield api
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        _refresh_prefect_settings()
        if server is not None:
            server.stop()


def _refresh_prefect_settings() -> None:
    """Prefect reads its settings from the environment once, at import: re-read them if it is imported."""
    context = sys.modules.get("prefect.context")
    if context is not None:
        context.refresh_global_settings_context()


# ----------------------------------------------------------------------------------- up / down


def read_up_state(home: Path) -> dict[str, Any] | None:
    """The servers recorded by ``astrolabe up`` (None if none, or the file is unreadable)."""
    try:
        return json.loads((home / UP_STATE).read_text())
    except (OSError, ValueError):
        return None


def mlflow_server_available() -> bool:
    """Whether the full ``mlflow`` package (the ``ui`` extra: Flask, the UI) is installed, not only mlflow-skinny."""
    import importlib.util

    return importlib.util.find_spec("flask") is not None and importlib.util.find_spec("mlflow.server") is not None


def _start_detached(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as out:
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)  # fmt: skip


def up(home: Path, mlflow_store: str, prefect_port: int | None = None, mlflow_port: int | None = None,
       timeout_s: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Start a persistent Prefect server (UI) and, if installed, an MLflow UI on 127.0.0.1; record them.

    Already-running recorded servers are kept. Returns the state written to ``<home>/astrolabe-up.json``.
    """
    timeout_s = startup_timeout_s() if timeout_s is None else timeout_s
    state = read_up_state(home) or {}
    logs = home / "logs"
    if not (state.get("prefect") and healthy(state["prefect"]["api_url"] + "/health")):
        port = prefect_port or free_port()
        proc = _start_detached(server_command(port), server_env(ui=True), logs / "prefect-server.log")
        api = f"http://127.0.0.1:{port}/api"
        state["prefect"] = {"pid": proc.pid, "url": f"http://127.0.0.1:{port}", "api_url": api}
        _write_state(home, state)
        wait_healthy(proc, f"{api}/health", "the Prefect server", logs / "prefect-server.log", timeout_s)
    if mlflow_server_available() and not (state.get("mlflow") and healthy(state["mlflow"]["url"] + "/health")):
        port = mlflow_port or free_port()
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        cmd = [sys.executable, "-m", "mlflow", "ui", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
               "--backend-store-uri", mlflow_store]  # fmt: skip
        proc = _start_detached(cmd, env, logs / "mlflow-ui.log")
        state["mlflow"] = {"pid": proc.pid, "url": f"http://127.0.0.1:{port}", "store": mlflow_store}
        _write_state(home, state)
        wait_healthy(proc, f"http://127.0.0.1:{port}/health", "the MLflow UI", logs / "mlflow-ui.log", timeout_s)
    return state


def _write_state(home: Path, state: dict[str, Any]) -> None:
    from astrolabe.artifacts.atomic import write_json

    home.mkdir(parents=True, exist_ok=True)
    write_json(home / UP_STATE, state, indent=2)


def down(home: Path) -> list[str]:
    """Stop the servers recorded by ``up`` (only those pids, only if they still run our commands)."""
    state = read_up_state(home) or {}
    stopped = []
    for name, marker in (("prefect", SERVER_APP), ("mlflow", "mlflow")):
        rec = state.get(name)
        if rec and stop_pid(int(rec["pid"]), marker):
            stopped.append(f"{name} (pid {rec['pid']}, {rec['url']})")
    (home / UP_STATE).unlink(missing_ok=True)
    return stopped


def use_persistent_mlflow(home: Path | None = None) -> str | None:
    """Point ``MLFLOW_TRACKING_URI`` (if unset) at the store of the MLflow UI started by ``up``; returns it."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return None
    state = read_up_state(home or prefect_home()) or {}
    store = (state.get("mlflow") or {}).get("store")
    if store:
        os.environ["MLFLOW_TRACKING_URI"] = store
    return store
