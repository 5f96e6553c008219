"""What the CLI shows about a run, as plain functions of plan statuses (no printing, no Prefect).

- :func:`status_lines`: the run as a grid that fits 80 columns for any number of iterations: one row per
  iteration (identical consecutive rows folded into ``k-m``), one column per stage, a legend and a count
  per status.
- :func:`verify_report`: what ``astrolabe verify RUN`` prints: every damaged / missing / stale node and the
  command that fixes them.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from astrolabe.artifacts.plan import STATUSES, NodeStatus

# column title of each per-iteration stage (``evaluate[k]`` is the policy after k iterations)
COLUMNS: dict[str, str] = {
    "rollout": "rollout",
    "score": "score",
    "label_uncertainty": "labels",
    "nft_update": "update",
    "evaluate": "evaluate",
}
CELL_WIDTH = 9  # "evaluate" + 1; every status word is at most 7 characters
STYLES: dict[str, str] = {"done": "green", "damaged": "bold red", "stale": "yellow", "missing": "dim", "": ""}
NOT_PLANNED = "-"


def _fold(rows: Sequence[tuple[int, tuple[str, ...]]]) -> list[tuple[str, tuple[str, ...]]]:
    """Consecutive rows with equal cells as one row labelled ``first-last``."""
    out: list[tuple[str, tuple[str, ...]]] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i][1] != rows[start][1]:
            first, last = rows[start][0], rows[i - 1][0]
            out.append((str(first) if first == last else f"{first}-{last}", rows[start][1]))
            start = i
    return out


def status_grid(statuses: Sequence[NodeStatus]) -> tuple[list[tuple[str, str]], list[tuple[str, tuple[str, ...]]]]:
    """``(once, rows)``: the iteration-independent nodes ``(label, status)``, and the per-iteration rows
    ``(iterations, cells)`` with one cell per :data:`COLUMNS` stage (``-``: not planned at that iteration)."""
    once = [(s.node.label, s.status) for s in statuses if s.node.iteration is None]
    by_iter: dict[int, dict[str, str]] = {}
    for s in statuses:
        if s.node.iteration is not None:
            by_iter.setdefault(s.node.iteration, {})[s.node.stage] = s.status
    rows = [(k, tuple(by_iter[k].get(st, NOT_PLANNED) for st in COLUMNS)) for k in sorted(by_iter)]
    return once, _fold(rows)


def status_lines(statuses: Sequence[NodeStatus], title: str) -> list[list[tuple[str, str]]]:
    """The status display as lines of ``(text, rich style)`` segments; every line is at most 80 characters
    whatever the number of iterations (keep ``title`` short: the run's name)."""
    once, rows = status_grid(statuses)
    label_w = max([len("iteration"), *(len(r[0]) for r in rows)])
    lines: list[list[tuple[str, str]]] = [[(title, "bold")]]
    for label, st in once:
        lines.append([(f"{label}: ", ""), (st, STYLES[st])])
    lines.append([("iteration".ljust(label_w) + "  " + "".join(c.ljust(CELL_WIDTH) for c in COLUMNS.values()).rstrip(),
                   "bold")])
    for label, cells in rows:
        line = [(label.rjust(label_w) + "  ", "")]
        for i, st in enumerate(cells):
            text = st if i == len(cells) - 1 else st.ljust(CELL_WIDTH)
            line.append((text, STYLES.get(st, "")))
        lines.append(line)
    counts = Counter(s.status for s in statuses)
    lines.append([(f"stage calls: {len(statuses)} (" + ", ".join(f"{counts[st]} {st}" for st in STATUSES) + ")", "")])
    lines.append([("legend: done = current, intact; damaged = files differ from the manifest;", "dim")])
    lines.append([("stale = made from other inputs/settings; missing = not run; - = not planned", "dim")])
    return lines


def train_command(run_path: Path) -> str:
    """The command that resumes (and repairs) the run at ``run_path``."""
    return f"astrolabe train {run_path / 'config.yaml'}"


def verify_report(statuses: Sequence[NodeStatus], run_path: Path) -> tuple[bool, list[str]]:
    """``(ok, lines)``: ok when every node is done and intact; otherwise one line per node that is not,
    with what is wrong, and the command that fixes them."""
    bad = [s for s in statuses if s.status != "done"]
    if not bad:
        return True, [f"{run_path}: all {len(statuses)} stage outputs are complete and match their manifests"]
    lines = [f"{run_path}: {len(bad)} of {len(statuses)} stage outputs are not usable:"]
    for s in bad:
        where = f" ({s.path})" if s.path is not None else ""
        detail = f": {'; '.join(s.problems)}" if s.problems else ""
        lines.append(f"  {s.node.label}: {s.status}{where}{detail}")
    counts = Counter(s.status for s in bad)
    lines.append(", ".join(f"{counts[st]} {st}" for st in STATUSES if counts[st]) + ". Fix: "
                 + train_command(run_path) + "  (recomputes exactly these; damaged outputs are moved aside)")
    return False, lines
