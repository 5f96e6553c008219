"""Stage ``score``: rollout shards -> ``rewards.zarr`` (one float32 column per reward, NaN = failed).

Every record of ``inputs["rollout"]`` is read in shard order, its mp4 decoded once, and scored by all
rewards of ``cfg.rewards`` through :func:`astrolabe.rewards.score_all` in batches of
``cfg.rewards.batch_size`` (a batch is also cut where the video shape changes). Columns: ``<name>``
per reward and ``<name>.<detail>`` per diagnostic. A record without a video or whose mp4 cannot be
decoded gets NaN in every column (counted). A corrupt shard raises ``CorruptShardError``.

The cache key holds each reward's :meth:`Reward.identity` (name, version, weights hash, frame
sampling, resolution, options) and nothing else: weights and normalisation are read by
``label_uncertainty``, so changing them, or swapping one judge, reruns only what depends on it.

Single process only (no rank slicing yet).
"""

from __future__ import annotations

import functools
import json
import logging
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astrolabe.artifacts.stage import StageInfo, StageResult
from astrolabe.config import RunConfig
from astrolabe.data.arrays import write_columns
from astrolabe.data.shards import list_shards, read_rollout_shards
from astrolabe.data.video import decode_mp4
from astrolabe.rewards import Reward, RewardOutput, RewardSpec, build_rewards, score_all

log = logging.getLogger(__name__)

REWARDS_FILE = "rewards.zarr"
_COLUMN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


@functools.lru_cache(maxsize=16)
def _identities(specs_json: str) -> tuple[str, ...]:
    specs = [RewardSpec.model_validate(s) for s in json.loads(specs_json)]
    return tuple(json.dumps(r.identity(), sort_keys=True) for r in build_rewards(specs))


def reward_identities(specs: Sequence[RewardSpec]) -> list[dict[str, Any]]:
    """``[reward.identity() for each spec]`` (memoised per spec list: building a judge can be slow)."""
    key = json.dumps([s.model_dump(mode="json") for s in specs], sort_keys=True)
    return [json.loads(t) for t in _identities(key)]


def _config_subset(cfg: RunConfig) -> dict[str, Any]:
    return {"rewards": reward_identities(cfg.rewards.rewards)}


STAGE = StageInfo(name="score", code_version="1", config_subset=_config_subset, per_iteration=True)


# ----------------------------------------------------------------------------------- batching


def _batches(
    records: Iterator[dict[str, Any]], batch_size: int, counts: dict[str, int]
) -> Iterator[tuple[list[str], list[str], np.ndarray | None]]:
    """Yield ``(keys, prompts, videos (B, F, H, W, 3) uint8 | None)``; None = unscorable records."""
    keys: list[str] = []
    prompts: list[str] = []
    videos: list[np.ndarray] = []
    for rec in records:
        key, prompt = rec["__key__"], str(rec["meta"].get("prompt", ""))
        frames = _decode(rec, counts)
        if frames is None:
            yield [key], [prompt], None
            continue
        if videos and (len(videos) >= batch_size or frames.shape != videos[0].shape):
            yield keys, prompts, np.stack(videos)
            keys, prompts, videos = [], [], []
        keys.append(key)
        prompts.append(prompt)
        videos.append(frames)
    if videos:
        yield keys, prompts, np.stack(videos)


def _decode(rec: Mapping[str, Any], counts: dict[str, int]) -> np.ndarray | None:
    if rec.get("video") is None:
        log.warning("record %s has no video: scored NaN", rec["__key__"])
        counts["no_video"] += 1
        return None
    try:
        return decode_mp4(rec["video"])  # (F, H, W, 3) uint8
    except ValueError as e:
        log.warning("record %s: mp4 cannot be decoded (%s): scored NaN", rec["__key__"], e)
        counts["decode_failed"] += 1
        return None


def _columns_of(outputs: Mapping[str, RewardOutput]) -> dict[str, np.ndarray]:
    cols: dict[str, np.ndarray] = {}
    for name, out in outputs.items():
        cols[name] = out.scores
        for detail, values in out.details.items():
            column = f"{name}.{detail}"
            if _COLUMN_RE.match(column):
                cols[column] = values
    return cols


def score_records(
    rewards: Sequence[Reward], records: Iterator[dict[str, Any]], batch_size: int
) -> tuple[list[str], dict[str, np.ndarray], dict[str, int]]:
    """Score every record; returns ``(keys in read order, {column: (N,) float32}, counts)``."""
    counts = {"records": 0, "no_video": 0, "decode_failed": 0}
    keys: list[str] = []
    parts: list[tuple[int, dict[str, np.ndarray]]] = []
    for batch_keys, prompts, videos in _batches(records, batch_size, counts):
        if videos is not None:
            parts.append((len(batch_keys), _columns_of(score_all(rewards, videos, prompts, batch_size))))
        else:
            parts.append((len(batch_keys), {}))
        keys += batch_keys
        counts["records"] += len(batch_keys)
        log.info("score: %d records scored", counts["records"])
    names = sorted({c for _, cols in parts for c in cols} | {r.name for r in rewards})
    columns = {
        c: np.concatenate([cols.get(c, np.full(n, np.nan, np.float32)) for n, cols in parts]).astype(np.float32)
        if parts
        else np.zeros(0, np.float32)
        for c in names
    }
    return keys, columns, counts


def column_stats(values: np.ndarray) -> dict[str, float]:
    """``mean``, ``std`` (over the finite entries; absent when none is) and ``nan_fraction`` of one column."""
    v = np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v)
    stats = {"nan_fraction": float(1.0 - ok.mean()) if v.size else 0.0}
    if ok.any():
        stats |= {"mean": float(v[ok].mean()), "std": float(v[ok].std())}
    return stats


def reward_metrics(columns: Mapping[str, np.ndarray], names: Sequence[str]) -> dict[str, float]:
    """``reward/<name>/{mean,std,nan_fraction}`` of the reward columns ``names``."""
    return {f"reward/{name}/{k}": v for name in names if name in columns for k, v in column_stats(columns[name]).items()}


def run(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None) -> StageResult:
    rollout = Path(inputs["rollout"])
    paths = list_shards(rollout)
    if not paths:
        raise ValueError(f"no rollout shards (*.tar) in {rollout}; run the rollout stage first")
    rewards = build_rewards(cfg.rewards.rewards)
    keys, columns, counts = score_records(rewards, read_rollout_shards(paths), cfg.rewards.batch_size)
    if not keys:
        raise ValueError(f"the rollout shards in {rollout} hold no records; rerun the rollout stage")
    for r in rewards:
        counts[f"nan/{r.name}"] = int(np.isnan(columns[r.name]).sum())
    identities = {r.name: r.identity() for r in rewards}
    write_columns(out_dir / REWARDS_FILE, keys, columns, attrs={"rewards": identities})
    log.info("score: %d records, NaN per reward %s", len(keys), {k: v for k, v in counts.items() if k.startswith("nan/")})
    metrics = reward_metrics(columns, [r.name for r in rewards])
    return StageResult(counts=counts, metrics=metrics, extra={"columns": sorted(columns)})
