"""One progress display for a training run, the same in both engines: iteration k/N, current stage, ETA.

:class:`RunProgress` is the model (no I/O): it is told when a plan node starts and finishes and estimates
the time left as

    ETA = sum over nodes not yet finished of est(stage) - (elapsed time of the running node),
    est(stage) = mean seconds of the nodes of that stage computed so far (else of all computed nodes),

cached nodes counting 0 s. It is unknown (None) until a node was computed. :func:`display` renders it with
rich: a live bar on a terminal, one line per finished iteration otherwise (logs, CI, pipes).

The CLI installs the display as the process's listener (:func:`listening`); :func:`flows.run.train_run`
receives its ``start``/``done`` from the local engine directly and from the Prefect flow through
:func:`current`, since a flow's parameters cannot carry callbacks.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from astrolabe.artifacts.plan import Node, NodeResult, RunResults


class RunListener(Protocol):
    def start(self, node: Node) -> None: ...

    def done(self, res: NodeResult, results: RunResults) -> None: ...


def step_of(node: Node) -> int:
    """The training iteration (1-based) a node belongs to; 0 for the set-up (prompts, baseline evaluation).

    ``rollout[k] .. nft_update[k]`` and the evaluation of their policy ``evaluate[k+1]`` are iteration k+1.
    """
    if node.iteration is None:
        return 0
    if node.stage == "evaluate":
        return node.iteration
    return node.iteration + 1


def fmt_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


@dataclass
class RunProgress:
    """Where a run is: nodes finished, the running node, and the time each computed stage took."""

    nodes: Sequence[Node]
    iterations: int
    finished: int = 0
    current: Node | None = None
    current_since: float = 0.0
    seconds: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    clock: Any = time.monotonic

    def start(self, node: Node) -> None:
        self.current, self.current_since = node, self.clock()

    def done(self, res: NodeResult, results: RunResults | None = None) -> None:
        if not res.cached:
            self.seconds[res.node.stage].append(float(res.manifest.timings.get("total", 0.0)))
        self.finished += 1
        self.current = None

    def estimate(self, stage: str) -> float | None:
        own = self.seconds.get(stage)
        if own:
            return sum(own) / len(own)
        every = [s for v in self.seconds.values() for s in v]
        return sum(every) / len(every) if every else None

    def eta_s(self) -> float | None:
        left = self.nodes[self.finished:]
        if not left:
            return 0.0
        ests = [self.estimate(n.stage) for n in left]
        if any(e is None for e in ests):
            return None
        eta = sum(e for e in ests if e is not None)
        if self.current is not None:
            eta -= min(self.clock() - self.current_since, ests[0] or 0.0)
        return max(eta, 0.0)

    def step(self) -> int:
        node = self.current or (self.nodes[self.finished] if self.finished < len(self.nodes) else None)
        return self.iterations if node is None else step_of(node)

    def describe(self) -> str:
        """``iteration 3/24 · score[2]`` (``set-up`` before the first iteration)."""
        k = self.step()
        where = "set-up" if k == 0 else f"iteration {k}/{self.iterations}"
        return f"{where} · {self.current.label}" if self.current is not None else where

    def iteration_finished(self, res: NodeResult) -> bool:
        """Whether ``res`` was the last node of its iteration in the plan."""
        i = self.finished - 1
        return i + 1 >= len(self.nodes) or step_of(self.nodes[i + 1]) != step_of(res.node)


# ----------------------------------------------------------------------------------- the process's listener

_LISTENER: RunListener | None = None


def current() -> RunListener | None:
    """The listener installed by the CLI in this process (None in a worker or a plain flow call)."""
    return _LISTENER


@contextmanager
def listening(listener: RunListener | None) -> Iterator[RunListener | None]:
    global _LISTENER
    previous, _LISTENER = _LISTENER, listener
    try:
        yield listener
    finally:
        _LISTENER = previous


# ----------------------------------------------------------------------------------- rendering


class _Display:
    """Renders a :class:`RunProgress` on a rich console (live bar on a terminal, else a line per iteration)."""

    def __init__(self, model: RunProgress, console: Any) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.model, self.console, self.start_time = model, console, time.monotonic()
        self.live = console.is_terminal
        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"), console=console,
                            transient=True) if self.live else None  # fmt: skip
        self.task = self.bar.add_task(model.describe(), total=len(model.nodes), eta="?") if self.bar else None

    def _refresh(self) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=self.model.finished, description=self.model.describe(),
                            eta=fmt_seconds(self.model.eta_s()))  # fmt: skip

    def start(self, node: Node) -> None:
        self.model.start(node)
        self._refresh()

    def done(self, res: NodeResult, results: RunResults) -> None:
        self.model.done(res, results)
        self._refresh()
        if not self.live and self.model.iteration_finished(res):
            k = step_of(res.node)
            what = "set-up" if k == 0 else f"iteration {k}/{self.model.iterations}"
            self.console.print(f"{what} done, {fmt_seconds(time.monotonic() - self.start_time)} elapsed, "
                               f"ETA {fmt_seconds(self.model.eta_s())}", highlight=False)  # fmt: skip


@contextmanager
def display(nodes: Sequence[Node], iterations: int, console: Any, enabled: bool = True) -> Iterator[RunListener | None]:
    """Show the progress of a run over ``nodes`` for the block and install it as the process's listener."""
    if not enabled:
        yield None
        return
    shown = _Display(RunProgress(nodes, iterations), console)
    with shown.bar if shown.bar is not None else nullcontext(), listening(shown):
        yield shown

