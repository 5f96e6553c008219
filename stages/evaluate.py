"""Stage ``evaluate``: held-out prompts x eval seeds -> full videos, reward scores, metrics, comparison grid.

Inputs: ``prompts`` (the filter_prompts directory; its ``heldout.txt`` is used), optionally
``checkpoint`` (an nft_update output directory: its training state ``state/`` holds the trained
``lora/`` adapter, merged into the DiT; absent = the base model) and ``baseline`` (the evaluate
output of iteration 0, whose videos form the left column of the grid). ``iteration`` is the number of
completed training iterations of the evaluated policy (0 = the base model).

Outputs in the stage directory:

- ``videos/p{i:03d}-s{s}.mp4``: prompt i of ``heldout.txt`` generated with noise seed s (every seed of
  ``pipeline.eval_seeds``; the same seeds at every iteration, so columns of the grid are comparable),
  ``rollout.num_latent_frames`` latent frames or the base model's default.
- ``eval_rewards.zarr``: keys ``p{i:03d}-s{s}``, one float32 column per eval reward (and its
  ``<name>.<detail>`` diagnostics); NaN = could not score.
- ``metrics.json`` (also the manifest's typed ``metrics`` under ``eval/``, less ``n`` and null values),
  with ``x_{n,k}`` the raw score of reward k on sample n and ``w_k`` its weight in ``eval_rewards``
  (or ``rewards``)::

      reward/<k>/mean = nanmean_n x_{n,k}     reward/<k>/std = nanstd_n x_{n,k} (population)
      reward/<k>/nan  = #{n: x_{n,k} is NaN}
      combined/mean   = sum_k w_k * reward/<k>/mean
      combined/std    = std_n sum_k w_k x_{n,k}   (over samples where every weighted reward is finite)
      n               = number of samples

  A statistic without any finite value is ``null``.
- ``grid.mp4`` / ``grid.png`` (middle frame): one row per (prompt, seed), at most
  :data:`MAX_GRID_ROWS`; columns iteration 0 (from ``baseline``) and this iteration, or this
  iteration alone without a baseline (:mod:`astrolabe.data.grid`).

With ``rl.algorithm: arcopo`` and ``arcopo.semi`` set, a checkpoint is evaluated as the merge sweep
``W0 + dW_semi + s dW_on`` (:func:`sweep_scales`, :func:`finish_sweep`: every scale under ``merge/s<s>/``, the
reported one at the top level, ``eval/merge/*`` metrics), sliced under torchrun like the plain evaluation.

Deterministic: the noise of each video is ``SampleNoise([s])``; nothing reads global RNG state.

Under torchrun (a ``"sliced"`` stage) rank ``k`` of ``W`` generates and scores the contiguous share
:func:`rank_slice` of the plan (videos under their sample keys, scores in ``eval_rewards-rNNN.zarr``; the
reward models loaded once per rank); rank 0 then merges the parts, computes the metrics and draws the grid
(:func:`merge_ranks`): the same outputs as one process.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from astrolabe.artifacts.ranks import rank_slice
from astrolabe.artifacts.stage import StageInfo, StageResult, finite_metrics
from astrolabe.build import build_generation_stack
from astrolabe.config import RunConfig, config_to_dict
from astrolabe.data.arrays import write_columns
from astrolabe.data.grid import write_grid
from astrolabe.data.video import decode_mp4
from astrolabe.distributed import dist_rank_world
from astrolabe.models.registry import BaseModelCard
from astrolabe.rewards import RewardsConfig, build_rewards
from astrolabe.rl.arcopo_semi import SEMI_STATE_SUBDIR, merge_adapters, merge_metrics, report_merge_scale, scale_name
from astrolabe.sampling.generation import GenerationStack, generate_video
from stages.nft_update import STATE_SUBDIR, checkpoint_state_dir
from stages.score import merge_rank_parts, reward_identities, score_records, write_rank_part

log = logging.getLogger(__name__)

HELDOUT_FILE = "heldout.txt"
VIDEOS_DIR = "videos"
REWARDS_FILE = "eval_rewards.zarr"
METRICS_FILE = "metrics.json"
GRID_MP4 = "grid.mp4"
GRID_PNG = "grid.png"
MAX_GRID_ROWS = 8
MERGE_DIR = "merge"  # AR-CoPO merge sweep: merge/s<s>/ per scale (sweep_scales)


@dataclass
class Scored:
    """Videos generated and scored into a directory, not yet summarized (:func:`generate_and_score`)."""

    paths: list[Path]  # videos in plan order
    keys: list[str]
    columns: dict[str, np.ndarray]  # reward name -> (N,) raw scores
    identities: dict[str, Any]  # reward name -> identity
    score_counts: dict[str, int]
    timings: dict[str, float]
    card: BaseModelCard
    num_latent_frames: int


def eval_rewards_config(cfg: RunConfig) -> RewardsConfig:
    """The rewards reported at evaluation: ``eval_rewards``, or the training ``rewards`` when unset."""
    return cfg.eval_rewards if cfg.eval_rewards is not None else cfg.rewards


def _config_subset(cfg: RunConfig) -> dict[str, Any]:
    subset = {
        "seed": cfg.seed,
        "model": config_to_dict(cfg.model),
        "eval_rewards": reward_identities(eval_rewards_config(cfg).rewards),
        "eval_seeds": list(cfg.pipeline.eval_seeds),
        "eval_max_prompts": cfg.pipeline.eval_max_prompts,
        "num_latent_frames": cfg.rollout.num_latent_frames,
        "video_crf": cfg.rollout.video_crf,
    }
    if cfg.rl.algorithm == "arcopo" and cfg.arcopo.semi is not None:  # the merge sweep (sweep_scales)
        subset["arcopo_merge"] = cfg.arcopo.merge.model_dump(mode="json")
    return subset


STAGE = StageInfo(name="evaluate", code_version="1", config_subset=_config_subset, per_iteration=True,
                  distribution="sliced", rank_invariant_counts=("prompts", "num_latent_frames"))


# ----------------------------------------------------------------------------------- plan


def read_heldout(prompts_dir: Path) -> list[str]:
    """Non-empty, stripped lines of ``<prompts_dir>/heldout.txt``."""
    path = Path(prompts_dir) / HELDOUT_FILE
    hint = "set data.heldout_fraction > 0 or data.eval_prompts (a held-out prompt file) and rerun filter_prompts"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; evaluate needs held-out prompts: {hint}")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no held-out prompts; {hint}")
    return prompts


def sample_key(prompt_index: int, seed: int) -> str:
    """Record key and video stem of prompt ``prompt_index`` with noise seed ``seed``."""
    return f"p{prompt_index:03d}-s{seed}"


def eval_plan(n_prompts: int, seeds: Sequence[int]) -> list[tuple[int, int]]:
    """``(prompt index, seed)`` pairs, prompt-major: every seed of prompt 0, then of prompt 1, ..."""
    if not seeds:
        raise ValueError("pipeline.eval_seeds is empty; give at least one seed, e.g. [1000, 1001]")
    return [(i, s) for i in range(n_prompts) for s in seeds]


def resolve_policy(inputs: Mapping[str, Path]) -> Path | None:
    """The training state to evaluate (``<checkpoint>/state``), or None for the base model."""
    if "checkpoint" not in inputs:
        return None
    state = checkpoint_state_dir(Path(inputs["checkpoint"]))
    if not state.is_dir():
        raise FileNotFoundError(
            f"{state} does not exist; inputs['checkpoint'] must be an nft_update output directory holding "
            f"{STATE_SUBDIR}/lora/ (or leave it out to evaluate the base model)"
        )
    return state


# ----------------------------------------------------------------------------------- generation


def generate_all(
    stack: GenerationStack,
    prompts: Sequence[str],
    plan: Sequence[tuple[int, int]],
    num_latent_frames: int,
    videos_dir: Path,
    iteration: int,
    crf: int = 0,
) -> list[Path]:
    """Generate every planned video into ``videos_dir/<sample_key>.mp4``; returns the paths in plan order."""
    paths: list[Path] = []
    for n, (i, seed) in enumerate(plan):
        path = videos_dir / f"{sample_key(i, seed)}.mp4"
        generate_video(stack, prompts[i], seed, num_latent_frames, path, crf=crf)
        paths.append(path)
        log.info("evaluate it%d video %d/%d", iteration, n + 1, len(plan))
    return paths


def _records(paths: Sequence[Path], prompts: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Score-stage records ``{__key__, meta: {prompt}, video: mp4 bytes}``, read lazily."""
    for path, prompt in zip(paths, prompts):
        yield {"__key__": path.stem, "meta": {"prompt": prompt}, "video": path.read_bytes()}


# ----------------------------------------------------------------------------------- metrics


def _finite_or_none(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def _nan_stats(x: np.ndarray) -> tuple[float | None, float | None]:
    """``(nanmean, nanstd)`` of ``x`` (population std), None when no entry is finite."""
    finite = x[np.isfinite(x)].astype(np.float64)
    if finite.size == 0:
        return None, None
    return _finite_or_none(finite.mean()), _finite_or_none(finite.std())


def summarize(columns: Mapping[str, np.ndarray], weights: Mapping[str, float]) -> dict[str, Any]:
    """The metrics of the module docstring from raw reward columns ``{name: (N,)}`` and weights."""
    n = len(next(iter(columns.values()))) if columns else 0
    metrics: dict[str, Any] = {}
    combined_mean: float | None = 0.0
    combined = np.zeros(n, np.float64)  # (N,) sum_k w_k x_{n,k}; NaN where a weighted reward is NaN
    for name, w in weights.items():
        x = np.asarray(columns[name], np.float64)
        mean, std = _nan_stats(x)
        metrics[f"reward/{name}/mean"] = mean
        metrics[f"reward/{name}/std"] = std
        metrics[f"reward/{name}/nan"] = int(np.isnan(x).sum())
        if mean is None:
            log.warning("evaluate: reward %r is NaN on all %d samples; its mean is null", name, n)
        if w != 0:
            combined += w * x
            combined_mean = None if mean is None or combined_mean is None else combined_mean + w * mean
    metrics["combined/mean"] = combined_mean
    metrics["combined/std"] = _nan_stats(combined)[1]
    metrics["n"] = n
    return metrics


# ----------------------------------------------------------------------------------- grid


def _baseline_cell(baseline: Path, key: str, shape: tuple[int, ...]) -> np.ndarray | None:
    """The baseline's decoded video ``key`` if it exists and has this iteration's frame size, else None."""
    path = baseline / VIDEOS_DIR / f"{key}.mp4"
    if not path.is_file():
        log.warning("evaluate grid: baseline video %s is missing; its cell is black", path)
        return None
    video = decode_mp4(path)  # (F, H, W, 3)
    if video.shape[1:] != shape[1:]:
        log.warning("evaluate grid: baseline video %s has frames %s, this iteration %s; its cell is black",
                    path, video.shape[1:], shape[1:])
        return None
    return video


def write_comparison_grid(
    out_dir: Path, paths: Sequence[Path], baseline: Path | None, iteration: int, fps: float
) -> dict[str, int]:
    """``grid.mp4`` / ``grid.png`` of the first :data:`MAX_GRID_ROWS` videos; returns the grid's size."""
    rows: list[list[np.ndarray | None]] = []
    for path in paths[:MAX_GRID_ROWS]:
        current = decode_mp4(path)  # (F, H, W, 3)
        left = [_baseline_cell(Path(baseline), path.stem, current.shape)] if baseline is not None else []
        rows.append([*left, current])
    labels = (["iteration 0"] if baseline is not None else []) + [f"iteration {iteration}"]
    layout = write_grid(out_dir / GRID_MP4, out_dir / GRID_PNG, rows, labels=labels, fps=fps)
    return {"grid_rows": layout.rows, "grid_cols": layout.cols}


def generate_and_score(
    cfg: RunConfig,
    build: Callable[[], tuple[GenerationStack, BaseModelCard]],
    prompts: Sequence[str],
    plan: Sequence[tuple[int, int]],
    out_dir: Path,
    iteration: int,
) -> Scored:
    """Generate every planned video into ``out_dir/videos/`` with the stack ``build()`` returns and score
    it (the reward models loaded once); nothing summarized or written besides the videos."""
    rewards_cfg = eval_rewards_config(cfg)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    stack, card = build()
    timings["build"] = time.perf_counter() - t0
    num_latent_frames = cfg.rollout.num_latent_frames or card.latent_frames
    t0 = time.perf_counter()
    paths = generate_all(stack, prompts, plan, num_latent_frames, out_dir / VIDEOS_DIR, iteration,
                         crf=cfg.rollout.video_crf)
    timings["generation"] = time.perf_counter() - t0
    del stack  # free the generator before loading judges

    t0 = time.perf_counter()
    rewards = build_rewards(rewards_cfg.rewards)
    keys, columns, score_counts = score_records(
        rewards, _records(paths, [prompts[i] for i, _ in plan]), rewards_cfg.batch_size
    )
    identities = {r.name: r.identity() for r in rewards}
    timings["scoring"] = time.perf_counter() - t0
    return Scored(paths, keys, columns, identities, score_counts, timings, card, num_latent_frames)


def write_scores(cfg: RunConfig, out_dir: Path, iteration: int, keys: list[str], columns: Mapping[str, np.ndarray],
                 identities: Mapping[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Write ``eval_rewards.zarr`` and ``metrics.json`` of the scores into ``out_dir``; returns the metrics."""
    write_columns(out_dir / REWARDS_FILE, keys, dict(columns),
                  attrs={"rewards": dict(identities), "iteration": iteration})
    weights = {r.name: r.weight for r in eval_rewards_config(cfg).rewards}
    metrics = summarize({name: columns[name] for name in identities}, weights)
    write_metrics(out_dir, metrics)
    return metrics


def write_metrics(out_dir: Path, metrics: Mapping[str, Any]) -> None:
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------- AR-CoPO merge sweep


def is_merge_sweep(cfg: RunConfig, state: Path | None) -> bool:
    """Whether the checkpoint ``state`` is evaluated as AR-CoPO's merge sweep (:func:`sweep_scales`)."""
    return cfg.rl.algorithm == "arcopo" and cfg.arcopo.semi is not None and state is not None


def scale_dir(out_dir: Path, s: float) -> Path:
    """``merge/s<s>/``: where the merge sweep evaluates scale ``s``."""
    return out_dir / MERGE_DIR / scale_name(s)


def sweep_scales(cfg: RunConfig, state: Path, prompts: Sequence[str], plan: Sequence[tuple[int, int]],
                 out_dir: Path, iteration: int) -> dict[float, Scored]:  # fmt: skip
    """AR-CoPO's two adapters: generate and score ``plan`` (this rank's share) with ``W0 + dW_semi + s dW_on`` for
    every ``s`` of ``arcopo.merge.scales`` into ``merge/s<s>/videos/`` (not summarized: :func:`finish_sweep`)."""
    semi_state = Path(state).parent / SEMI_STATE_SUBDIR
    if not semi_state.is_dir():
        raise FileNotFoundError(f"{semi_state} is missing: the checkpoint was trained without arcopo.semi")
    results: dict[float, Scored] = {}
    for s in cfg.arcopo.merge.scales:
        dest = scale_dir(out_dir, s)
        dest.mkdir(parents=True, exist_ok=True)  # every rank writes its share into it

        def build(s: float = s) -> tuple[GenerationStack, BaseModelCard]:
            stack, card = build_generation_stack(cfg)
            stack.dit = merge_adapters(stack.dit, [(semi_state, 1.0), (Path(state), s)])
            return stack, card

        results[s] = generate_and_score(cfg, build, prompts, plan, dest, iteration)
    return results


def finish_sweep(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int,
                 scores: Mapping[float, tuple[list[str], Mapping[str, np.ndarray], Mapping[str, Any]]],
                 ) -> tuple[float, dict[str, Any]]:  # fmt: skip
    """Every scale's scores ``s -> (keys, columns, identities)`` (all ranks') written into ``merge/s<s>/``; ``s``
    chosen (:func:`astrolabe.rl.arcopo_semi.report_merge_scale`, against the ``baseline`` evaluation) and the
    reported scale's videos and rewards copied to the top level, so the grid, ``reward/*`` and ``astrolabe compare``
    read the merged model like any other evaluation. Returns ``(reported s, metrics)``: the reported scale's
    metrics plus ``merge/s``, ``merge/s_rule`` and ``merge/s<s>/<metric>``
    (:func:`astrolabe.rl.arcopo_semi.merge_metrics`), also written to ``metrics.json``."""
    mc = cfg.arcopo.merge
    table: dict[float, dict[str, Any]] = {}
    for s, (keys, columns, identities) in scores.items():
        table[s] = write_scores(cfg, scale_dir(out_dir, s), iteration, keys, columns, identities)
        log.info("evaluate it%d merge s=%g: %s %s, %s %s", iteration, s, mc.in_domain_metric,
                 table[s].get(mc.in_domain_metric), mc.held_out_metric, table[s].get(mc.held_out_metric))
    baseline = inputs.get("baseline")
    base = json.loads((Path(baseline) / METRICS_FILE).read_text(encoding="utf-8")) if baseline is not None else None
    reported, chosen = report_merge_scale(table, base, mc)
    if chosen is None:
        log.warning("evaluate it%d: no merge scale beats the base on both %s and %s; reporting s=%g", iteration,
                    mc.in_domain_metric, mc.held_out_metric, reported)
    src = scale_dir(out_dir, reported)
    shutil.copytree(src / VIDEOS_DIR, out_dir / VIDEOS_DIR)
    shutil.copytree(src / REWARDS_FILE, out_dir / REWARDS_FILE)
    metrics = {**table[reported], **merge_metrics(table, reported, chosen, mc)}
    write_metrics(out_dir, metrics)
    return reported, metrics


# ----------------------------------------------------------------------------------- stage


def eval_reports(out_dir: Path, iteration: int) -> dict[str, str]:
    """The grid and metrics files written, attached to the tracking run under ``eval/iter-<kkkk>``."""
    where = f"eval/iter-{iteration:04d}"
    return {name: where for name in (GRID_MP4, GRID_PNG, METRICS_FILE) if (out_dir / name).is_file()}


def _eval_prompts(cfg: RunConfig, inputs: Mapping[str, Path]) -> tuple[list[str], list[tuple[int, int]]]:
    prompts = read_heldout(inputs["prompts"])
    if cfg.pipeline.eval_max_prompts is not None:
        prompts = prompts[: cfg.pipeline.eval_max_prompts]
    return prompts, eval_plan(len(prompts), cfg.pipeline.eval_seeds)


def _report(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int, metrics: Mapping[str, Any],
            fps: float, timings: dict[str, float]) -> tuple[dict[str, int], dict[str, float], dict[str, str]]:  # fmt: skip
    """The grid of every planned video (written into ``out_dir``) and the stage's ``(counts, metrics, reports)``."""
    prompts, plan = _eval_prompts(cfg, inputs)
    t0 = time.perf_counter()
    baseline = inputs.get("baseline")
    paths = [out_dir / VIDEOS_DIR / f"{sample_key(i, s)}.mp4" for i, s in plan]
    grid = write_comparison_grid(out_dir, paths, Path(baseline) if baseline is not None else None, iteration, fps=fps)
    timings["grid"] = time.perf_counter() - t0

    nan_scores = sum(metrics[f"reward/{r.name}/nan"] for r in eval_rewards_config(cfg).rewards)
    log.info("evaluate it%d: %d videos, combined/mean %s, %d NaN scores", iteration, len(paths),
             metrics["combined/mean"], nan_scores)
    return ({"nan_scores": nan_scores, **grid}, finite_metrics({k: v for k, v in metrics.items() if k != "n"},
            prefix="eval/"), eval_reports(out_dir, iteration))  # fmt: skip


def _finish(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int, keys: list[str],
            columns: dict[str, np.ndarray], identities: Mapping[str, Any], fps: float,
            timings: dict[str, float]) -> tuple[dict[str, int], dict[str, float], dict[str, str]]:  # fmt: skip
    """Scores table, metrics.json and grid of every planned video; returns ``(counts, metrics, reports)``."""
    metrics = write_scores(cfg, out_dir, iteration, keys, columns, identities)
    return _report(cfg, inputs, out_dir, iteration, metrics, fps, timings)


def _extra(inputs: Mapping[str, Path], state: Path | None, iteration: int, fps: float) -> dict[str, Any]:
    baseline = inputs.get("baseline")
    return {"policy": str(state) if state is not None else "base", "iteration": iteration,
            "baseline": str(baseline) if baseline is not None else None, "fps": fps}


def _decode_failed(name: str) -> str:
    """The count of a rank's failed decodes at merge scale directory ``name`` (one kept by :func:`merge_ranks`)."""
    return f"decode_failed/{name}"


def run_merge_sweep(cfg: RunConfig, inputs: Mapping[str, Path], state: Path, out_dir: Path,
                    iteration: int) -> StageResult:  # fmt: skip
    """The stage for an AR-CoPO checkpoint with ``arcopo.semi`` (:func:`sweep_scales`, :func:`finish_sweep`).

    Under torchrun rank ``k`` evaluates its :func:`rank_slice` of the plan at every scale (scores in
    ``merge/s<s>/eval_rewards-rNNN.zarr``); rank 0 merges them and chooses ``s`` in :func:`merge_ranks`.
    """
    prompts, plan = _eval_prompts(cfg, inputs)
    rank, world = dist_rank_world()
    mine = [plan[j] for j in rank_slice(len(plan), rank, world)]  # this rank's share, in plan order
    scored = sweep_scales(cfg, state, prompts, mine, out_dir, iteration)
    first = next(iter(scored.values()))
    fps = float(first.card.fps)
    timings = {k: sum(sc.timings.get(k, 0.0) for sc in scored.values()) for k in ("build", "generation", "scoring")}
    result = StageResult(
        counts={"prompts": len(prompts), "videos": len(mine), "num_latent_frames": first.num_latent_frames,
                **{_decode_failed(scale_name(s)): sc.score_counts["decode_failed"] for s, sc in scored.items()}},
        seeds={"eval_seeds": list(cfg.pipeline.eval_seeds), "samples": {sample_key(i, s): s for i, s in mine}},
        timings=timings,
        extra=_extra(inputs, state, iteration, fps),
    )
    if world > 1:  # rank 0 merges the parts and chooses s (merge_ranks)
        for s, sc in scored.items():
            write_rank_part(scale_dir(out_dir, s), "eval_rewards", rank, sc.keys, sc.columns, {"rewards": sc.identities})
        return result
    reported, metrics = finish_sweep(cfg, inputs, out_dir, iteration,
                                     {s: (sc.keys, sc.columns, sc.identities) for s, sc in scored.items()})
    return _publish_sweep(cfg, inputs, out_dir, iteration, result, reported, metrics)


def _publish_sweep(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int, result: StageResult,
                   reported: float, metrics: Mapping[str, Any]) -> StageResult:  # fmt: skip
    """The merge sweep's result with the reported scale's ``decode_failed``, the grid and the metrics."""
    failed = {k: result.counts.pop(k) for k in [k for k in result.counts if k.startswith("decode_failed/")]}
    result.counts["decode_failed"] = failed[_decode_failed(scale_name(reported))]
    counts, result.metrics, result.reports = _report(cfg, inputs, out_dir, iteration, metrics, result.extra["fps"],
                                                     result.timings)
    result.counts |= counts
    return result


def run(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None) -> StageResult:
    if iteration is None:
        raise ValueError("the evaluate stage runs per iteration; pass iteration=<completed training iterations>")
    if "prompts" not in inputs:
        raise KeyError("the evaluate stage needs inputs['prompts'] (the filter_prompts directory)")
    state = resolve_policy(inputs)
    if is_merge_sweep(cfg, state):  # W0 + dW_semi + s dW_on
        assert state is not None
        return run_merge_sweep(cfg, inputs, state, out_dir, iteration)
    prompts, plan = _eval_prompts(cfg, inputs)
    rank, world = dist_rank_world()
    mine = [plan[j] for j in rank_slice(len(plan), rank, world)]  # this rank's share, in plan order
    sc = generate_and_score(cfg, lambda: build_generation_stack(cfg, lora=state), prompts, mine, out_dir, iteration)
    keys, columns, identities, card, timings = sc.keys, sc.columns, sc.identities, sc.card, sc.timings
    result = StageResult(
        counts={"prompts": len(prompts), "videos": len(sc.paths), "decode_failed": sc.score_counts["decode_failed"],
                "num_latent_frames": sc.num_latent_frames},
        seeds={"eval_seeds": list(cfg.pipeline.eval_seeds), "samples": {sample_key(i, s): s for i, s in mine}},
        timings=timings,
        extra=_extra(inputs, state, iteration, float(card.fps)),
    )
    if world > 1:  # rank 0 merges the parts (merge_ranks)
        write_rank_part(out_dir, "eval_rewards", rank, keys, columns, {"rewards": identities})
        return result
    counts, result.metrics, result.reports = _finish(cfg, inputs, out_dir, iteration, keys, columns, identities,
                                                     float(card.fps), timings)
    result.counts |= counts
    return result


def merge_ranks(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None,
                merged: StageResult) -> StageResult:  # fmt: skip
    """Rank 0, after every rank generated and scored its share: one scores table, the metrics and the grid."""
    assert iteration is not None
    state = resolve_policy(inputs)
    if is_merge_sweep(cfg, state):  # every scale's parts, then the choice of s
        scores = {}
        for s in cfg.arcopo.merge.scales:
            keys, columns, attrs = merge_rank_parts(scale_dir(out_dir, s), "eval_rewards")
            scores[s] = (keys, columns, attrs["rewards"])
        reported, metrics = finish_sweep(cfg, inputs, out_dir, iteration, scores)
        return _publish_sweep(cfg, inputs, out_dir, iteration, merged, reported, metrics)
    keys, columns, attrs = merge_rank_parts(out_dir, "eval_rewards")
    counts, merged.metrics, merged.reports = _finish(cfg, inputs, out_dir, iteration, keys, columns, attrs["rewards"],
                                                     merged.extra["fps"], merged.timings)
    merged.counts |= counts
    return merged
