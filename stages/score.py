"""Stage ``score``: rollout shards -> ``rewards.zarr`` (one float32 column per reward, NaN = failed).

Every record of ``inputs["rollout"]`` is read in shard order, its mp4 decoded once, and scored by all
rewards of ``cfg.rewards`` through :func:`astrolabe.rewards.score_all` in batches of
``cfg.rewards.batch_size`` (a batch is also cut where the video shape changes). Columns: ``<name>``
per reward and ``<name>.<detail>`` per diagnostic. A record without a video or whose mp4 cannot be
decoded gets NaN in every column (counted). A corrupt shard raises ``CorruptShardError``.

The cache key holds each reward's :meth:`Reward.identity` (name, version, weights hash, frame
sampling, resolution, options) and nothing else: weights and normalisation are read by
``label_uncertainty``, so changing them, or swapping one judge, reruns only what depends on it.

Under torchrun (a ``"sliced"`` stage) rank ``k`` of ``W`` scores the contiguous share :func:`rank_slice` of
the records (in shard order), its reward models loaded once, and writes ``rewards-rNNN.zarr``; rank 0 then
concatenates the parts in rank order into ``rewards.zarr`` (:func:`merge_ranks`), removes them and
computes the metrics: the same table and metrics as one process.
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from astrolabe.artifacts.ranks import rank_filename, rank_slice
from astrolabe.artifacts.stage import StageInfo, StageResult
from astrolabe.config import RunConfig
from astrolabe.data.arrays import read_columns, write_columns
from astrolabe.data.shards import index_shards, list_shards, read_rollout_shards
from astrolabe.distributed import dist_rank_world
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


STAGE = StageInfo(name="score", code_version="1", config_subset=_config_subset, per_iteration=True,
                  distribution="sliced")  # every count is summed over the ranks; metrics come from merge_ranks


# ----------------------------------------------------------------------------------- batching


def _batches(
    records: Iterator[dict[str, Any]], batch_size: int, counts: dict[str, int]
) -> Iterator[tuple[list[str], list[str], np.ndarray | None]]:
    """Yield ``(keys, prompts, videos (B, F, H, W, 3) uint8 | None)``; None = unscorable records. A record's prompt
    is the text of the scene its window lies in (``meta["window_prompt"]``; the prompt line for older rollouts)."""
    keys: list[str] = []
    prompts: list[str] = []
    videos: list[np.ndarray] = []
    for rec in records:
        meta = rec["meta"]
        key, prompt = rec["__key__"], str(meta.get("window_prompt", meta.get("prompt", "")))
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


# ----------------------------------------------------------------------------------- ranks


def write_rank_part(out_dir: Path, stem: str, rank: int, keys: Sequence[str], columns: Mapping[str, np.ndarray],
                    attrs: Mapping[str, Any]) -> None:  # fmt: skip
    """This rank's rows as ``<stem>-rNNN.zarr`` (nothing for an empty share)."""
    if keys:
        write_columns(out_dir / rank_filename(stem, rank, ".zarr"), keys, columns, attrs=attrs)


def merge_rank_parts(out_dir: Path, stem: str) -> tuple[list[str], dict[str, np.ndarray], dict[str, Any]]:
    """The ``<stem>-rNNN.zarr`` parts concatenated in rank order (a column missing from a part is NaN there),
    the parts removed; returns ``(keys, columns, attrs of rank 0's part)``."""
    parts = sorted(out_dir.glob(f"{stem}-r[0-9][0-9][0-9].zarr"))
    if not parts:
        raise ValueError(f"no {stem}-rNNN.zarr part in {out_dir}: no rank had anything to score")
    read = [read_columns(p) for p in parts]
    names = sorted({c for _, cols, _ in read for c in cols})
    keys = [k for ks, _, _ in read for k in ks]
    columns = {c: np.concatenate([cols.get(c, np.full(len(ks), np.nan, np.float32)) for ks, cols, _ in read])
               for c in names}
    for p in parts:
        shutil.rmtree(p)
    return keys, columns, read[0][2]


def _finish(out_dir: Path, keys: list[str], columns: dict[str, np.ndarray], identities: Mapping[str, Any],
            where: Path) -> tuple[dict[str, int], dict[str, float]]:  # fmt: skip
    """Write ``rewards.zarr``; returns the NaN counts and the metrics of the whole table."""
    if not keys:
        raise ValueError(f"the rollout shards in {where} hold no records; rerun the rollout stage")
    write_columns(out_dir / REWARDS_FILE, keys, columns, attrs={"rewards": dict(identities)})
    nan = {f"nan/{name}": int(np.isnan(columns[name]).sum()) for name in identities}
    log.info("score: %d records, NaN per reward %s", len(keys), nan)
    return nan, reward_metrics(columns, list(identities))


def run(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None) -> StageResult:
    rollout = Path(inputs["rollout"])
    paths = list_shards(rollout)
    if not paths:
        raise ValueError(f"no rollout shards (*.tar) in {rollout}; run the rollout stage first")
    rank, world = dist_rank_world()
    mine = rank_slice(len(index_shards(paths)), rank, world) if world > 1 else None
    records = read_rollout_shards(paths)
    if mine is not None:
        records = itertools.islice(records, mine.start, mine.stop)
    rewards = build_rewards(cfg.rewards.rewards)  # once per rank
    keys, columns, counts = score_records(rewards, records, cfg.rewards.batch_size)
    identities = {r.name: r.identity() for r in rewards}
    if mine is not None:  # rank 0 merges the parts (merge_ranks)
        write_rank_part(out_dir, "rewards", rank, keys, columns, {"rewards": identities})
        return StageResult(counts=counts)
    nan, metrics = _finish(out_dir, keys, columns, identities, rollout)
    return StageResult(counts=counts | nan, metrics=metrics, extra={"columns": sorted(columns)})


def merge_ranks(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None,
                merged: StageResult) -> StageResult:  # fmt: skip
    """Rank 0, after every rank scored its share: one ``rewards.zarr``, the counts and metrics of all records."""
    keys, columns, attrs = merge_rank_parts(out_dir, "rewards")
    nan, metrics = _finish(out_dir, keys, columns, attrs["rewards"], Path(inputs["rollout"]))
    merged.counts |= nan
    merged.metrics = metrics
    merged.extra = {"columns": sorted(columns)}
    return merged
