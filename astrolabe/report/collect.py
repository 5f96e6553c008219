"""What the report shows, read from a run's stage outputs (manifests and their files) only: no MLflow, offline.

The caller names the outputs (:class:`StageOutput`: the plan's complete nodes, see ``flows/cli_report.py``),
so a rescore's extra score outputs or outputs of an older config are never mixed in. Series are
``[(iteration, value), ...]`` with the iteration of the stage call (a training stage ``k`` runs with the
policy after ``k`` updates; ``evaluate[k]`` evaluates the policy after ``k`` updates).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from astrolabe.artifacts.manifest import Manifest
from astrolabe.artifacts.plan import config_diff
from astrolabe.config import RunConfig

Series = list[tuple[float, float]]

HELDOUT_FILE = "heldout.txt"  # of a filter_prompts output: the evaluated prompts, in sample-key order
SUMMARY_FILE = "run-summary.json"
MAX_GRID_ROWS = 8
MAX_GRID_COLUMNS = 4
_SAMPLE_KEY = re.compile(r"^p(\d+)-s(-?\d+)$")  # evaluate's p{i:03d}-s{seed}


@dataclass(frozen=True)
class StageOutput:
    """One complete stage output of the run: where it is and its manifest."""

    stage: str
    iteration: int | None
    path: Path
    manifest: Manifest


@dataclass(frozen=True)
class StageRow:
    """Time and peak memory of one stage call (from its manifest's timings)."""

    stage: str
    iteration: int | None
    seconds: float
    peak_rss_mib: float | None
    peak_cuda_mib: float | None
    created: str


@dataclass(frozen=True)
class GridCell:
    iteration: int
    video: Path | None  # None: that evaluation has no video of this sample
    fps: float
    scores: dict[str, float]  # reward -> raw score of this sample (NaN: could not score)


@dataclass(frozen=True)
class GridRow:
    key: str  # p{i:03d}-s{seed}
    caption: str
    cells: list[GridCell]


@dataclass
class ReportData:
    run_name: str
    run_path: Path
    created: str  # newest manifest's creation time (ISO, UTC)
    cfg: RunConfig
    config_changes: list[tuple[str, object, object]]  # (dotted key, default, value)
    weights: dict[str, float]  # eval reward -> weight
    train: dict[str, Series]  # reward -> score-stage mean per iteration
    evals: dict[int, dict[str, float]]  # evaluated iteration -> eval metrics without the eval/ prefix
    kl: dict[str, Series]  # selective-KL and KL series (see :func:`kl_series`)
    stages: list[StageRow]
    grid_columns: list[int] = field(default_factory=list)  # evaluated iterations shown side by side
    grid: list[GridRow] = field(default_factory=list)
    wall_seconds: float | None = None  # of the last `astrolabe train` attempt (run-summary.json)

    @property
    def reward_names(self) -> list[str]:
        """Rewards with a training or eval curve, training rewards first."""
        names = list(self.train)
        for m in self.evals.values():
            names += [k.split("/")[1] for k in m if k.startswith("reward/") and k.endswith("/mean")]
        return list(dict.fromkeys(names))


# ----------------------------------------------------------------------------------- series


def _sorted_outputs(outputs: Sequence[StageOutput], stage: str) -> list[StageOutput]:
    return sorted((o for o in outputs if o.stage == stage and o.iteration is not None), key=lambda o: o.iteration or 0)


def train_series(outputs: Sequence[StageOutput]) -> dict[str, Series]:
    """``{reward: [(k, reward/<reward>/mean of score[k])]}``: the rollouts' mean reward per iteration."""
    out: dict[str, Series] = {}
    for o in _sorted_outputs(outputs, "score"):
        for k, v in o.manifest.metrics.items():
            parts = k.split("/")
            if len(parts) == 3 and parts[0] == "reward" and parts[2] == "mean" and math.isfinite(v):
                out.setdefault(parts[1], []).append((float(o.iteration or 0), v))
    return out


def eval_table(outputs: Sequence[StageOutput]) -> dict[int, dict[str, float]]:
    """``{k: {name: value}}`` of the ``eval/<name>`` metrics of ``evaluate[k]``, plus ``n`` (its videos)."""
    out: dict[int, dict[str, float]] = {}
    for o in _sorted_outputs(outputs, "evaluate"):
        m = {k[len("eval/"):]: v for k, v in o.manifest.metrics.items() if k.startswith("eval/")}
        if "videos" in o.manifest.counts:
            m["n"] = float(o.manifest.counts["videos"])
        out[o.iteration or 0] = m
    return out


KL_SERIES = {  # label in the report -> (stage, metric); label_uncertainty's kl/* live in its manifest's extra["kl"]
    "flagged fraction (selective KL)": ("label_uncertainty", "labels/flagged_fraction"),
    "target fraction (controller)": ("label_uncertainty", "kl/fraction"),
    "rank disagreement threshold": ("label_uncertainty", "kl/threshold"),
    "KL loss": ("nft_update", "loss/kl"),
    "old-ref MSE": ("nft_update", "kl/old_ref_mse"),
    "reference refreshed": ("nft_update", "update/ref_refreshed"),
}


def kl_series(outputs: Sequence[StageOutput]) -> dict[str, Series]:
    """The selective-KL fraction and KL per iteration (:data:`KL_SERIES`); series without any value are left out."""
    out: dict[str, Series] = {}
    for label, (stage, metric) in KL_SERIES.items():
        points = []
        for o in _sorted_outputs(outputs, stage):
            values = {**(o.manifest.extra.get("kl") or {}), **o.manifest.metrics}
            v = values.get(metric)
            if isinstance(v, (int, float)) and math.isfinite(v):
                points.append((float(o.iteration or 0), float(v)))
        if points:
            out[label] = points
    return out


def stage_rows(outputs: Sequence[StageOutput]) -> list[StageRow]:
    """One row per stage call, in the order they were made."""
    rows = []
    for o in outputs:
        t = o.manifest.timings
        rows.append(StageRow(o.stage, o.iteration, float(t.get("total", float("nan"))), t.get("peak_rss_mib"),
                             t.get("peak_cuda_mib"), o.manifest.created))
    return sorted(rows, key=lambda r: r.created)


def config_changes(cfg: RunConfig) -> list[tuple[str, object, object]]:
    """``(dotted key, default, value)`` of every setting of ``cfg`` that differs from the config classes' defaults."""
    return config_diff(RunConfig(), cfg)


# ----------------------------------------------------------------------------------- grid


def read_captions(outputs: Sequence[StageOutput]) -> list[str]:
    """The held-out prompts (``heldout.txt`` of the filter_prompts output), empty when there is none."""
    for o in outputs:
        if o.stage == "filter_prompts" and (o.path / HELDOUT_FILE).is_file():
            text = (o.path / HELDOUT_FILE).read_text(encoding="utf-8")
            return [line.strip() for line in text.splitlines() if line.strip()]
    return []


def _sample_scores(eval_dir: Path, names: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{sample key: {reward: score}}`` of an evaluate output's ``eval_rewards.zarr`` ({} when absent)."""
    from astrolabe.data.arrays import read_columns

    store = eval_dir / "eval_rewards.zarr"
    if not (store / "zarr.json").is_file():
        return {}
    keys, columns, _ = read_columns(store)
    return {key: {n: float(columns[n][i]) for n in names if n in columns} for i, key in enumerate(keys)}


def grid_iterations(evaluated: Sequence[int], max_columns: int = MAX_GRID_COLUMNS) -> list[int]:
    """The first and last evaluated iterations and evenly spaced ones between, at most ``max_columns``."""
    its = sorted(evaluated)
    if len(its) <= max_columns:
        return its
    step = (len(its) - 1) / (max_columns - 1)
    return [its[round(i * step)] for i in range(max_columns)]


def _seed_major(video: Path) -> tuple[int, int, str]:
    """Sort key of a sample video: the first seed of every prompt before the second (distinct captions first)."""
    m = _SAMPLE_KEY.match(video.stem)
    return (int(m[2]), int(m[1]), "") if m else (1 << 62, 0, video.stem)


def grid_rows(outputs: Sequence[StageOutput], names: Sequence[str], max_rows: int = MAX_GRID_ROWS
              ) -> tuple[list[int], list[GridRow]]:  # fmt: skip
    """Before/after rows: one per sample of the last evaluation (at most ``max_rows``, distinct prompts first), one
    cell per column of :func:`grid_iterations`, captioned with the sample's held-out prompt."""
    evals = {o.iteration or 0: o for o in _sorted_outputs(outputs, "evaluate")}
    if not evals:
        return [], []
    columns = grid_iterations(list(evals))
    captions = read_captions(outputs)
    scores = {k: _sample_scores(evals[k].path, names) for k in columns}
    last = evals[columns[-1]]
    rows = []
    for video in sorted((last.path / "videos").glob("*.mp4"), key=_seed_major)[:max_rows]:
        m = _SAMPLE_KEY.match(video.stem)
        caption = captions[int(m[1])] if m and int(m[1]) < len(captions) else video.stem
        cells = []
        for k in columns:
            path = evals[k].path / "videos" / video.name
            cells.append(GridCell(k, path if path.is_file() else None, float(evals[k].manifest.extra.get("fps", 16.0)),
                                  scores[k].get(video.stem, {})))
        rows.append(GridRow(video.stem, caption, cells))
    return columns, rows


# ----------------------------------------------------------------------------------- all of it


def _wall_seconds(run_path: Path) -> float | None:
    path = run_path / SUMMARY_FILE
    if not path.is_file():
        return None
    value = json.loads(path.read_text(encoding="utf-8")).get("wall_seconds")
    return float(value) if isinstance(value, (int, float)) else None


def eval_weights(cfg: RunConfig) -> dict[str, float]:
    """The weight of each reward reported at evaluation (``eval_rewards``, else ``rewards``)."""
    rewards = cfg.eval_rewards if cfg.eval_rewards is not None else cfg.rewards
    return {r.name: r.weight for r in rewards.rewards}


def collect(run_path: Path, cfg: RunConfig, outputs: Sequence[StageOutput]) -> ReportData:
    """Everything the report shows, from the run's complete stage ``outputs`` and its config."""
    weights = eval_weights(cfg)
    columns, rows = grid_rows(outputs, list(weights))
    return ReportData(
        run_name=cfg.name, run_path=Path(run_path),
        created=max((o.manifest.created for o in outputs), default=""),
        cfg=cfg, config_changes=config_changes(cfg), weights=weights,
        train=train_series(outputs), evals=eval_table(outputs), kl=kl_series(outputs), stages=stage_rows(outputs),
        grid_columns=columns, grid=rows, wall_seconds=_wall_seconds(Path(run_path)),
    )
