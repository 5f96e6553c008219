"""A termination signal ends the CLI process as killed, however the code it interrupts treats the exception."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flows import signals

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def no_signals_recorded():
    signals.RECEIVED.clear()
    yield
    signals.RECEIVED.clear()


def run_script(body: str) -> subprocess.CompletedProcess:
    """``body`` (indented under ``with signals_as_interrupt(on_stop=...)``) in a fresh interpreter."""
    script = "import os, signal, sys, time\nfrom flows import signals\n" \
             "with signals.signals_as_interrupt(on_stop=lambda s: print('stopped', s, flush=True)):\n" \
             + textwrap.indent(textwrap.dedent(body), "    ") + "\nprint('returned', flush=True)\n"  # fmt: skip
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("body", [
    # the interrupt propagates (the plain case)
    "os.kill(os.getpid(), signal.SIGTERM)\ntime.sleep(5)",
    # it is swallowed: the block returns normally (a handler fired in a __del__, a retried task, ...)
    "try:\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(5)\nexcept KeyboardInterrupt:\n    pass",
    # it becomes an ordinary error (e.g. wrapped by a serializer)
    "try:\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(5)\nexcept KeyboardInterrupt as e:\n"
    "    raise RuntimeError('wrapped') from e",
])  # fmt: skip
def test_recorded_sigterm_kills_the_process_whatever_the_block_does(body):
    out = run_script(body)
    assert out.returncode == -signal.SIGTERM, (out.stdout, out.stderr)
    assert "stopped 15" in out.stdout and "returned" not in out.stdout


def test_sigterm_under_prefects_bridge_swallowed_still_kills():
    """Inside a flow Prefect's own handler raises TerminationSignal; if that exception is swallowed (Prefect's
    task state serialization wrapped it, a retry ran on), the process must still end by SIGTERM, not exit 0."""
    out = run_script("""
        from flows.prefect_env import configure
        configure()
        from prefect.utilities.engine import capture_sigterm
        signals.record_prefect_sigterm()
        with capture_sigterm():
            try:
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(5)
            except BaseException as e:
                print('swallowed', type(e).__name__, flush=True)
        """)
    assert "swallowed TerminationSignal" in out.stdout, (out.stdout, out.stderr)
    assert out.returncode == -signal.SIGTERM, (out.stdout, out.stderr)


def test_no_signal_means_normal_exit():
    out = run_script("pass")
    assert out.returncode == 0 and "returned" in out.stdout and "stopped" not in out.stdout


def test_prefect_bridge_records_then_raises():
    from prefect.exceptions import TerminationSignal
    from prefect.utilities import engine

    signals.record_prefect_sigterm()
    signals.record_prefect_sigterm()  # idempotent: not wrapped twice
    with pytest.raises(TerminationSignal):
        engine._prefect_sigterm_handler(signal.SIGTERM, None)
    assert signals.RECEIVED == [signal.SIGTERM]


def test_interruptible_runner_stops_at_node_boundaries():
    calls = []

    def runner(node, inputs, force):
        calls.append(node)
        if node == "swallows":
            signals.record(signal.SIGTERM)  # the signal arrived inside, its exception was lost
        return f"manifest of {node}"

    run = signals.interruptible(runner)
    assert run("a", {}, False) == "manifest of a"
    with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
        run("swallows", {}, False)  # the node ran but does not count as done
    with pytest.raises(KeyboardInterrupt):
        run("b", {}, False)  # no new node starts
    assert calls == ["a", "swallows"]


def test_failed_task_is_not_retried_after_a_signal():
    from flows.train import not_interrupted

    assert not_interrupted(None, None, None)
    signals.record(signal.SIGTERM)
    assert not not_interrupted(None, None, None)


def test_a_failing_stop_message_does_not_keep_the_process_alive():
    script = "import os, signal, time\nfrom flows import signals\n" \
             "def say(s):\n    raise OSError('stdout is closed')\n" \
             "with signals.signals_as_interrupt(on_stop=say):\n    os.kill(os.getpid(), signal.SIGTERM)\n    time.sleep(5)\n"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGTERM, (out.stdout, out.stderr)
