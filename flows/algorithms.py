"""NFT vs AR-CoPO vs AR-CoPO + merge, run for run: the same base model, prompts, rewards and iteration budget,
several seeds, one table (``astrolabe bench algorithms``).

Each (method, seed) is an ordinary run trained by :func:`flows.run.train_run` (local engine) under one runs
root, so ``astrolabe compare`` and ``astrolabe report`` read them like any other run. The table gives, per
method, the mean and the spread (min..max) over seeds of:

    gain[m]      = eval m at the last evaluation - eval m at iteration 0      (m: every eval reward mean)
    wall_s       = the run's wall time (one process, this machine: compare within one table only)
    peak_rss_mib = the largest peak resident memory any stage of the run recorded (manifest timings)

AR-CoPO + merge reports the merged model ``W0 + dW_semi + s dW_on`` at the scale the paper's rule chose
(``eval/merge/s``); plain AR-CoPO is the same config with ``arcopo.semi: null``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from astrolabe.artifacts.manifest import Manifest
from astrolabe.config import load_config

log = logging.getLogger(__name__)

__all__ = ["METHODS", "WORLD_METHODS", "Method", "MethodRun", "compare_methods", "run_method", "summarize_methods"]


@dataclass(frozen=True)
class Method:
    """One arm of the comparison: a config file and the overrides that make it this method."""

    name: str
    config: str
    overrides: tuple[str, ...] = ()


METHODS = (
    Method("nft", "configs/tiny.yaml"),
    Method("arcopo", "configs/tiny-arcopo.yaml", ("arcopo.semi=null",)),
    Method("arcopo+merge", "configs/tiny-arcopo.yaml"),
)
# The same three arms on the tiny world (pretrained world model, world captions, verifiable world rewards).
WORLD_METHODS = (
    Method("nft", "configs/tiny-world.yaml"),
    Method("arcopo", "configs/tiny-world-arcopo.yaml", ("arcopo.semi=null",)),
    Method("arcopo+merge", "configs/tiny-world-arcopo.yaml"),
)


@dataclass(frozen=True)
class MethodRun:
    """What one (method, seed) run measured."""

    method: str
    seed: int
    run_path: Path
    wall_s: float
    peak_rss_mib: float
    first: dict[str, float]  # eval metrics at iteration 0
    last: dict[str, float]  # eval metrics at the last evaluation
    merge_scale: float | None  # AR-CoPO + merge: the reported s

    def gain(self, metric: str) -> float:
        return self.last.get(metric, math.nan) - self.first.get(metric, math.nan)


def _manifests(run_path: Path, stage: str) -> list[Manifest]:
    return [Manifest.load(p.parent) for p in sorted(run_path.glob(f"iter-*/{stage}/*/manifest.json"))]


def read_run(method: str, seed: int, run_path: Path, wall_s: float) -> MethodRun:
    """The eval metrics at the first and last evaluation and the peak memory, from the run's manifests."""
    evals = sorted(_manifests(run_path, "evaluate"), key=lambda m: m.iteration or 0)
    if not evals:
        raise RuntimeError(f"{run_path} has no evaluate output: the comparison needs pipeline.eval_every to hit")
    strip = lambda m: {k[len("eval/"):]: float(v) for k, v in m.metrics.items() if k.startswith("eval/")}  # noqa: E731
    first, last = strip(evals[0]), strip(evals[-1])
    peaks = [float(m.timings.get("peak_rss_mib", math.nan)) for p in ("rollout", "score", "nft_update", "evaluate")
             for m in _manifests(run_path, p)]
    scale = last.get("merge/s")
    return MethodRun(method, seed, run_path, wall_s, max(peaks, default=math.nan), first, last, scale)


def run_method(method: Method, seed: int, runs_root: Path, overrides: Sequence[str] = ()) -> MethodRun:
    """Train (or resume) run ``<method>-s<seed>`` under ``runs_root`` and read what it measured."""
    from flows.run import train_run

    name = f"{method.name.replace('+', '-')}-s{seed}"
    sets = [*method.overrides, *overrides, f"seed={seed}", f"name={name}", f"pipeline.runs_root={runs_root}"]
    cfg = load_config(Path(method.config), sets)
    start = time.perf_counter()
    summary = train_run(cfg)
    return read_run(method.name, seed, summary.run_path, time.perf_counter() - start)


def compare_methods(seeds: Sequence[int], runs_root: Path, overrides: Sequence[str] = (),
                    methods: Sequence[Method] = METHODS,
                    on_run: Callable[[MethodRun], None] | None = None) -> list[MethodRun]:  # fmt: skip
    """Every method x seed, seeds interleaved (so machine load drifts alike over the methods)."""
    runs = []
    for seed in seeds:
        for method in methods:
            run = run_method(method, seed, runs_root, overrides)
            log.info("%s seed %d: %.0f s", method.name, seed, run.wall_s)
            if on_run is not None:
                on_run(run)
            runs.append(run)
    return runs


def _spread(values: Sequence[float]) -> dict[str, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return {"mean": math.nan, "min": math.nan, "max": math.nan}
    return {"mean": sum(finite) / len(finite), "min": min(finite), "max": max(finite)}


def summarize_methods(runs: Sequence[MethodRun], metrics: Sequence[str] | None = None) -> dict[str, dict]:
    """``method -> {"seeds", "gain/<metric>": spread, "last/<metric>": spread, "wall_s", "peak_rss_mib"}``; the
    metrics default to every ``.../mean`` eval metric the runs share (the merge sweep's per-scale ones left out)."""
    if metrics is None:
        common = set.intersection(*(set(r.last) for r in runs)) if runs else set()
        metrics = sorted(m for m in common if m.endswith("/mean") and not m.startswith("merge/"))
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r.method for r in runs):
        mine = [r for r in runs if r.method == name]
        row: dict = {"seeds": [r.seed for r in mine]}
        for m in metrics:
            row[f"gain/{m}"] = _spread([r.gain(m) for r in mine])
            row[f"last/{m}"] = _spread([r.last.get(m, math.nan) for r in mine])
        row["wall_s"] = _spread([r.wall_s for r in mine])
        row["peak_rss_mib"] = _spread([r.peak_rss_mib for r in mine])
        scales = [r.merge_scale for r in mine if r.merge_scale is not None]
        if scales:
            row["merge_scales"] = scales
        out[name] = row
    return out
