"""Stage ``label_uncertainty``: rewards -> ``labels.zarr`` (optimality r, advantage, KL mask, ranks).

Per record (rows aligned to the rollout shard keys):

* ``combined``  ``R = sum_k w_k * normalize(x_k)`` (weights of ``cfg.rewards``, normalisation
  ``cfg.rl.advantage.normalize_rewards``), via :func:`astrolabe.rl.advantages.optimality_from_rewards`.
* ``advantage`` group-normalised ``A`` (group = ``meta["group"]``: same prompt and branch point); with
  ``rl.algorithm: arcopo`` the AR-CoPO advantages of :func:`astrolabe.rl.arcopo.grouped_advantages`.
* ``r``         ``clip(A, -C, C) / (2C) + 0.5``; NaN for samples with a NaN reward (excluded).
* ``kl_mask``   1 where the KL penalty applies: the selective mask of
  :func:`astrolabe.rl.selective_kl.compute_kl_mask` when ``cfg.rl.selective_kl`` is set, else all 1.
* ``u``         rank disagreement of the main vs the auxiliary rewards (NaN without selective KL).
* ``rank_<name>`` descending rank of each reward over all valid samples (1 = best, ties averaged,
  NaN where the reward is NaN).

The KL fraction controller is training state, kept in the one training checkpoint
(:mod:`astrolabe.rl.state`): at iteration k > 0 it is read from ``inputs["checkpoint"]`` (the nft_update
output of iteration k - 1), updated with this iteration's rewards, and handed on in this output's
``controller.json``; ``nft_update`` k saves it in checkpoint k. Iteration 0 starts it fresh. With selective
KL on, a later iteration without a checkpoint, or a checkpoint without controller state, is an error
(never a silent reset).

Counts: ``records``, ``nan_excluded`` (samples with NaN combined reward), ``nan_groups`` (groups with
no valid sample: logged and skipped), ``zero_std_groups``, ``flagged`` (kl_mask = 1).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from astrolabe.artifacts.stage import StageInfo, StageResult, finite_metrics
from astrolabe.config import RunConfig
from astrolabe.data.arrays import check_keys_aligned, read_columns, write_columns
from astrolabe.data.shards import list_shards, read_rollout_shards
from astrolabe.rl.advantages import group_index, optimality_from_rewards
from astrolabe.rl.arcopo import ARCOPO_LABEL_KEYS, grouped_advantages
from astrolabe.rl.rng import CheckpointError
from astrolabe.rl.state import read_controller_state
from astrolabe.rl.selective_kl import FractionController, SelectiveKLConfig, compute_kl_mask, descending_ranks
from stages.score import REWARDS_FILE

log = logging.getLogger(__name__)

LABELS_FILE = "labels.zarr"
CONTROLLER_FILE = "controller.json"


def _config_subset(cfg: RunConfig) -> dict[str, Any]:
    kl = cfg.rl.selective_kl
    subset = {
        "weights": {s.name: s.weight for s in cfg.rewards.rewards},
        "advantage": cfg.rl.advantage.model_dump(mode="json"),
        "selective_kl": None if kl is None else kl.model_dump(mode="json"),
    }
    if cfg.rl.algorithm == "arcopo":  # NFT keys stay unchanged
        subset["arcopo"] = cfg.arcopo.model_dump(mode="json", include=set(ARCOPO_LABEL_KEYS))
    return subset


STAGE = StageInfo(name="label_uncertainty", code_version="1", config_subset=_config_subset, per_iteration=True)


# ----------------------------------------------------------------------------------- helpers


def _hashable(value: Any) -> Hashable:
    """JSON group ids (lists from meta.json) -> tuples."""
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def read_group_ids(rollout: Path) -> tuple[list[str], list[Hashable]]:
    """Record keys and ``meta["group"]`` of every record of the rollout shards, in read order."""
    paths = list_shards(rollout)
    if not paths:
        raise ValueError(f"no rollout shards (*.tar) in {rollout}; run the rollout stage first")
    keys: list[str] = []
    groups: list[Hashable] = []
    for rec in read_rollout_shards(paths):
        if "group" not in rec["meta"]:
            raise KeyError(f"record {rec['__key__']!r} in {rec['__shard__']} has no meta['group']; rerun the rollout stage")
        keys.append(rec["__key__"])
        groups.append(_hashable(rec["meta"]["group"]))
    return keys, groups


def reward_ranks(columns: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``rank_<name>``: descending average ranks over the finite entries (1 = best); NaN elsewhere."""
    out: dict[str, np.ndarray] = {}
    for name, col in columns.items():
        x = np.asarray(col, dtype=np.float64)
        ranks = np.full(x.shape, np.nan)
        valid = np.isfinite(x)
        if valid.any():
            ranks[valid] = descending_ranks(x[valid])
        out[f"rank_{name}"] = ranks.astype(np.float32)
    return out


def load_controller(cfg: SelectiveKLConfig, checkpoint: Path | None, iteration: int | None) -> FractionController:
    """The controller of checkpoint ``checkpoint`` (an nft_update output), or a fresh one at iteration 0."""
    from stages.nft_update import checkpoint_state_dir  # here: nft_update imports this module

    controller = FractionController(cfg)
    if checkpoint is None:
        if iteration:
            raise FileNotFoundError(
                f"label_uncertainty at iteration {iteration} with selective KL needs inputs['checkpoint'] (the "
                f"nft_update output of iteration {iteration - 1}, which holds the KL controller); run the earlier "
                "iterations first (astrolabe train)"
            )
        log.info("selective KL: iteration 0, the fraction controller starts fresh")
        return controller
    state_dir = checkpoint_state_dir(checkpoint)
    state = read_controller_state(state_dir)
    if state is None:
        raise CheckpointError(
            f"checkpoint {state_dir} holds no selective-KL controller state: it was trained without "
            "rl.selective_kl; resume with the saved run's config or start a new run"
        )
    controller.load_state_dict(state)
    return controller


def read_handed_controller(labels: Path) -> dict[str, Any] | None:
    """The controller state a label_uncertainty output hands to nft_update (None: made without selective KL)."""
    path = Path(labels) / CONTROLLER_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))["state"]


def count_nan_groups(combined: np.ndarray, gid: np.ndarray, n_groups: int) -> int:
    """Groups in which no sample has a finite combined reward."""
    valid_per_group = np.bincount(gid, weights=np.isfinite(combined).astype(np.float64), minlength=n_groups)
    return int((valid_per_group == 0).sum())


def within_group_share(combined: np.ndarray, gid: np.ndarray, n_groups: int) -> float:
    """How much of the combined reward's spread lies inside groups, the part group advantages can rank:

        share = sqrt( sum_i (R_i - mean_{g(i)} R)^2 / n ) / std(R)      over the n finite R_i, in [0, 1]

    1: the groups' means are equal (all spread is inside groups); 0: every group is constant (RL has nothing to
    rank, e.g. a model whose samples of one prompt are identical). NaN with fewer than 2 finite rewards or
    std 0."""
    valid = np.isfinite(combined)
    x = np.where(valid, combined, 0.0).astype(np.float64)
    if valid.sum() < 2 or float(x[valid].std()) == 0.0:
        return float("nan")
    count = np.bincount(gid, weights=valid.astype(np.float64), minlength=n_groups)
    mean = np.bincount(gid, weights=x, minlength=n_groups) / np.maximum(count, 1.0)  # (G,)
    within = np.sqrt(np.square(x - mean[gid])[valid].mean())
    return float(within / x[valid].std())


# ----------------------------------------------------------------------------------- stage


def label_metrics(counts: Mapping[str, int], share: float) -> dict[str, float]:
    """``labels/flagged_fraction`` (flagged / records), ``labels/nan_groups``, ``labels/zero_std_groups``,
    ``labels/within_group_share`` (:func:`within_group_share`)."""
    return finite_metrics({
        "labels/flagged_fraction": counts["flagged"] / max(counts["records"], 1),
        "labels/nan_groups": float(counts["nan_groups"]),
        "labels/zero_std_groups": float(counts["zero_std_groups"]),
        "labels/within_group_share": share,  # left out when NaN
    })


def run(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None) -> StageResult:
    keys, groups = read_group_ids(Path(inputs["rollout"]))
    score_keys, columns, _ = read_columns(Path(inputs["score"]) / REWARDS_FILE)
    check_keys_aligned(score_keys, keys, what=f"{inputs['score']}/{REWARDS_FILE}")
    names = [s.name for s in cfg.rewards.rewards]
    missing = [n for n in names if n not in columns]
    if missing:
        raise KeyError(
            f"rewards {missing} of cfg.rewards have no column in {inputs['score']}/{REWARDS_FILE} "
            f"(columns: {sorted(columns)}); rerun the score stage with the current reward set"
        )
    rewards = {n: columns[n] for n in names}
    weights = {s.name: s.weight for s in cfg.rewards.rewards}
    used = [n for n in names if weights[n] != 0]
    all_nan = [n for n in used if not np.isfinite(rewards[n]).any()]
    if all_nan:
        raise ValueError(
            f"rewards {all_nan} are NaN for every one of the {len(keys)} records: no sample can be labelled; "
            "check the score stage's logs (failed judge, unreadable videos) and rerun it"
        )
    r, adv, combined, info = optimality_from_rewards(rewards, weights, groups, cfg.rl.advantage)
    if cfg.rl.algorithm == "arcopo":  # AR-CoPO payload: std / quasi-norm advantages inside each pivot group
        adv, info = grouped_advantages(combined, groups, cfg.arcopo)
    if not np.isfinite(combined).any():
        raise ValueError(
            f"every record has a NaN in at least one weighted reward {used}: no sample can be labelled; "
            "rerun the score stage or set the weight of the failing reward to 0"
        )
    gid, n_groups = group_index(groups)
    nan_groups = count_nan_groups(combined, gid, n_groups)
    if nan_groups:
        log.warning("label_uncertainty: %d of %d groups have only NaN rewards: skipped (r = NaN)", nan_groups, n_groups)

    counts: dict[str, int] = {
        "records": len(keys),
        "groups": n_groups,
        "nan_excluded": int(np.isnan(combined).sum()),
        "nan_groups": nan_groups,
        "zero_std_groups": int(info["n_zero_std_groups"]),
    }
    kl = cfg.rl.selective_kl
    extra: dict[str, Any] = {"advantage_info": info}
    if kl is not None:
        ckpt = inputs.get("checkpoint")
        controller = load_controller(kl, Path(ckpt) if ckpt is not None else None, iteration)
        mask, u, kl_info = compute_kl_mask(rewards, kl, controller, groups)
        state = {"iteration": iteration, "state": controller.state_dict()}
        (out_dir / CONTROLLER_FILE).write_text(json.dumps(state, indent=2), encoding="utf-8")
        extra["kl"] = {k: (None if not np.isfinite(v) else v) for k, v in kl_info.items()}
    else:
        mask, u = np.ones(len(keys), dtype=bool), np.full(len(keys), np.nan, dtype=np.float32)
    counts["flagged"] = int(mask.sum())
    out_cols = {"r": r, "advantage": adv, "combined": combined, "kl_mask": mask.astype(np.float32), "u": u}
    out_cols.update(reward_ranks(rewards))
    write_columns(out_dir / LABELS_FILE, keys, out_cols, attrs={"rewards": names, "weights": weights})
    log.info("label_uncertainty: %s", counts)
    share = within_group_share(combined, gid, n_groups)
    if share < 0.25:  # INFO, not WARNING: it can hold every iteration; the metric is logged either way
        log.info(
            "label_uncertainty: only %.0f%% of the reward spread is inside groups: the samples of one prompt barely "
            "differ, so the group advantages are mostly noise (more sample diversity or larger groups help)",
            100 * share,
        )
    return StageResult(counts=counts, metrics=label_metrics(counts, share), extra=extra)
