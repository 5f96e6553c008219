"""score and label_uncertainty stages on a tiny hand-made rollout directory."""

from __future__ import annotations

import json
import types
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from astrolabe.artifacts.stagedir import stage_root
from astrolabe.config import RunConfig
from astrolabe.data.arrays import read_columns, write_columns
from astrolabe.data.shards import RolloutShardWriter, ShardWriterConfig
from astrolabe.data.video import decode_mp4, encode_mp4
from astrolabe.rewards import build_rewards, score_all
from astrolabe.models.wan.config import tiny
from astrolabe.models.wan.dit import WanDiT
from astrolabe.rl.lora import LoRAConfig
from astrolabe.rl.optim import OptimConfig
from astrolabe.rl.policies import PolicyConfig, PolicySet
from astrolabe.rl.rng import CheckpointError
from astrolabe.rl.selective_kl import FractionController, compute_kl_mask
from astrolabe.rl.state import TrainingState
from stages import label_uncertainty, score
from stages.nft_update import checkpoint_state_dir
from astrolabe.artifacts.engine import execute
from astrolabe.artifacts.keys import stage_key
from astrolabe.artifacts.stage import StageInfo, StageResult

GROUPS = [0, 0, 1, 1, 2, 2]


def _cfg(tmp_path: Path, **over) -> RunConfig:
    data = {
        "pipeline": {"runs_root": str(tmp_path)},
        "rewards": {
            "rewards": [{"name": "motion", "weight": 1.0}, {"name": "smoothness", "weight": 1.0}],
            "batch_size": 4,
        },
    }
    data.update(over)
    return RunConfig.model_validate(data)


def _publish(run: Path, name: str, write, iteration: int = 0) -> Path:
    """Publish an artifact through execute() with a throwaway stage whose run() calls ``write(out_dir)``."""
    mod = types.SimpleNamespace(
        STAGE=StageInfo(name=name, code_version="1", config_subset=lambda cfg: {"tag": write.__name__}),
        run=lambda cfg, inputs, out, it: (write(out), StageResult())[1],
    )
    m = execute(mod, RunConfig(), run, {}, iteration)
    return stage_root(run, name, iteration) / m.key


@pytest.fixture(scope="module")
def rollout(tmp_path_factory) -> tuple[Path, list[np.ndarray]]:
    run = tmp_path_factory.mktemp("run")
    rng = np.random.default_rng(0)
    videos = [rng.integers(0, 256, size=(4, 16, 16, 3), dtype=np.uint8) for _ in GROUPS]

    def rollout_shards(out: Path) -> None:
        with RolloutShardWriter(out, "rollout", config=ShardWriterConfig(max_samples_per_shard=4)) as w:
            for i, (g, v) in enumerate(zip(GROUPS, videos)):
                meta = {"prompt": "a red ball", "group": g, "candidate": i % 2}
                w.write(f"g{g}-c{i % 2}", np.zeros((1, 2, 2, 2), np.float32), meta, video_mp4=encode_mp4(v))

    return _publish(run, "rollout", rollout_shards), videos


def test_score_columns_match_direct_scoring_and_cache(tmp_path, rollout):
    rollout_dir, _ = rollout
    cfg = _cfg(tmp_path)
    m = execute(score, cfg, tmp_path / "r", {"rollout": rollout_dir}, iteration=0)
    assert m.counts["records"] == 6 and m.counts["nan/motion"] == 0 and set(m.files) >= {"rewards.zarr/zarr.json"}
    keys, cols, attrs = read_columns(stage_root(tmp_path / "r", "score", 0) / m.key / "rewards.zarr")
    assert keys == [f"g{g}-c{i % 2}" for i, g in enumerate(GROUPS)]
    # independent: decode the same mp4s and score them in one call
    from astrolabe.data.shards import list_shards, read_rollout_shards

    vids = np.stack([decode_mp4(r["video"]) for r in read_rollout_shards(list_shards(rollout_dir))])
    ref = score_all(build_rewards(cfg.rewards.rewards), vids, ["a red ball"] * 6, batch_size=6)
    for name in ("motion", "smoothness"):
        np.testing.assert_allclose(cols[name], ref[name].scores, rtol=1e-6)
        assert attrs["rewards"][name]["name"] == name
    assert any(c.startswith("motion.") for c in cols)
    # typed metrics: reward/<name>/{mean,std,nan_fraction} of the configured rewards only (not sub-columns)
    rewards = {k: v for k, v in m.metrics.items() if k.startswith("reward/")}
    assert rewards == pytest.approx({f"reward/{n}/{s}": f(cols[n].astype(np.float64)) for n in ("motion", "smoothness")
                                     for s, f in (("mean", np.mean), ("std", np.std), ("nan_fraction", lambda x: 0.0))})
    # second call: cached
    assert execute(score, cfg, tmp_path / "r", {"rollout": rollout_dir}, iteration=0).created == m.created
    # changing a reward option changes the score key; changing a weight does not
    opt = _cfg(tmp_path, rewards={"rewards": [{"name": "motion", "options": {"frame_stride": 2}},
                                              {"name": "smoothness"}], "batch_size": 4})
    weight = _cfg(tmp_path, rewards={"rewards": [{"name": "motion", "weight": 3.0}, {"name": "smoothness"}],
                                     "batch_size": 2})
    base_key = stage_key(score, cfg, {"rollout": rollout_dir})[0]
    assert stage_key(score, opt, {"rollout": rollout_dir})[0] != base_key
    assert stage_key(score, weight, {"rollout": rollout_dir})[0] == base_key
    assert stage_key(label_uncertainty, weight, {})[0] != stage_key(label_uncertainty, cfg, {})[0]


def _score_artifact(run: Path, columns: Mapping[str, list[float]], tag: str) -> Path:
    keys = [f"g{g}-c{i % 2}" for i, g in enumerate(GROUPS)]

    def write(out: Path) -> None:
        write_columns(out / "rewards.zarr", keys, {k: np.asarray(v, np.float32) for k, v in columns.items()})

    write.__name__ = tag
    return _publish(run, "score", write)


def test_label_values_on_constructed_case(tmp_path, rollout):
    rollout_dir, _ = rollout
    nan = float("nan")
    # group 0: [1, 3] ; group 1: [2, 2] (equal -> r = 0.5) ; group 2: all NaN -> skipped
    score_dir = _score_artifact(tmp_path / "r", {"motion": [1, 3, 2, 2, nan, nan], "smoothness": [0] * 6}, "case")
    cfg = _cfg(tmp_path, rewards={"rewards": [{"name": "motion"}, {"name": "smoothness", "weight": 0.0}]},
               rl={"advantage": {"normalize_rewards": "none", "eps": 0.0}})
    m = execute(label_uncertainty, cfg, tmp_path / "r", {"rollout": rollout_dir, "score": score_dir}, iteration=0)
    keys, cols, _ = read_columns(stage_root(tmp_path / "r", "label_uncertainty", 0) / m.key / "labels.zarr")
    std = np.sqrt(0.5)  # global population std of [1, 3, 2, 2]
    np.testing.assert_allclose(cols["advantage"][:4], [-1 / std, 1 / std, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(cols["r"][:4], [0.5 - 0.1 / std, 0.5 + 0.1 / std, 0.5, 0.5], rtol=1e-6)
    assert np.isnan(cols["r"][4:]).all() and np.isnan(cols["combined"][4:]).all()
    np.testing.assert_array_equal(cols["kl_mask"], np.ones(6))
    np.testing.assert_allclose(cols["rank_motion"][:4], [4, 1, 2.5, 2.5])
    assert m.counts == {"records": 6, "groups": 3, "nan_excluded": 2, "nan_groups": 1, "zero_std_groups": 1,
                        "flagged": 6}


def test_selective_kl_mask_and_controller_carried(tmp_path, rollout):
    rollout_dir, _ = rollout
    motion = [0.1, 0.9, 0.5, 0.3, 0.7, 0.2]
    smooth = [0.8, 0.2, 0.4, 0.9, 0.1, 0.6]  # u = [4, -4, -1, 3, -4, 2]: flags sample 0
    score_dir = _score_artifact(tmp_path / "r", {"motion": motion, "smoothness": smooth}, "kl")
    kl = {"main_reward": "motion", "auxiliary_rewards": ["smoothness"], "fraction_bounds": [0.1, 0.5],
          "initial_fraction": 0.4, "sign": "main_under", "scope": "global"}  # the release's u, worked by hand
    cfg = _cfg(tmp_path, rl={"selective_kl": kl})
    run = tmp_path / "r"
    inputs = {"rollout": rollout_dir, "score": score_dir}
    m0 = execute(label_uncertainty, cfg, run, inputs, iteration=0)
    d0 = stage_root(run, "label_uncertainty", 0) / m0.key
    _, cols, _ = read_columns(d0 / "labels.zarr")
    ctrl = FractionController(cfg.rl.selective_kl)
    cols_in = {"motion": np.array(motion, np.float32), "smoothness": np.array(smooth, np.float32)}
    mask, u, _ = compute_kl_mask(cols_in, cfg.rl.selective_kl, ctrl, GROUPS)
    np.testing.assert_array_equal(cols["kl_mask"], mask.astype(np.float32))
    np.testing.assert_allclose(cols["u"], u)
    assert m0.counts["flagged"] == int(mask.sum()) == 1 and cols["kl_mask"][0] == 1
    assert m0.metrics["labels/flagged_fraction"] == pytest.approx(1 / 6)
    assert (m0.metrics["labels/nan_groups"], m0.metrics["labels/zero_std_groups"]) == (0.0, 0.0)
    assert 0.0 < m0.metrics["labels/within_group_share"] <= 1.0
    assert json.loads((d0 / "controller.json").read_text())["state"] == ctrl.state_dict()
    # iteration 1 resumes the controller from the training checkpoint of iteration 0 (nft_update's output)
    ckpt = _publish(run, "fake_nft_update", lambda out: _checkpoint(out, ctrl))
    m1 = execute(label_uncertainty, cfg, run, {**inputs, "checkpoint": ckpt}, iteration=1)
    state1 = json.loads((stage_root(run, "label_uncertainty", 1) / m1.key / "controller.json").read_text())["state"]
    assert len(state1["buffer"]) == 2 and state1["buffer"][0] == ctrl.state_dict()["buffer"][0]
    # a missing piece is an error, never a fresh controller: no checkpoint after iteration 0, or one without it
    with pytest.raises(FileNotFoundError, match="needs inputs\\['checkpoint'\\]"):
        execute(label_uncertainty, cfg, run, inputs, iteration=2)
    with pytest.raises(CheckpointError, match="no selective-KL controller"):
        execute(label_uncertainty, cfg, run,
                {**inputs, "checkpoint": _publish(run, "fake_no_kl", lambda out: _checkpoint(out, None))}, 2)
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        execute(label_uncertainty, cfg, run, {**inputs, "checkpoint": _publish(run, "fake_empty", lambda out: None)}, 2)


def _checkpoint(out: Path, controller: FractionController | None) -> None:
    """Write into ``out`` what nft_update writes: a tiny TrainingState checkpoint, here with ``controller``."""
    dit = WanDiT(tiny())
    dit.init_weights(torch.Generator().manual_seed(0))
    policies = PolicySet.build(dit.requires_grad_(False), LoRAConfig(rank=2, alpha=2.0), PolicyConfig(),
                               generator=torch.Generator().manual_seed(0))
    TrainingState(policies, OptimConfig(precision="fp32"), controller).save(checkpoint_state_dir(out))


def test_all_nan_rewards_is_a_clear_error(tmp_path, rollout):
    rollout_dir, _ = rollout
    score_dir = _score_artifact(tmp_path / "r", {"motion": [float("nan")] * 6, "smoothness": [1.0] * 6}, "allnan")
    with pytest.raises(ValueError, match=r"\['motion'\] are NaN for every one"):
        execute(label_uncertainty, _cfg(tmp_path), tmp_path / "r", {"rollout": rollout_dir, "score": score_dir}, 0)


def test_within_group_share_is_the_spread_group_advantages_can_rank():
    from stages.label_uncertainty import within_group_share

    gid = np.array([0, 0, 1, 1])
    assert within_group_share(np.array([1.0, 1.0, 3.0, 3.0]), gid, 2) == 0.0  # constant groups: nothing to rank
    assert within_group_share(np.array([1.0, 3.0, 1.0, 3.0]), gid, 2) == pytest.approx(1.0)  # equal group means
    # R = [0, 2, 4, 6]: group means 1, 5; within-group deviations +-1 -> rms 1; std(R) = sqrt(5)
    assert within_group_share(np.array([0.0, 2.0, 4.0, 6.0]), gid, 2) == pytest.approx(1 / np.sqrt(5))
    # a NaN drops out: group 0 is {0}, group 1 {4, 6}: deviations 0, -1, +1
    want = np.sqrt(2 / 3) / np.std([0.0, 4.0, 6.0])
    assert within_group_share(np.array([0.0, np.nan, 4.0, 6.0]), gid, 2) == pytest.approx(want)
    assert np.isnan(within_group_share(np.array([2.0, 2.0, 2.0, 2.0]), gid, 2))


def test_rewards_judge_a_window_by_its_scene_text():
    """A scene-prompt record is scored against the text of the scene its window lies in; older records (no
    ``window_prompt``) against the line."""
    from stages.score import _batches

    recs = [{"__key__": "a", "meta": {"prompt": "p1[1s] | p2", "window_prompt": "p2"}, "video": None},
            {"__key__": "b", "meta": {"prompt": "p3"}, "video": None}]
    assert [prompts for _, prompts, _ in _batches(iter(recs), 4, {"no_video": 0})] == [["p2"], ["p3"]]
