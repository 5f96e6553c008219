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
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from astrolabe.artifacts import Manifest, StageDir, cache_key
from astrolabe.memory import PeakMemory
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


def input_identity(manifest: Manifest) -> str:
    """What a consumer's key depends on: the input's key, and its instance after a forced rerun.

    Stages are deterministic, so a normal (re)computation of the same key is the same artifact and keeps
    its consumers valid (keys are then equal across run directories); ``--force`` is the user saying
    "redo this", so it publishes a new instance and everything made from the old one is stale.
    """
    return f"{manifest.key}@{manifest.instance}" if manifest.instance else manifest.key


def key_from_identities(stage: StageModule, cfg: RunConfig, identities: Mapping[str, str]) -> str:
    """The cache key of ``stage`` given ``{input name: input_identity}``."""
    subset = stage.STAGE.config_subset(cfg)
    return cache_key(stage.STAGE.name, subset, [f"{n}:{i}" for n, i in sorted(identities.items())],
                     stage.STAGE.code_version)


def stage_key(stage: StageModule, cfg: RunConfig, inputs: Mapping[str, Path]) -> tuple[str, dict[str, str]]:
    """The cache key of ``stage`` given its (complete) input directories, and the input identities by name."""
    identities = {name: input_identity(Manifest.load(path)) for name, path in sorted(inputs.items())}
    return key_from_identities(stage, cfg, identities), identities


def execute(
    stage: StageModule,
    cfg: RunConfig,
    run_path: Path,
    inputs: Mapping[str, Path],
    iteration: int | None = None,
    force: bool = False,
) -> Manifest:
    """Run ``stage`` unless its output for this key is complete; returns the published manifest.

    ``force`` reruns a complete stage: the new publication gets a new ``instance``, so every artifact
    made from the old one becomes stale (its consumers' keys change) while upstream stays untouched.
    Timings include ``total`` seconds and ``peak_rss_mib`` (and ``peak_cuda_mib`` on CUDA) of the run.
    """
    info = stage.STAGE
    it = iteration if info.per_iteration else None
    # Subnormal floats (e.g. from a merged LoRA) make CPU kernels several times slower; flush them to zero.
    torch.set_flush_denormal(True)
    key, identities = stage_key(stage, cfg, inputs)
    sd = StageDir(run_path, info.name, key, it)
    if sd.is_complete() and not force:
        log.info("%s (iteration %s) is cached at %s", info.name, it, sd.path)
        return sd.load_manifest()
    out = sd.begin()
    start = time.perf_counter()
    try:
        with PeakMemory() as mem:
            result = stage.run(cfg, inputs, out, it)
    except BaseException:
        sd.abort()
        raise
    timings = {"total": time.perf_counter() - start, **mem.as_timings(), **result.timings}
    manifest = sd.manifest(
        inputs=identities,
        config=info.config_subset(cfg),
        seeds=result.seeds,
        counts=result.counts,
        timings=timings,
        code_version=info.code_version,
        extra=result.extra,
        instance=uuid.uuid4().hex if force else "",
    )
    return sd.publish(manifest, replace=force)
