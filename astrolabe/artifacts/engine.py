"""The run engine: execute one stage call, cached by its key and published atomically, on 1 or N ranks.

A stage is a module given as an argument (:class:`astrolabe.artifacts.stage.StageModule`: ``STAGE`` and
``run``); the engine never imports ``stages/``. :func:`execute` computes the cache key (stage name, the
config subset the stage reads, the identities of its inputs, the stage's code version:
:mod:`astrolabe.artifacts.keys`), skips when a complete manifest with that key exists, otherwise runs the
stage into a temporary directory and publishes it (manifest written last, then a rename:
:mod:`astrolabe.artifacts.stagedir`). The manifest records the stage's typed result, its metrics plus the
engine's own ``time/<stage>`` and ``memory/<stage>_peak_*_mib``.

Integrity: before a stage reads its inputs, :func:`verify_inputs` checks every input's files against its
manifest (sizes and sha256, each file version hashed at most once per process) and refuses a damaged one
(:class:`astrolabe.artifacts.manifest.ArtifactDamagedError`), timed as ``timings["verify_inputs"]``. A
stage's own output found damaged (:meth:`StageDir.damage`) is moved aside and recomputed; if the new
files are identical its consumers stay valid (:func:`astrolabe.artifacts.stagedir.repaired_instance`).
A storage failure while the stage runs (disk full, read-only, no permission) removes the temporary
directory and becomes one :class:`astrolabe.artifacts.atomic.StorageError` naming the output.

Under ``torchrun`` (world size N > 1, see :mod:`astrolabe.distributed`) :func:`execute` is called by every
rank with the same arguments. Rank 0 decides "cached?" and creates the temporary directory; a
``"sliced"`` stage runs on every rank into that one directory (each rank its slice, rank-named files), a
``"main"`` stage runs on rank 0 while the others wait. The ranks' outcomes are all-gathered: if any rank
failed, rank 0 removes the temporary directory and every rank raises :class:`StageRankError` naming it;
otherwise rank 0 publishes the merged result (:func:`merge_results`) and every rank returns the manifest.
A sliced stage whose ranks write partial files that must become one (the score table of ``score``) defines
``merge_ranks(cfg, inputs, out_dir, iteration, merged) -> StageResult``: rank 0 calls it after every rank
succeeded, with the merged result, before publishing (at world size N > 1 only; one process writes the
final files itself).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from astrolabe.artifacts.atomic import storage_error
from astrolabe.artifacts.keys import stage_key
from astrolabe.artifacts.manifest import ArtifactDamagedError, Manifest, file_problems
from astrolabe.artifacts.stage import StageModule, StageResult, finite_metrics
from astrolabe.artifacts.stagedir import StageDir
from astrolabe.config import RunConfig
from astrolabe.distributed import DistContext, broadcast_object, current_context, gather_objects
from astrolabe.memory import PeakMemory

log = logging.getLogger(__name__)


class StageRankError(RuntimeError):
    """A stage failed on some rank under torchrun; raised on every rank, nothing was published."""


# ----------------------------------------------------------------------------------- merging rank results


def merge_values(values: Sequence[Any]) -> Any:
    """One value from the ranks' values of a key (in rank order).

    All mappings -> merged key by key (a key missing on a rank is taken from the ranks that have it, e.g.
    the disjoint per-rank ``groups`` of a rollout); all equal -> that value (e.g. ``world_size``, the run
    seed); otherwise the list of the values in rank order (e.g. ``rank`` -> ``[0, 1]``).
    """
    if not values:
        raise ValueError("merge_values needs at least one value")
    if all(isinstance(v, Mapping) for v in values):
        keys = list(dict.fromkeys(k for v in values for k in v))
        return {k: merge_values([v[k] for v in values if k in v]) for k in keys}
    if all(v == values[0] for v in values[1:]):
        return values[0]
    return list(values)


def merge_counts(counts: Sequence[Mapping[str, int]], invariant: Sequence[str] = ()) -> dict[str, int]:
    """Counts summed over ranks, except ``invariant`` ones, which must be equal on every rank that has them."""
    out: dict[str, int] = {}
    for k in dict.fromkeys(k for c in counts for k in c):
        vals = [c[k] for c in counts if k in c]
        if k in invariant:
            if len(set(vals)) != 1:
                raise ValueError(f"count {k!r} must be equal on every rank, got {vals}: the ranks disagree on the plan")
            out[k] = vals[0]
        else:
            out[k] = sum(vals)
    return out


def merge_metrics(metrics: Sequence[Mapping[str, float]], summed: Sequence[str] = ()) -> dict[str, float]:
    """Metrics of N ranks as one: ``summed`` ones added up, every other one equal on the ranks that report it."""
    out: dict[str, float] = {}
    for k in dict.fromkeys(k for m in metrics for k in m):
        vals = [m[k] for m in metrics if k in m]
        if k in summed:
            out[k] = float(sum(vals))
        elif len(set(vals)) != 1:
            raise ValueError(f"metric {k!r} differs between ranks ({vals}): declare it in "
                             "StageInfo.rank_summed_metrics or compute it from the merged output")
        else:
            out[k] = vals[0]
    return out


def merge_results(results: Sequence[StageResult], invariant_counts: Sequence[str] = (),
                  summed_metrics: Sequence[str] = ()) -> StageResult:  # fmt: skip
    """The StageResult of N ranks (rank order) as one: what rank 0 publishes.

    counts: summed (``invariant_counts`` kept once, see :func:`merge_counts`); timings: the max over ranks
    (the slowest rank is the stage's wall time; peak memory is per process); metrics: see
    :func:`merge_metrics`; seeds, reports and extra: merged with :func:`merge_values`. A single result is
    returned unchanged in content.
    """
    if not results:
        raise ValueError("merge_results needs the result of at least one rank")
    timings: dict[str, float] = {}
    for r in results:
        for k, v in r.timings.items():
            timings[k] = max(timings.get(k, v), v)
    return StageResult(
        counts=merge_counts([r.counts for r in results], invariant_counts),
        seeds=merge_values([r.seeds for r in results]),
        timings=timings,
        metrics=merge_metrics([r.metrics for r in results], summed_metrics),
        reports=merge_values([r.reports for r in results]),
        extra=merge_values([r.extra for r in results]),
    )


# ----------------------------------------------------------------------------------- integrity


def verify_inputs(stage: str, inputs: Mapping[str, Path], iteration: int | None = None) -> float:
    """Check every input directory against its manifest before the stage reads it; returns the seconds spent.

    Raises :class:`ArtifactDamagedError` naming each damaged input, what differs and the fix.
    """
    start = time.perf_counter()
    damaged = []
    for name, path in sorted(inputs.items()):
        problems = file_problems(path, Manifest.load(path))
        if problems:
            damaged.append(f"input {name!r} ({path}): " + "; ".join(problems))
    if damaged:
        raise ArtifactDamagedError(
            f"{stage} (iteration {iteration}) refuses damaged inputs: " + " | ".join(damaged)
            + ". Run `astrolabe train` on this run to recompute them (`astrolabe verify RUN` lists every damage)."
        )
    return time.perf_counter() - start


def prepare_output(sd: StageDir, force: bool) -> tuple[bool, Manifest | None]:
    """``(cached, repair_of)``: whether ``sd`` is done and intact (and not forced); a damaged complete output is
    moved aside and its manifest returned, so the recomputed one can keep its identity when identical."""
    problems = sd.damage()
    if problems is None:
        return False, None
    if not problems:
        return not force, None
    return False, sd.set_aside(problems)


def _storage_context(sd: StageDir) -> str:
    return f"{sd.stage} (iteration {sd.iteration})" if sd.iteration is not None else sd.stage


# ----------------------------------------------------------------------------------- running


def _run_measured(stage: StageModule, cfg: RunConfig, inputs: Mapping[str, Path], out: Path,
                  iteration: int | None) -> StageResult:  # fmt: skip
    """``stage.run`` with ``total`` seconds and peak memory added to its timings (the stage's own keys win)."""
    start = time.perf_counter()
    with PeakMemory() as mem:
        result = stage.run(cfg, inputs, out, iteration)
    result.timings = {"total": time.perf_counter() - start, **mem.as_timings(), **result.timings}
    return result


def engine_metrics(stage: str, timings: Mapping[str, float]) -> dict[str, float]:
    """What the engine measured as metrics: ``time/<stage>`` (total seconds), ``memory/<stage>_peak_*_mib``."""
    out = {f"time/{stage}": timings["total"]}
    return out | {f"memory/{stage}_{k}": timings[k] for k in ("peak_rss_mib", "peak_cuda_mib") if k in timings}


def _publish(sd: StageDir, stage: StageModule, cfg: RunConfig, identities: Mapping[str, str], result: StageResult,
             force: bool, world_size: int = 1, repair_of: Manifest | None = None) -> Manifest:  # fmt: skip
    info = stage.STAGE
    manifest = sd.manifest(
        inputs=dict(identities),
        config=info.config_subset(cfg),
        seeds=result.seeds,
        counts=result.counts,
        timings=result.timings,
        metrics=finite_metrics({**engine_metrics(info.name, result.timings), **result.metrics}),
        reports=result.reports,
        code_version=info.code_version,
        extra=result.extra,
        instance=uuid.uuid4().hex if force else "",
        world_size=world_size,
    )
    return sd.publish(manifest, replace=force, repair_of=repair_of)


def _stage_dir(stage: StageModule, cfg: RunConfig, run_path: Path, inputs: Mapping[str, Path],
               iteration: int | None) -> tuple[StageDir, dict[str, str]]:  # fmt: skip
    info = stage.STAGE
    key, identities = stage_key(stage, cfg, inputs)
    return StageDir(run_path, info.name, key, iteration if info.per_iteration else None), identities


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
    A damaged output is recomputed (module docstring); damaged inputs are refused (:func:`verify_inputs`).
    Timings include ``total`` seconds, ``verify_inputs`` seconds and ``peak_rss_mib`` (and ``peak_cuda_mib``
    on CUDA) of the run. Under torchrun every rank calls this with the same arguments (module docstring).
    """
    # Subnormal floats (e.g. from a merged LoRA) make CPU kernels several times slower; flush them to zero.
    torch.set_flush_denormal(True)
    ctx = current_context()
    if ctx.is_distributed:
        return _execute_ranks(ctx, stage, cfg, run_path, inputs, iteration, force)
    sd, identities = _stage_dir(stage, cfg, run_path, inputs, iteration)
    try:
        cached, repair_of = prepare_output(sd, force)
        if cached:
            log.info("%s (iteration %s) is cached at %s", sd.stage, sd.iteration, sd.path)
            return sd.load_manifest()
        checked = verify_inputs(stage.STAGE.name, inputs, sd.iteration)
        out = sd.begin()
        result = _run_measured(stage, cfg, inputs, out, sd.iteration)
    except BaseException as e:
        sd.abort()
        if (se := storage_error(e, sd.path, _storage_context(sd))) is not None:
            raise se from e
        raise
    result.timings["verify_inputs"] = checked
    return _publish(sd, stage, cfg, identities, result, force, repair_of=repair_of)


# ----------------------------------------------------------------------------------- N ranks


@dataclass(frozen=True)
class _RankPlan:
    """What rank 0 decided for all ranks: the key, whether it is cached, the shared temporary directory."""

    key: str = ""
    iteration: int | None = None
    identities: dict[str, str] = field(default_factory=dict)
    cached: bool = False
    tmp: str | None = None
    error: str | None = None
    repair_of: Manifest | None = None
    verify_seconds: float = 0.0


@dataclass(frozen=True)
class _RankOutcome:
    rank: int
    result: StageResult | None = None  # None: failed, or a "main" stage on a rank other than 0
    error: str | None = None


def _error_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _plan_on_rank0(stage: StageModule, cfg: RunConfig, run_path: Path, inputs: Mapping[str, Path],
                   iteration: int | None, force: bool) -> _RankPlan:  # fmt: skip
    try:
        sd, identities = _stage_dir(stage, cfg, run_path, inputs, iteration)
        cached, repair_of = prepare_output(sd, force)
        if cached:
            log.info("%s (iteration %s) is cached at %s", sd.stage, sd.iteration, sd.path)
            return _RankPlan(sd.key, sd.iteration, identities, cached=True)
        checked = verify_inputs(stage.STAGE.name, inputs, sd.iteration)
        return _RankPlan(sd.key, sd.iteration, identities, tmp=str(sd.begin()), repair_of=repair_of,
                         verify_seconds=checked)
    except Exception as e:  # every rank raises it (below), none is left waiting
        log.exception("preparing %s failed on rank 0", stage.STAGE.name)
        se = storage_error(e, context=stage.STAGE.name)
        return _RankPlan(error=str(se) if se is not None else _error_text(e))


def _run_on_rank(ctx: DistContext, stage: StageModule, cfg: RunConfig, inputs: Mapping[str, Path],
                 plan: _RankPlan) -> _RankOutcome:  # fmt: skip
    """This rank's share of the stage; an exception becomes the outcome's error text (gathered, not raised)."""
    if stage.STAGE.distribution == "main" and not ctx.is_main:
        return _RankOutcome(ctx.rank)
    assert plan.tmp is not None
    try:
        return _RankOutcome(ctx.rank, _run_measured(stage, cfg, inputs, Path(plan.tmp), plan.iteration))
    except Exception as e:
        log.exception("%s (iteration %s) failed on rank %d", stage.STAGE.name, plan.iteration, ctx.rank)
        return _RankOutcome(ctx.rank, error=_error_text(e))


def _failure_message(name: str, iteration: int | None, world_size: int, failed: Sequence[_RankOutcome]) -> str:
    where = ", ".join(f"rank {o.rank}: {o.error}" for o in failed)
    ranks = " and ".join(str(o.rank) for o in failed)
    return (f"{name} (iteration {iteration}) failed on rank {ranks} of {world_size} ({where}); nothing was "
            "published. Fix the cause (see that rank's log) and rerun: the stage starts over.")


def _publish_on_rank0(sd: StageDir, stage: StageModule, cfg: RunConfig, inputs: Mapping[str, Path], plan: _RankPlan,
                      outcomes: Sequence[_RankOutcome], force: bool) -> str | None:  # fmt: skip
    """Merge the ranks' results (and their files: the stage's ``merge_ranks``) and publish; returns the error
    text of a failure (the tmp dir is then gone)."""
    ran = [o.result for o in outcomes if o.result is not None]
    try:
        merged = merge_results(ran, stage.STAGE.rank_invariant_counts, stage.STAGE.rank_summed_metrics)
        merge_ranks = getattr(stage, "merge_ranks", None)
        if merge_ranks is not None and len(ran) > 1:
            assert plan.tmp is not None
            merged = merge_ranks(cfg, inputs, Path(plan.tmp), plan.iteration, merged)
        merged.timings["verify_inputs"] = plan.verify_seconds
        _publish(sd, stage, cfg, plan.identities, merged, force, world_size=len(ran), repair_of=plan.repair_of)
    except Exception as e:
        sd.abort()
        log.exception("publishing %s failed on rank 0", stage.STAGE.name)
        return _error_text(e)
    return None


def _execute_ranks(ctx: DistContext, stage: StageModule, cfg: RunConfig, run_path: Path, inputs: Mapping[str, Path],
                   iteration: int | None, force: bool) -> Manifest:  # fmt: skip
    """:func:`execute` on one of N ranks: plan on rank 0, run (sliced or main), all-gather outcomes, publish on 0."""
    name = stage.STAGE.name
    plan: _RankPlan = broadcast_object(
        _plan_on_rank0(stage, cfg, run_path, inputs, iteration, force) if ctx.is_main else None
    )
    if plan.error is not None:
        raise StageRankError(f"{name} (iteration {iteration}) could not start on rank 0: {plan.error}")
    sd = StageDir(run_path, name, plan.key, plan.iteration)
    if plan.cached:
        return sd.load_manifest()
    try:
        outcomes: list[_RankOutcome] = gather_objects(_run_on_rank(ctx, stage, cfg, inputs, plan))
    except BaseException:  # interrupted: torchrun stops the other ranks; leave no partial output behind
        if ctx.is_main:
            sd.abort()
        raise
    failed = [o for o in outcomes if o.error is not None]
    if failed:
        if ctx.is_main:
            sd.abort()
        raise StageRankError(_failure_message(name, plan.iteration, ctx.world_size, failed))
    error = broadcast_object(_publish_on_rank0(sd, stage, cfg, inputs, plan, outcomes, force) if ctx.is_main else None)
    if error is not None:
        raise StageRankError(f"{name} (iteration {plan.iteration}): publishing on rank 0 failed: {error}")
    return sd.load_manifest()
