"""Rewards -> group advantages -> optimality, checked against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

import astrolabe  # noqa: F401
from astrolabe.rl.advantages import (
    AdvantageConfig,
    ascending_average_ranks,
    combine,
    group_advantages,
    group_index,
    normalize_columns,
    optimality,
    optimality_from_rewards,
)

EPS = 1e-4


def test_equal_rewards_give_half_optimality() -> None:
    adv, info = group_advantages([2.0, 2.0, 2.0, 5.0, 5.0, 5.0], [0, 0, 0, 1, 1, 1], AdvantageConfig())
    assert np.all(adv == 0.0)
    assert np.all(optimality(adv, 5.0) == 0.5)
    assert info["n_zero_std_groups"] == 2 and info["zero_std_ratio"] == 1.0


def test_optimality_clipping() -> None:
    r = optimality([-10.0, -5.0, 0.0, 2.5, 10.0, np.nan], 5.0)
    assert r.dtype == np.float32
    np.testing.assert_array_equal(r[:5], [0.0, 0.0, 0.5, 0.75, 1.0])
    assert np.isnan(r[5])
    np.testing.assert_allclose(optimality([1.0], 2.0), [0.75])
    with pytest.raises(ValueError):
        optimality([0.0], 0.0)


def test_nan_rewards_are_excluded() -> None:
    adv, info = group_advantages([1.0, 2.0, np.nan, 3.0], [7, 7, 7, 7], AdvantageConfig())
    s = math.sqrt(2.0 / 3.0)  # population std of 1, 2, 3
    np.testing.assert_allclose(adv[[0, 1, 3]], [-1 / (s + EPS), 0.0, 1 / (s + EPS)], rtol=1e-6)
    assert np.isnan(adv[2]) and info["n_nan"] == 1
    assert adv.dtype == np.float32


def test_group_versus_global_std() -> None:
    rewards = [0.0, 2.0, 10.0, 14.0]
    groups = ["a", "a", "b", "b"]
    adv_global, info = group_advantages(rewards, groups, AdvantageConfig(std_mode="global"))
    gs = math.sqrt((6.5**2 + 4.5**2 + 3.5**2 + 7.5**2) / 4)
    np.testing.assert_allclose(adv_global, np.array([-1, 1, -2, 2]) / (gs + EPS), rtol=1e-6)
    assert info["global_std"] == pytest.approx(gs)
    adv_group, info = group_advantages(rewards, groups, AdvantageConfig(std_mode="group"))
    np.testing.assert_allclose(adv_group, [-1 / (1 + EPS), 1 / (1 + EPS), -2 / (2 + EPS), 2 / (2 + EPS)], rtol=1e-6)
    assert info["reward_std_mean"] == pytest.approx(1.5)
    assert info["group_size_mean"] == 2.0


def test_singleton_and_all_nan_groups_get_zero() -> None:
    rewards = [1.0, 3.0, 9.0, np.nan, np.nan]
    adv, info = group_advantages(rewards, [0, 0, 1, 2, 2], AdvantageConfig(std_mode="group"))
    assert adv[2] == 0.0  # single valid sample: no contrast
    assert np.isnan(adv[3]) and np.isnan(adv[4])
    assert info["n_small_groups"] == 2 and info["n_nan"] == 2
    np.testing.assert_allclose(adv[:2], [-1 / (1 + EPS), 1 / (1 + EPS)], rtol=1e-6)


def test_group_ids_of_any_hashable_kind() -> None:
    rewards = [0.0, 2.0, 10.0, 14.0]
    expected, _ = group_advantages(rewards, [0, 0, 1, 1], AdvantageConfig())
    tuples = [("p", 3), ("p", 3), ("p", 5), ("p", 5)]
    for ids in (tuples, np.array([[0, 1], [0, 1], [0, 2], [0, 2]]), ["x", "x", "y", "y"]):
        adv, _ = group_advantages(rewards, ids, AdvantageConfig())
        np.testing.assert_array_equal(adv, expected)
    dense, n = group_index([("a", 1), ("b", 1), ("a", 1)])
    np.testing.assert_array_equal(dense, [0, 1, 0])
    assert n == 2
    with pytest.raises(ValueError, match="group_ids"):
        group_advantages(rewards, [0, 0, 1], AdvantageConfig())


def test_zscore_and_weighted_combination() -> None:
    cols = {"a": [1.0, 2.0, 3.0, 4.0], "b": [10.0, 10.0, 20.0, 20.0], "c": [np.nan, 0.0, 0.0, 0.0]}
    normed = normalize_columns(cols, "zscore")
    za = (np.array([1, 2, 3, 4]) - 2.5) / math.sqrt(1.25)
    np.testing.assert_allclose(normed["a"], za)
    np.testing.assert_allclose(normed["b"], [-1.0, -1.0, 1.0, 1.0])
    assert np.isnan(normed["c"][0]) and np.all(normed["c"][1:] == 0.0)  # constant valid part -> 0
    np.testing.assert_allclose(combine(normed, {"a": 2.0, "b": 1.0}), 2 * za + np.array([-1, -1, 1, 1]))
    mixed = combine(normed, {"a": 1.0, "c": 0.5})
    assert np.isnan(mixed[0]) and not np.isnan(mixed[1:]).any()
    # a zero weight does not "use" the reward: its NaN does not propagate
    assert not np.isnan(combine(normed, {"a": 1.0, "c": 0.0})).any()
    with pytest.raises(KeyError, match="no column"):
        combine(normed, {"zzz": 1.0})
    with pytest.raises(ValueError, match="nonzero"):
        combine(normed, {"a": 0.0})


def test_rank_and_none_normalisation() -> None:
    np.testing.assert_array_equal(ascending_average_ranks(np.array([3.0, 1.0, 2.0, 2.0])), [4.0, 1.0, 2.5, 2.5])
    normed = normalize_columns({"x": [3.0, 1.0, 2.0, 2.0, np.nan]}, "rank")["x"]
    np.testing.assert_allclose(normed[:4], [1.0, -1.0, 0.0, 0.0])
    assert np.isnan(normed[4])
    raw = normalize_columns({"x": [3.0, np.inf]}, "none")["x"]
    assert raw[0] == 3.0 and np.isnan(raw[1])
    with pytest.raises(ValueError, match="zscore"):
        normalize_columns({"x": [1.0]}, "minmax")


def test_end_to_end_release_style() -> None:
    # "none" normalisation, global std: the release's PerPromptStatTracker on an unnormalised weighted sum
    cols = {"hps": [1.0, 3.0, 0.0, 4.0], "mq": [0.0, 0.0, 1.0, 1.0]}
    cfg = AdvantageConfig(normalize_rewards="none", clip=5.0)
    r, adv, combined, info = optimality_from_rewards(cols, {"hps": 1.0, "mq": 1.0}, [0, 0, 1, 1], cfg)
    np.testing.assert_allclose(combined, [1.0, 3.0, 1.0, 5.0])
    gs = np.std([1.0, 3.0, 1.0, 5.0])
    exp_adv = np.array([-1.0, 1.0, -2.0, 2.0]) / (gs + EPS)
    np.testing.assert_allclose(adv, exp_adv, rtol=1e-6)
    np.testing.assert_allclose(r, np.clip(exp_adv, -5, 5) / 10 + 0.5, rtol=1e-6)
    assert info["n_groups"] == 2
    with pytest.raises(KeyError, match="no column"):
        optimality_from_rewards(cols, {"hps": 1.0, "clip": 1.0}, [0, 0, 1, 1], cfg)


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        AdvantageConfig(clip=0.0)
    with pytest.raises(ValueError):
        AdvantageConfig(std_mode="per_prompt")
    with pytest.raises(ValueError):
        AdvantageConfig(weights={"a": 1.0})
