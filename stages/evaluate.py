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
- ``metrics.json`` (also ``manifest.extra["metrics"]``), with ``x_{n,k}`` the raw score of reward k on
  sample n and ``w_k`` its weight in ``eval_rewards`` (or ``rewards``)::

      reward/<k>/mean = nanmean_n x_{n,k}     reward/<k>/std = nanstd_n x_{n,k} (population)
      reward/<k>/nan  = #{n: x_{n,k} is NaN}
      combined/mean   = sum_k w_k * reward/<k>/mean
      combined/std    = std_n sum_k w_k x_{n,k}   (over samples where every weighted reward is finite)
      n               = number of samples

  A statistic without any finite value is ``null``.
- ``grid.mp4`` / ``grid.png`` (middle frame): one row per (prompt, seed), at most
  :data:`MAX_GRID_ROWS`; columns iteration 0 (from ``baseline``) and this iteration, or this
  iteration alone without a baseline (:mod:`astrolabe.data.grid`).

Deterministic: the noise of each video is ``SampleNoise([s])``; nothing reads global RNG state.
Single process only (no rank slicing yet).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astrolabe.config import RunConfig, config_to_dict
from astrolabe.data.arrays import write_columns
from astrolabe.data.grid import write_grid
from astrolabe.data.video import decode_mp4
from astrolabe.generate import GenerationStack, generate_video
from astrolabe.models.factory import build_generation_stack
from astrolabe.rewards import RewardsConfig, build_rewards
from stages.base import StageInfo, StageResult
from stages.nft_update import STATE_SUBDIR, checkpoint_state_dir
from stages.score import reward_identities, score_records

log = logging.getLogger(__name__)

HELDOUT_FILE = "heldout.txt"
VIDEOS_DIR = "videos"
REWARDS_FILE = "eval_rewards.zarr"
METRICS_FILE = "metrics.json"
GRID_MP4 = "grid.mp4"
GRID_PNG = "grid.png"
MAX_GRID_ROWS = 8

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
    if cfg.rl.algorithm == "arcopo" and cfg.arcopo.semi is not None:  # the merge sweep (stages.evaluate_merge)
        subset["arcopo_merge"] = cfg.arcopo.merge.model_dump(mode="json")
    return subset


STAGE = StageInfo(name="evaluate", code_version="1", config_subset=_config_subset, per_iteration=True)


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


def evaluate_policy(
    cfg: RunConfig,
    build: Callable[[], tuple[GenerationStack, Any]],
    prompts: Sequence[str],
    plan: Sequence[tuple[int, int]],
    out_dir: Path,
    iteration: int,
) -> tuple[list[Path], dict[str, Any], dict[str, int], dict[str, float], Any]:
    """Generate every planned video with the stack ``build()`` returns, score it and write ``videos/``,
    ``eval_rewards.zarr`` and ``metrics.json`` into ``out_dir``; returns (paths, metrics, score counts,
    timings, the base-model spec)."""
    rewards_cfg = eval_rewards_config(cfg)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    stack, spec = build()
    timings["build"] = time.perf_counter() - t0
    num_latent_frames = cfg.rollout.num_latent_frames or spec.latent_frames
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
    write_columns(out_dir / REWARDS_FILE, keys, columns, attrs={"rewards": identities, "iteration": iteration})
    timings["scoring"] = time.perf_counter() - t0

    metrics = summarize({r.name: columns[r.name] for r in rewards}, {s.name: s.weight for s in rewards_cfg.rewards})
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return paths, metrics, score_counts, timings, spec


# ----------------------------------------------------------------------------------- stage


def run(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None) -> StageResult:
    if iteration is None:
        raise ValueError("the evaluate stage runs per iteration; pass iteration=<completed training iterations>")
    if "prompts" not in inputs:
        raise KeyError("the evaluate stage needs inputs['prompts'] (the filter_prompts directory)")
    prompts = read_heldout(inputs["prompts"])
    if cfg.pipeline.eval_max_prompts is not None:
        prompts = prompts[: cfg.pipeline.eval_max_prompts]
    plan = eval_plan(len(prompts), cfg.pipeline.eval_seeds)
    state = resolve_policy(inputs)
    if cfg.rl.algorithm == "arcopo" and cfg.arcopo.semi is not None and state is not None:  # W0 + dW_semi + s dW_on
        from stages.evaluate_merge import merge_sweep

        paths, metrics, score_counts, timings, spec = merge_sweep(cfg, inputs, state, prompts, plan, out_dir, iteration)
    else:
        paths, metrics, score_counts, timings, spec = evaluate_policy(
            cfg, lambda: build_generation_stack(cfg, lora=state), prompts, plan, out_dir, iteration)

    t0 = time.perf_counter()
    baseline = inputs.get("baseline")
    grid = write_comparison_grid(out_dir, paths, Path(baseline) if baseline is not None else None, iteration,
                                 fps=float(spec.fps))
    timings["grid"] = time.perf_counter() - t0

    nan_scores = sum(metrics[f"reward/{r.name}/nan"] for r in eval_rewards_config(cfg).rewards)
    num_latent_frames = cfg.rollout.num_latent_frames or spec.latent_frames
    log.info("evaluate it%d: %d videos, combined/mean %s, %d NaN scores", iteration, len(paths),
             metrics["combined/mean"], nan_scores)
    return StageResult(
        counts={"prompts": len(prompts), "videos": len(paths), "nan_scores": nan_scores,
                "decode_failed": score_counts["decode_failed"], "num_latent_frames": num_latent_frames, **grid},
        seeds={"eval_seeds": list(cfg.pipeline.eval_seeds), "samples": {sample_key(i, s): s for i, s in plan}},
        timings=timings,
        extra={"metrics": metrics, "policy": str(state) if state is not None else "base", "iteration": iteration,
               "baseline": str(baseline) if baseline is not None else None},
    )
