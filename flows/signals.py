"""Termination signals of a CLI process: recorded once, honoured whatever code they interrupt.

A SIGTERM / SIGINT must end ``astrolabe train`` as killed (the MLflow run KILLED, the temporary Prefect
server stopped, the process dead of that signal: exit -15 / -2), never as a success or an ordinary failure.
The exception a signal handler raises is not a reliable carrier: inside a Prefect flow, Prefect's own SIGTERM
handler raises ``TerminationSignal``, which a task may report as a failure (pydantic wraps it when it
serializes the task's state) and a retried task then swallows; a handler that fires in a ``__del__`` or a
weakref callback has its exception printed and dropped. So every handler here first *records* the signal
in :data:`RECEIVED`, and the code honours the record at the points it controls:

- :func:`interruptible` - a plan runner that refuses to start (or return from) a node once a signal is
  recorded, so the plan stops at the next node boundary even when the exception was lost;
- :func:`record_prefect_sigterm` - Prefect's SIGTERM bridge records before it raises;
- :func:`signals_as_interrupt` - the CLI's block: the signal raises ``KeyboardInterrupt`` (every cleanup
  runs), and however the block ends after a recorded signal, the process then dies of that signal.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from astrolabe.artifacts.manifest import Manifest
    from astrolabe.artifacts.plan import Node, Runner

RECEIVED: list[int] = []  # termination signals this process received, in order
HANDLED = (signal.SIGTERM, signal.SIGINT)


def record(signum: int) -> None:
    """Note that ``signum`` arrived (the run ends KILLED, the process dies of it)."""
    RECEIVED.append(int(signum))


def check() -> None:
    """Raise ``KeyboardInterrupt`` if a termination signal was recorded (a lost interrupt, raised again)."""
    if RECEIVED:
        raise KeyboardInterrupt(signal.Signals(RECEIVED[0]).name)


def interruptible(runner: Runner) -> Runner:
    """``runner`` that :func:`check` s before and after each node: after a signal no new node starts, and a node
    whose interrupt was swallowed (reported as a failure and retried, say) does not count as done."""

    def run(node: Node, inputs: Mapping[str, Path], force: bool) -> Manifest:
        check()
        manifest = runner(node, inputs, force)
        check()
        return manifest

    return run


def record_prefect_sigterm() -> None:
    """Make Prefect's SIGTERM bridge record the signal before it raises ``TerminationSignal``.

    ``prefect.utilities.engine.capture_sigterm`` installs (and compares against) the module attribute
    ``_prefect_sigterm_handler`` by name, so replacing the attribute is enough; idempotent. Prefect is pinned
    (pyproject), and a test fails if the attribute moves.
    """
    from prefect.utilities import engine

    original = engine._prefect_sigterm_handler
    if getattr(original, "__astrolabe_records__", False):
        return

    def recording_handler(sig_num: int, *args: object):
        record(sig_num)
        return original(sig_num, *args)

    recording_handler.__astrolabe_records__ = True  # type: ignore[attr-defined]
    engine._prefect_sigterm_handler = recording_handler


@contextmanager
def signals_as_interrupt(on_stop: Callable[[int], None] | None = None) -> Iterator[None]:
    """SIGTERM (like SIGINT) raises ``KeyboardInterrupt`` in the block, so every cleanup runs (the MLflow run is
    marked KILLED, the temporary Prefect server stopped); then this process dies of that signal (143 / 130).

    Whatever the block does with the interrupt - re-raise it, turn it into another exception, or swallow it
    and return - once a signal is recorded the process ends by it; ``on_stop(signum)`` runs first (a message).
    """

    def handler(signum: int, frame: object) -> None:
        record(signum)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in HANDLED}
    try:
        yield
    except KeyboardInterrupt:
        if not RECEIVED:  # an interrupt without a signal we saw (e.g. raised by the debugger): a SIGINT
            record(signal.SIGINT)
        raise
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)
        if RECEIVED:
            die_of(RECEIVED[0], on_stop)


def die_of(signum: int, on_stop: Callable[[int], None] | None = None) -> None:  # pragma: no cover - ends the process
    """End this process by ``signum`` with its default action (exit status -signum / 128 + signum)."""
    if on_stop is not None:
        try:
            on_stop(signum)
        except Exception:  # noqa: BLE001 - a message must not keep the process alive (e.g. a closed stdout)
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)  # may be taken by another thread, which still ends the process, but later:
    signal.pthread_kill(signal.pthread_self(), signum)  # delivered to this thread before the call returns
    os._exit(128 + signum)  # not reached
