"""Reward contract: NaN on failure, identity hashes, registry, combination, input validation, score_all."""

from __future__ import annotations

import logging
import sys
from typing import ClassVar

import numpy as np
import pytest
import torch
from pydantic import Field, ValidationError

from astrolabe.artifacts.manifest import sha256_file
from astrolabe.rewards import (
    Reward,
    RewardOptions,
    RewardOutput,
    RewardsConfig,
    RewardSpec,
    VideoBatch,
    as_video_array,
    build_reward,
    combine_rewards,
    normalize_column,
    register_reward,
    registered_rewards,
    sample_frame_indices,
    score_all,
)
from astrolabe.rewards import registry


@pytest.fixture(autouse=True)
def restore_registry():
    saved = dict(registry._REGISTRY)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


class MeanOptions(RewardOptions):
    offset: float = Field(0.0)


class MeanReward(Reward):
    """score = mean pixel in [0, 1] + offset; raises for prompts containing 'boom'."""

    name: ClassVar[str] = "mean_test"
    version: ClassVar[str] = "1"
    Options: ClassVar[type[MeanOptions]] = MeanOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.batches: list[VideoBatch] = []

    def score_batch(self, batch, prompts):
        self.batches.append(batch)
        if any("boom" in p for p in prompts):
            raise RuntimeError("scorer exploded")
        means = batch.float01.mean(axis=(1, 2, 3, 4)) + self.options.offset
        return RewardOutput(means, {"gray_mean": batch.gray.mean(axis=(1, 2, 3)) / 255.0})


def videos(b: int = 4, f: int = 3) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(b, f, 8, 8, 3), dtype=np.uint8)


# ------------------------------------------------------------------------------------------ NaN handling


def test_failing_sample_becomes_nan_and_is_logged(caplog):
    v = videos()
    reward = MeanReward()
    with caplog.at_level(logging.WARNING, logger="astrolabe.rewards.contract"):
        out = reward(v, ["a", "b", "boom", "d"])
    expected = v.astype(np.float32).mean(axis=(1, 2, 3, 4)) / 255
    assert np.isnan(out.scores[2]) and np.isnan(out.details["gray_mean"][2])
    np.testing.assert_allclose(out.scores[[0, 1, 3]], expected[[0, 1, 3]], rtol=1e-6)
    assert out.num_nan == 1
    assert list(out.errors) == [2] and "RuntimeError: scorer exploded" in out.errors[2]
    assert "1/4 samples could not be scored" in caplog.text


def test_scorer_returning_nan_is_counted_without_error():
    class Partial(MeanReward):
        def score_batch(self, batch, prompts):
            return RewardOutput(np.array([0.5, np.nan]))

    out = Partial()(videos(2), ["a", "b"])
    assert out.num_nan == 1 and out.errors == {}


def test_score_batch_must_return_one_score_per_video():
    class Wrong(MeanReward):
        def score_batch(self, batch, prompts):
            return RewardOutput(np.zeros(batch.size + 1))

    out = Wrong()(videos(2), ["a", "b"])  # a broken scorer is a per-sample failure, not a crash
    assert out.num_nan == 2 and set(out.errors) == {0, 1}


def test_reward_output_validation_and_concat():
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        RewardOutput(np.zeros(2), {"d": np.zeros(3)})
    a = RewardOutput(np.array([1.0, 2.0]), {"x": np.array([3.0, 4.0])}, {1: "E: x"})
    b = RewardOutput(np.array([5.0]), {}, {0: "E: y"})
    c = RewardOutput.concat([a, b])
    np.testing.assert_array_equal(c.scores, [1, 2, 5])
    np.testing.assert_array_equal(c.details["x"], [3, 4, np.nan])
    assert c.errors == {1: "E: x", 2: "E: y"} and c.scores.dtype == np.float32


# ------------------------------------------------------------------------------------------ identity


def test_identity_is_stable_and_changes_with_options_version_and_checkpoint(tmp_path):
    h = MeanReward().identity_hash()
    assert h == MeanReward().identity_hash() and len(h) == 64
    assert MeanReward(MeanOptions(offset=0.1)).identity_hash() != h

    class Bumped(MeanReward):
        version: ClassVar[str] = "2"

    assert Bumped().identity_hash() != h

    class Weighted(MeanReward):
        def __init__(self, path):
            super().__init__()
            self.path = path

        def checkpoint_hash(self):
            return sha256_file(self.path)

    ckpt = tmp_path / "w.bin"
    ckpt.write_bytes(b"weights-1")
    first = Weighted(ckpt).identity_hash()
    assert Weighted(ckpt).identity()["checkpoint_sha256"] == sha256_file(ckpt)
    ckpt.write_bytes(b"weights-2")
    assert Weighted(ckpt).identity_hash() != first


def test_sha256_file_matches_hashlib(tmp_path):
    import hashlib

    path = tmp_path / "x"
    path.write_bytes(b"abc" * 1000)
    assert sha256_file(path, chunk_bytes=7) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_signal_identity_includes_sampling_and_resolution():
    a = build_reward(RewardSpec(name="motion"))
    b = build_reward(RewardSpec(name="motion", options={"frame_stride": 2}))
    assert a.identity()["checkpoint_sha256"] is None
    assert a.identity()["frame_sampling"] == {"stride": 1, "max_frames": None}
    assert a.identity_hash() != b.identity_hash()


# ------------------------------------------------------------------------------------------ registry


def test_unknown_reward_lists_registered_names():
    with pytest.raises(KeyError) as info:
        build_reward(RewardSpec(name="nope"))
    for name in ("motion", "smoothness", "sharpness", "colorfulness", "text_color_match"):
        assert name in str(info.value)


def test_register_class_and_builder_and_bad_registrations():
    register_reward("mean_test")(MeanReward)
    assert "mean_test" in registered_rewards()
    reward = build_reward(RewardSpec(name="mean_test", weight=3.0, options={"offset": 0.5}))
    assert isinstance(reward, MeanReward) and reward.options.offset == 0.5
    with pytest.raises(ValueError, match="allowed options: \\['offset'\\]"):
        build_reward(RewardSpec(name="mean_test", options={"ofset": 0.5}))
    register_reward("mean_test")(MeanReward)  # same target again: no-op
    with pytest.raises(ValueError, match="already registered"):
        register_reward("mean_test", "somewhere.else:build")
    with pytest.raises(ValueError, match="registered as 'other_name'"):
        register_reward("other_name")(MeanReward)
    with pytest.raises(ValueError, match="lower_snake_case"):
        register_reward("Bad-Name")

    @register_reward("built_by_function")
    def build(options):
        return MeanReward.from_options(options)

    with pytest.raises(ValueError, match="named 'mean_test'"):
        build_reward(RewardSpec(name="built_by_function"))


def test_lazy_registration_imports_only_when_built(tmp_path, monkeypatch):
    module = tmp_path / "lazy_reward_mod.py"
    module.write_text(
        "from typing import ClassVar\n"
        "import numpy as np\n"
        "from astrolabe.rewards import Reward, RewardOutput\n"
        "class Lazy(Reward):\n"
        "    name: ClassVar[str] = 'lazy_test'\n"
        "    version: ClassVar[str] = '1'\n"
        "    def score_batch(self, batch, prompts):\n"
        "        return RewardOutput(np.ones(batch.size))\n"
        "def build(options):\n"
        "    return Lazy.from_options(options)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_reward_mod", raising=False)
    register_reward("lazy_test", "lazy_reward_mod:build")
    assert "lazy_test" in registered_rewards() and "lazy_reward_mod" not in sys.modules
    reward = build_reward(RewardSpec(name="lazy_test"))
    assert "lazy_reward_mod" in sys.modules
    np.testing.assert_array_equal(reward(videos(2), ["a", "b"]).scores, [1, 1])
    register_reward("lazy_missing", "no_such_module_xyz:build")
    with pytest.raises(ImportError, match="lazy_missing"):
        build_reward(RewardSpec(name="lazy_missing"))


# ------------------------------------------------------------------------------------------ combination


def test_weights_combine_as_configured():
    a = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    b = np.array([10.0, 0.0, 5.0], dtype=np.float32)
    specs = [RewardSpec(name="a", weight=2.0), RewardSpec(name="b", weight=-0.5)]
    np.testing.assert_allclose(combine_rewards({"a": a, "b": b, "unused": a}, specs), [-3.0, 4.0, 3.5])
    # zscore: a -> [-1.2247, 0, 1.2247]; b -> (b - 5) / 4.0825
    za = (a - 2) / np.sqrt(2 / 3)
    zb = (b - 5) / np.sqrt(50 / 3)
    np.testing.assert_allclose(combine_rewards({"a": a, "b": b}, specs, "zscore"), 2 * za - 0.5 * zb, rtol=1e-5)
    # rank: a -> [0, .5, 1]; b -> [1, 0, .5]
    np.testing.assert_allclose(combine_rewards({"a": a, "b": b}, specs, "rank"), [-0.5, 1.0, 1.75])


def test_nan_propagates_except_for_zero_weight():
    a = np.array([1.0, np.nan, 3.0])
    b = np.array([np.nan, 1.0, 1.0])
    out = combine_rewards({"a": a, "b": b}, [RewardSpec(name="a"), RewardSpec(name="b", weight=0.0)], "zscore")
    assert np.isnan(out[1]) and not np.isnan(out[0])
    np.testing.assert_allclose(out[[0, 2]], [-1.0, 1.0])  # statistics over the finite entries only
    out = combine_rewards({"a": a, "b": b}, [RewardSpec(name="a"), RewardSpec(name="b")])
    assert np.isnan(out[0]) and np.isnan(out[1]) and out[2] == 4.0


def test_normalize_column_hand_values():
    np.testing.assert_allclose(normalize_column(np.array([3.0, 1.0, 3.0, 2.0]), "rank"), [5 / 6, 0, 5 / 6, 1 / 3])
    np.testing.assert_array_equal(normalize_column(np.array([2.0, 2.0]), "zscore"), [0.0, 0.0])
    np.testing.assert_array_equal(normalize_column(np.array([np.nan, 7.0]), "rank"), [np.nan, 0.5])
    with pytest.raises(ValueError, match="normalize must be one of"):
        normalize_column(np.zeros(2), "minmax")


def test_combine_errors():
    with pytest.raises(KeyError, match="available columns"):
        combine_rewards({"a": np.zeros(2)}, [RewardSpec(name="b")])
    with pytest.raises(ValueError, match="same shape"):
        combine_rewards({"a": np.zeros(2), "b": np.zeros(3)}, [RewardSpec(name="a"), RewardSpec(name="b")])


def test_rewards_config_validation():
    cfg = RewardsConfig()
    assert [s.name for s in cfg.rewards] == ["motion", "smoothness", "text_color_match"]
    with pytest.raises(ValidationError, match="unique"):
        RewardsConfig(rewards=[{"name": "motion"}, {"name": "motion", "weight": 2}])
    with pytest.raises(ValidationError, match="non-zero weight"):
        RewardsConfig(rewards=[{"name": "motion", "weight": 0}])
    with pytest.raises(ValidationError, match="finite"):
        RewardSpec(name="motion", weight=float("nan"))
    with pytest.raises(ValidationError):
        RewardSpec(name="motion", wieght=1.0)


# ------------------------------------------------------------------------------------------ input validation


@pytest.mark.parametrize(
    ("video", "match"),
    [
        (np.zeros((2, 0, 8, 8, 3), np.uint8), "non-empty"),
        (np.zeros((2, 3, 8, 8, 3), np.int64), "uint8 .* or float"),
        (np.full((2, 3, 8, 8, 3), 255.0, np.float32), r"must lie in \[0, 1\]"),
        (np.full((2, 3, 8, 8, 3), np.nan, np.float32), "finite"),
        (np.zeros((3, 8, 8, 3), np.uint8), "add the batch axis"),
        (np.zeros((2, 3, 8, 8, 4), np.uint8), r"\(B, F, H, W, 3\)"),
        (np.zeros((2, 3, 3, 8, 8), np.uint8), "move the channel axis last"),
    ],
)
def test_bad_videos_raise_clear_errors(video, match):
    with pytest.raises(ValueError, match=match):
        MeanReward()(video, ["a", "b"])


def test_bad_prompts_and_too_few_frames():
    with pytest.raises(ValueError, match="3 prompts for 2 videos"):
        MeanReward()(videos(2), ["a", "b", "c"])
    with pytest.raises(ValueError, match="single string"):
        as_video_array(videos(2), "ab")
    motion = build_reward(RewardSpec(name="motion"))
    with pytest.raises(ValueError, match="at least 2 frames"):
        motion(videos(2, f=1), ["a", "b"])
    strided = build_reward(RewardSpec(name="motion", options={"frame_stride": 4}))
    with pytest.raises(ValueError, match="lower the stride"):
        score_all([strided], videos(2, f=3), ["a", "b"])


def test_torch_input_is_accepted():
    v = videos(2)
    as_tensor = torch.from_numpy(v.astype(np.float32) / 255).to(torch.bfloat16)
    out = MeanReward()(as_tensor, ["a", "b"])
    np.testing.assert_allclose(out.scores, v.mean(axis=(1, 2, 3, 4)) / 255, atol=5e-3)


# ------------------------------------------------------------------------------------------ views, score_all


def test_video_batch_views():
    v = videos(2)
    batch = VideoBatch(v)
    np.testing.assert_allclose(batch.float01, v / 255.0, rtol=1e-6)
    assert batch.float01 is batch.float01  # computed once
    luma = 0.299 * v[..., 0] + 0.587 * v[..., 1] + 0.114 * v[..., 2]
    assert np.abs(batch.gray.astype(np.float64) - luma).max() <= 0.51
    as_float = VideoBatch(v.astype(np.float64) / 255.0)
    np.testing.assert_array_equal(as_float.uint8, v)
    sub = batch.subset([1])
    assert "gray" in sub.__dict__  # already-computed views are sliced, not recomputed
    np.testing.assert_array_equal(sub.gray, batch.gray[1:2])


def test_score_all_shares_views_and_batches():
    class Other(MeanReward):
        name: ClassVar[str] = "other_test"

    first, second = MeanReward(), Other()
    v = videos(5)
    prompts = ["a", "b", "c", "boom", "e"]
    out = score_all([first, second], v, prompts, batch_size=2)
    # chunk [c, boom] failed as a batch and was rescored one sample at a time; the last chunk has 1 video
    assert [b.size for b in first.batches] == [2, 2, 1, 1, 1]
    assert first.batches[0] is second.batches[0]  # the same views object is shared by all rewards
    for reward_out in out.values():
        assert reward_out.num_nan == 1 and list(reward_out.errors) == [3]
        expected = v.astype(np.float32).mean(axis=(1, 2, 3, 4)) / 255
        np.testing.assert_allclose(np.delete(reward_out.scores, 3), np.delete(expected, 3), rtol=1e-6)
    with pytest.raises(ValueError, match="distinct names"):
        score_all([first, MeanReward()], v, prompts)


def test_sample_frame_indices():
    np.testing.assert_array_equal(sample_frame_indices(10, 3), [0, 3, 6, 9])
    # VideoAlign's 10 of 81 frames: round(linspace(0, 80, 10)).
    np.testing.assert_array_equal(sample_frame_indices(81, 1, 10), [0, 9, 18, 27, 36, 44, 53, 62, 71, 80])
    np.testing.assert_array_equal(sample_frame_indices(1, 2, 5), [0])
