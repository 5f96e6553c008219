"""What a stage is to the engine: its declaration (:class:`StageInfo`) and its typed result (:class:`StageResult`).

A stage module (``stages/<name>.py``) defines ``STAGE = StageInfo(...)`` and
``run(cfg, inputs, out_dir, iteration) -> StageResult`` (no Prefect import). ``run`` writes its files
into ``out_dir`` (a temporary directory) and returns what goes into the manifest, its metrics already
namespaced (``reward/<name>/mean``, ``loss/policy``, ``kl/...``, ``labels/...``, ``eval/...``,
``rollout/...``): whoever logs them needs not know which stage made them. The engine
(:mod:`astrolabe.artifacts.engine`) receives stage modules as arguments and never imports ``stages/``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

from astrolabe.config import RunConfig

Distribution = Literal["main", "sliced"]
DISTRIBUTIONS: tuple[str, ...] = ("main", "sliced")


@dataclass(frozen=True)
class StageInfo:
    """A stage's declaration.

    ``distribution`` says how it runs under N ranks: ``"sliced"``: every rank runs ``run`` into the same
    temporary directory, writing rank-named files (:func:`astrolabe.artifacts.ranks.rank_filename`); ``"main"``:
    rank 0 runs it, the other ranks wait. ``rank_invariant_counts`` name counts that every rank of a sliced
    stage reports with the same value (kept once, not summed); ``rank_summed_metrics`` name metrics that are
    summed over ranks (every other metric must be equal on the ranks that report it), see
    :func:`astrolabe.artifacts.engine.merge_results`. A sliced stage may also define ``merge_ranks`` (see
    :mod:`astrolabe.artifacts.engine`) to merge the ranks' files on rank 0 before publication.
    """

    name: str
    code_version: str
    config_subset: Callable[[RunConfig], dict[str, Any]]  # the part of the config this stage reads
    per_iteration: bool = True
    distribution: Distribution = "main"
    rank_invariant_counts: tuple[str, ...] = ()
    rank_summed_metrics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.distribution not in DISTRIBUTIONS:
            raise ValueError(f"stage {self.name}: distribution must be one of {DISTRIBUTIONS}, got {self.distribution!r}")


@dataclass
class StageResult:
    """What one run of a stage returns; the engine records every field in the manifest.

    ``metrics``: namespaced scalars for the tracker (``reward/<name>/mean`` ...; build them with
    :func:`finite_metrics`); ``reports``: ``{file relative to out_dir: tracking-run folder}`` of files worth
    attaching to the run (an evaluation grid); ``counts``, ``seeds``, ``timings`` (seconds), ``extra``: the
    stage's own bookkeeping.
    """

    counts: dict[str, int] = field(default_factory=dict)
    seeds: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    reports: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class StageModule(Protocol):
    STAGE: StageInfo

    def run(self, cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None) -> StageResult: ...


StageRegistry = Mapping[str, StageModule]  # stage name -> module, in plan order (``stages.STAGES``)


def finite_metrics(values: Mapping[str, float | int | None], prefix: str = "") -> dict[str, float]:
    """``{prefix + name: float(value)}`` of the finite values; None, NaN and inf are left out (nothing to plot)."""
    return {f"{prefix}{k}": float(v) for k, v in values.items() if v is not None and math.isfinite(float(v))}
