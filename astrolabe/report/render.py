"""The report as one self-contained HTML page (inline CSS, plots as PNG and videos as mp4 ``data:`` URIs).

Sections, in the order a reader wants them: the held-out change of every reward (first -> last evaluation),
reward curves (training rollouts and held-out evaluations, one panel per reward), the before/after grid
(one row per held-out sample with its caption, one playable video per evaluated iteration), the
selective-KL fraction and KL, time and peak memory per stage, and the config's differences from the defaults.

:func:`render_pair` puts two runs on one page (``astrolabe report RUN --vs OTHER``, e.g. tiny-hacking vs
tiny-guarded): their results tables next to each other, every reward's curves of both runs in one panel (shared
axes), the settings where the two configs differ, and their selective-KL and stage sections next to each other.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from html import escape

from astrolabe.artifacts.plan import config_diff
from astrolabe.report.collect import GridCell, ReportData, Series
from astrolabe.report.media import browser_video, data_uri
from astrolabe.tracking import panels_png

STAGE_ORDER = ("filter_prompts", "arcopo_buffer", "rollout", "score", "label_uncertainty", "nft_update", "evaluate")
FEW_VIDEOS = 8  # fewer videos per evaluation than this: the reader is told the changes are noisy

CSS = """
body{font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1f2328;background:#f6f8fa;margin:0}
main{max-width:1120px;margin:0 auto;padding:24px 28px 64px}
header{background:#0d1b2a;color:#fff;padding:22px 28px}
header h1{margin:0 0 4px;font-size:26px} header p{margin:2px 0;color:#c9d3df}
section{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:16px 20px;margin:18px 0}
h2{font-size:19px;margin:0 0 10px;border-bottom:1px solid #eaeef2;padding-bottom:6px}
table{border-collapse:collapse;font-size:14px} th,td{padding:4px 10px;border-bottom:1px solid #eaeef2;text-align:right}
th{background:#f6f8fa} td.l,th.l{text-align:left} code{font-size:13px}
.up{color:#1a7f37;font-weight:600} .down{color:#cf222e;font-weight:600} .muted{color:#656d76;font-size:13px}
img.plot{max-width:100%;display:block;margin:6px 0}
table.grid td,table.grid th{vertical-align:top;text-align:center} table.grid th.l{text-align:left}
table.config td{text-align:left;font-family:ui-monospace,monospace;font-size:13px;max-width:420px;overflow-wrap:anywhere}
table.config td:first-child{white-space:nowrap} table.grid td.caption{text-align:left;max-width:260px;font-weight:600}
table.grid video{width:192px;height:auto;image-rendering:pixelated;background:#000;border-radius:4px}
.scores{font-size:12px;color:#444;text-align:left;margin-top:2px}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:14px} .pair>div{min-width:0} .pair section{overflow-x:auto}
.pair h3{margin:10px 0 0;font-size:16px}
"""


def fmt(v: object) -> str:
    """A number with 4 significant digits (``-`` when missing or not finite); anything else as text."""
    if isinstance(v, bool) or v is None:
        return "-" if v is None else str(v)
    if isinstance(v, (int, float)):
        return "-" if not math.isfinite(v) else f"{v:.4g}"
    return str(v)


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], left: int = 1, cls: str = "") -> str:
    """An HTML table of already escaped cells; the first ``left`` columns aligned left."""
    def cells(tag: str, row: Sequence[str]) -> str:
        return "".join(f"<{tag}{' class=l' if i < left else ''}>{c}</{tag}>" for i, c in enumerate(row))

    body = "".join(f"<tr>{cells('td', r)}</tr>" for r in rows)
    return f"<table{f' class={cls}' if cls else ''}><tr>{cells('th', head)}</tr>{body}</table>"


def _change(delta: float | None) -> str:
    if delta is None or not math.isfinite(delta):
        return "-"
    cls = "up" if delta > 0 else "down" if delta < 0 else ""
    return f"<span class='{cls}'>{delta:+.4g}</span>"


def _plot(panels: Mapping[str, Mapping[str, Series]], alt: str) -> str:
    png = panels_png(panels, legend=True, xlabel="iteration")
    return f"<img class=plot alt='{escape(alt)}' src='{data_uri('image/png', png)}'>"


# ----------------------------------------------------------------------------------- sections


def header(d: ReportData) -> str:
    c = d.cfg
    wall = f", last attempt {d.wall_seconds:.0f} s wall" if d.wall_seconds is not None else ""
    date = d.created[:19].replace("T", " ") + " UTC" if d.created else "no stage output yet"
    return (f"<header><h1>Astrolabe report: {escape(d.run_name)}</h1>"
            f"<p>{escape(date)} &middot; base model <code>{escape(c.model.base)}</code> &middot; "
            f"{c.pipeline.iterations} iterations, {escape(c.rl.algorithm)}{escape(wall)}</p>"
            f"<p class=muted>{escape(str(d.run_path))}</p></header>")


def headline(d: ReportData) -> str:
    """Held-out means at the first and last evaluation, per reward and combined; training reward first -> last."""
    parts = ["<section id=headline><h2>Results: first &rarr; last evaluation (held-out prompts)</h2>"]
    if d.evals:
        first, last = min(d.evals), max(d.evals)
        a, b = d.evals[first], d.evals[last]
        rows = []
        for name in [*d.weights, "combined"]:
            key = f"reward/{name}/mean" if name != "combined" else "combined/mean"
            va, vb = a.get(key), b.get(key)
            delta = vb - va if va is not None and vb is not None else None
            weight = fmt(d.weights[name]) if name in d.weights else "weighted sum"
            rows.append([escape(name), weight, fmt(va), fmt(vb), _change(delta)])
        parts.append(_table(["reward", "weight", f"iteration {first}", f"iteration {last}", "change"], rows))
        n = b.get("n")
        few = " (few videos: small changes are noise)" if n is not None and n < FEW_VIDEOS else ""
        parts.append(f"<p class=muted>Videos per evaluation (held-out prompts x eval seeds): {fmt(n)}{few}.</p>")
    else:
        parts.append("<p>No evaluation yet.</p>")
    if d.train:
        rows = [[escape(n), fmt(s[0][1]), fmt(s[-1][1]), _change(s[-1][1] - s[0][1])] for n, s in d.train.items()]
        its = [p[0] for s in d.train.values() for p in s]
        parts.append(f"<p>Training rollouts (mean reward of the iteration's samples), iteration {min(its):g} "
                     f"&rarr; {max(its):g}:</p>" + _table(["reward", "first", "last", "change"], rows))
    return "".join(parts) + "</section>"


def curve_panels(d: ReportData) -> dict[str, dict[str, Series]]:
    """One panel per reward with its training-rollout and held-out curves, and the weighted held-out sum."""
    panels: dict[str, dict[str, Series]] = {}
    for name in d.reward_names:
        evals = [(float(k), m[f"reward/{name}/mean"]) for k, m in sorted(d.evals.items())
                 if m.get(f"reward/{name}/mean") is not None]
        panels[name] = {"training rollouts": d.train.get(name, []), "held-out eval": evals}
    combined = [(float(k), m["combined/mean"]) for k, m in sorted(d.evals.items()) if m.get("combined/mean") is not None]
    if combined:
        panels["combined (weighted, held-out)"] = {"held-out eval": combined}
    return panels


def curves(d: ReportData) -> str:
    panels = curve_panels(d)
    if not panels:
        return "<section id=curves><h2>Reward curves</h2><p>No scores yet.</p></section>"
    return ("<section id=curves><h2>Reward curves</h2><p class=muted>Mean reward per iteration: training rollouts "
            "(score stage) and held-out evaluations (evaluate stage).</p>"
            + _plot(panels, "reward curves: " + ", ".join(panels)) + "</section>")


def _video_cell(cell: GridCell) -> str:
    if cell.video is None:
        return "<td class=muted>no video</td>"
    mp4, poster = browser_video(cell.video, cell.fps)
    scores = "<br>".join(f"{escape(n)} {fmt(v)}" for n, v in cell.scores.items())
    return (f"<td><video controls loop muted autoplay playsinline poster='{data_uri('image/png', poster)}' "
            f"src='{data_uri('video/mp4', mp4)}'></video><div class=scores>{scores}</div></td>")


def grid(d: ReportData) -> str:
    if not d.grid:
        return "<section id=grid><h2>Before / after</h2><p>No evaluation videos yet.</p></section>"
    head = ["held-out caption", *[f"iteration {k}" for k in d.grid_columns]]
    rows = "".join(f"<tr><td class=caption>{escape(r.caption)}<div class=muted>{escape(r.key)}</div></td>"
                   + "".join(_video_cell(c) for c in r.cells) + "</tr>" for r in d.grid)
    th = "".join(f"<th{' class=l' if i == 0 else ''}>{escape(h)}</th>" for i, h in enumerate(head))
    return ("<section id=grid><h2>Before / after</h2><p class=muted>The same held-out prompt and noise seed in each "
            "row; the scores under each video are its eval rewards.</p>"
            f"<table class=grid><tr>{th}</tr>{rows}</table></section>")


def kl(d: ReportData) -> str:
    skl = d.cfg.rl.selective_kl
    if skl is None:
        what = "Selective KL is off (<code>rl.selective_kl: null</code>)."
    else:
        aux = ", ".join(skl.auxiliary_rewards)
        what = (f"Selective KL is on: the KL penalty applies to samples whose ranks under <code>{escape(skl.main_reward)}"
                f"</code> and <code>{escape(aux)}</code> disagree most.")
    body = _plot({k: {"": v} for k, v in d.kl.items()}, "selective KL and KL") if d.kl else "<p>No KL metrics.</p>"
    return f"<section id=kl><h2>Selective KL and KL</h2><p>{what}</p>{body}</section>"


def stage_table(d: ReportData) -> str:
    by_stage: dict[str, list] = defaultdict(list)
    for r in sorted(d.stages, key=lambda r: STAGE_ORDER.index(r.stage) if r.stage in STAGE_ORDER else len(STAGE_ORDER)):
        by_stage[r.stage].append(r)

    def peak(values: Iterable[float | None]) -> str:
        vals = [v for v in values if v is not None]
        return fmt(max(vals)) if vals else "-"

    rows = [[escape(s), str(len(rs)), fmt(sum(r.seconds for r in rs)), fmt(sum(r.seconds for r in rs) / len(rs)),
             peak(r.peak_rss_mib for r in rs), peak(r.peak_cuda_mib for r in rs)] for s, rs in by_stage.items()]
    total = sum(r.seconds for r in d.stages)
    calls = [[escape(r.stage), "-" if r.iteration is None else str(r.iteration), fmt(r.seconds), fmt(r.peak_rss_mib),
              fmt(r.peak_cuda_mib), escape(r.created[:19])] for r in d.stages]
    return ("<section id=stages><h2>Time and peak memory per stage</h2>"
            + _table(["stage", "calls", "total s", "mean s", "peak RSS MiB", "peak CUDA MiB"], rows)
            + f"<p class=muted>{fmt(total)} s of stage compute in all. Peak RSS: the stage process's resident "
            "memory; peak CUDA: torch's max allocated (GPU runs only).</p><details><summary>every stage call"
            "</summary>" + _table(["stage", "iteration", "s", "peak RSS MiB", "peak CUDA MiB", "created (UTC)"],
                                   calls) + "</details></section>")


def config_value(v: object) -> str:
    """A config value as in YAML / JSON: ``null``, ``true``, ``[1000]``, ``{"name": "motion", ...}``."""
    return v if isinstance(v, str) else json.dumps(v, default=str)


def config_table(changes: Sequence[tuple[str, object, object]], head: Sequence[str]) -> str:
    """``(dotted key, value, value)`` rows as a three-column table."""
    rows = [[f"<code>{escape(k)}</code>", escape(config_value(a)), escape(config_value(b))] for k, a, b in changes]
    return _table(head, rows, left=3, cls="config")


def config_section(d: ReportData) -> str:
    body = (config_table(d.config_changes, ["setting", "default", "this run"]) if d.config_changes
            else "<p>Every setting is at its default.</p>")
    return f"<section id=config><h2>Config: differences from the defaults</h2>{body}</section>"


def page(title: str, head: str, body: str) -> str:
    """The HTML document: ``title``, the ``head`` banner and ``body`` sections."""
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{escape(title)}</title><style>{CSS}"
            f"</style></head><body>{head}<main>{body}</main></body></html>\n")


def render(d: ReportData) -> str:
    """The whole page."""
    body = "".join(f(d) for f in (headline, curves, grid, kl, stage_table, config_section))
    return page(f"Astrolabe report: {d.run_name}", header(d), body)


# ----------------------------------------------------------------------------------- two runs


def pair_labels(a: ReportData, b: ReportData) -> tuple[str, str]:
    """How the two runs are called on the page: their names; ``name (parent dir)`` when the names are equal (two
    runs roots), ``name (1)`` / ``name (2)`` when those are equal too."""
    if a.run_name != b.run_name:
        return a.run_name, b.run_name
    if a.run_path.parent.name != b.run_path.parent.name:
        return f"{a.run_name} ({a.run_path.parent.name})", f"{b.run_name} ({b.run_path.parent.name})"
    return f"{a.run_name} (1)", f"{b.run_name} (2)"


def pair_panels(a: ReportData, b: ReportData) -> dict[str, dict[str, Series]]:
    """:func:`curve_panels` of both runs merged: one panel per reward of either run holding both runs' curves
    (labelled ``<run>: <curve>``), so the two runs share the axes. Empty curves are left out, and so is the
    combined reward (each run weighs its rewards differently: its sums are not comparable)."""
    panels: dict[str, dict[str, Series]] = {}
    for d, label in zip((a, b), pair_labels(a, b)):
        for name, curves_of_run in curve_panels(d).items():
            for curve, points in curves_of_run.items():
                if points and name in d.reward_names:
                    panels.setdefault(name, {})[f"{label}: {curve}"] = points
    return panels


def side_by_side(a: ReportData, b: ReportData, section: Callable[[ReportData], str]) -> str:
    """``section`` of each run in two columns, each headed by the run's name."""
    cols = "".join(f"<div><h3>{escape(label)}</h3>{section(d)}</div>" for d, label in zip((a, b), pair_labels(a, b)))
    return f"<div class=pair>{cols}</div>"


def pair_curves(a: ReportData, b: ReportData) -> str:
    panels = pair_panels(a, b)
    if not panels:
        return "<section id=curves><h2>Reward curves</h2><p>No scores yet.</p></section>"
    return ("<section id=curves><h2>Reward curves, both runs</h2><p class=muted>One panel per reward with both runs' "
            "training-rollout and held-out curves on shared axes.</p>"
            + _plot(panels, "reward curves of both runs: " + ", ".join(panels)) + "</section>")


def pair_config(a: ReportData, b: ReportData) -> str:
    changes = config_diff(a.cfg, b.cfg)
    la, lb = pair_labels(a, b)
    body = config_table(changes, ["setting", la, lb]) if changes else "<p>The two configs are equal.</p>"
    return f"<section id=config><h2>Config: where the two runs differ</h2>{body}</section>"


def render_pair(a: ReportData, b: ReportData) -> str:
    """One page comparing two runs (module docstring); each run's own report keeps its before/after videos."""
    la, lb = pair_labels(a, b)
    head = (f"<header><h1>Astrolabe comparison: {escape(la)} vs {escape(lb)}</h1>"
            f"<p class=muted>{escape(str(a.run_path))} &middot; {escape(str(b.run_path))}</p></header>")
    body = (side_by_side(a, b, headline) + pair_curves(a, b) + pair_config(a, b) + side_by_side(a, b, kl)
            + side_by_side(a, b, stage_table))
    return page(f"Astrolabe comparison: {la} vs {lb}", head, body)
