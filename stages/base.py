"""What every stage shares: its declaration, its result, and the driver that caches and publishes it.

A stage module defines ``STAGE = StageInfo(...)`` and ``run(cfg, inputs, out_dir, iteration) -> StageResult``
(no Prefect import). ``run`` writes its files into ``out_dir`` (a temporary directory) and returns what
goes into the manifest. :func:`execute` computes the cache key (stage name, the config subset the stage
reads, the keys of its inputs, the stage's code version), skips when a complete manifest with that key
exists, otherwise runs the stage and publishes atomically (manifest written last, then a rename).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from astrolabe.artifacts import Manifest, StageDir, cache_key
from astrolabe.config import RunConfig

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StageInfo:
    name: str
    code_version: str
    config_subset: Callable[[RunConfig], dict[str, Any]]  # the part of the config this stage reads
    per_iteration: bool = True


@dataclass
class StageResult:
    counts: dict[str, int] = field(default_factory=dict)
    seeds: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


class StageModule(Protocol):
    STAGE: StageInfo

    def run(self, cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None) -> StageResult: ...


def stage_key(stage: StageModule, cfg: RunConfig, inputs: Mapping[str, Path]) -> tuple[str, dict[str, str]]:
    """The cache key of ``stage`` given its (complete) input directories, and the input keys by name."""
    input_keys = {name: Manifest.load(path).key for name, path in sorted(inputs.items())}
    subset = stage.STAGE.config_subset(cfg)
    key = cache_key(stage.STAGE.name, subset, [f"{n}:{k}" for n, k in input_keys.items()], stage.STAGE.code_version)
    return key, input_keys


def execute(
    stage: StageModule,
    cfg: RunConfig,
    run_path: Path,
    inputs: Mapping[str, Path],
    iteration: int | None = None,
    force: bool = False,
) -> Manifest:
    """Run ``stage`` unless its output for this key is complete; returns the published manifest."""
    info = stage.STAGE
    it = iteration if info.per_iteration else None
    key, input_keys = stage_key(stage, cfg, inputs)
    sd = StageDir(run_path, info.name, key, it)
    if sd.is_complete() and not force:
        log.info("%s (iteration %s) is cached at %s", info.name, it, sd.path)
        return sd.load_manifest()
    if sd.is_complete() and force:
        import shutil

        shutil.rmtree(sd.path)
    out = sd.begin()
    start = time.perf_counter()
    try:
        result = stage.run(cfg, inputs, out, it)
    except BaseException:
        sd.abort()
        raise
    timings = {"total": time.perf_counter() - start, **result.timings}
    manifest = sd.manifest(
        inputs=input_keys,
        config=info.config_subset(cfg),
        seeds=result.seeds,
        counts=result.counts,
        timings=timings,
        code_version=info.code_version,
        extra=result.extra,
    )
    return sd.publish(manifest)
