"""Selective KL (rank disagreement, mask, fraction controller) and the policy / reference schedules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import astrolabe  # noqa: F401
from astrolabe.rl.schedules import (
    PolicyAveragingConfig,
    ReferenceRefreshConfig,
    ReferenceRefresher,
    blend_into_,
    ema_decay,
    old_policy_decay,
)
from astrolabe.rl.selective_kl import (
    FractionController,
    SelectiveKLConfig,
    candidate_values,
    compute_kl_mask,
    descending_ranks,
    rank_disagreement,
    select_kl_mask,
)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """allclose via numpy (torch.testing imports sympy: seconds of start-up)."""
    np.testing.assert_allclose(actual.detach().double().numpy(), expected.detach().double().numpy(), rtol, atol)


def _cfg(**kw) -> SelectiveKLConfig:
    return SelectiveKLConfig(main_reward="hps", auxiliary_rewards=["mq"], **kw)


# ----------------------------------------------------------------------------------- ranks


def test_descending_ranks_with_ties() -> None:
    np.testing.assert_array_equal(descending_ranks(np.array([3.0, 1.0, 3.0, 2.0])), [1.5, 4.0, 1.5, 3.0])


def test_rank_disagreement_constructed_cases() -> None:
    cols = {"hps": [4.0, 3.0, 2.0, 1.0], "mq": [1.0, 2.0, 3.0, 4.0], "ta": [4.0, 3.0, 2.0, 1.0]}
    # main ranks 1..4, mq ranks 4..1: u = rank_main - rank_aux
    u = rank_disagreement(cols, "hps", ["mq"], sign="main_under")
    np.testing.assert_array_equal(u, [-3.0, -1.0, 1.0, 3.0])
    np.testing.assert_array_equal(rank_disagreement(cols, "hps", ["mq"], sign="main_over"), [3.0, 1.0, -1.0, -3.0])
    # two aux: mean of ranks (4,1), (3,2), (2,3), (1,4) = 2.5 everywhere
    two_aux = rank_disagreement(cols, "hps", ["mq", "ta"], sign="main_under")
    np.testing.assert_array_equal(two_aux, [-1.5, -0.5, 0.5, 1.5])
    assert u.dtype == np.float32


def test_rank_disagreement_within_groups_and_nan() -> None:
    cols = {"hps": [1.0, 2.0, 5.0, 6.0, 7.0], "mq": [2.0, 1.0, 6.0, np.nan, 5.0]}
    u_group = rank_disagreement(cols, "hps", ["mq"], group_ids=[0, 0, 1, 1, 1], sign="main_under")
    # group 0: main ranks (2, 1), aux (1, 2); group 1 (sample 3 dropped): main (2, 1), aux (1, 2)
    np.testing.assert_array_equal(u_group[[0, 1, 2, 4]], [1.0, -1.0, 1.0, -1.0])
    assert np.isnan(u_group[3])
    u_global = rank_disagreement(cols, "hps", ["mq"], sign="main_under")
    # valid samples 0,1,2,4: main ranks (4, 3, 2, 1), aux ranks (3, 4, 1, 2)
    np.testing.assert_array_equal(u_global[[0, 1, 2, 4]], [1.0, -1.0, 1.0, -1.0])
    mask, info = select_kl_mask(u_global, 1.0, "two")
    assert not mask[3] and info["kl/n_nan"] == 1
    with pytest.raises(KeyError, match="no column"):
        rank_disagreement(cols, "hps", ["vq"], sign="main_under")


# ----------------------------------------------------------------------------------- mask


def test_select_kl_mask_one_and_two_sided() -> None:
    u = np.array([-3.0, -1.0, 1.0, 3.0, 0.0, 2.0])
    np.testing.assert_array_equal(np.sort(candidate_values(u, "one")), [0.0, 1.0, 2.0, 3.0])
    mask, info = select_kl_mask(u, 0.5, "one")  # 50th percentile of (0, 1, 2, 3) = 1.5
    np.testing.assert_array_equal(mask, [False, False, False, True, False, True])
    assert info["kl/threshold"] == pytest.approx(1.5) and info["kl/n_candidates"] == 4 and info["kl/n_flagged"] == 2
    mask2, info2 = select_kl_mask(u, 0.5, "two")  # 50th percentile of (0, 1, 1, 2, 3, 3) = 1.5
    np.testing.assert_array_equal(mask2, [True, False, False, True, False, True])
    assert info2["kl/threshold"] == pytest.approx(1.5)
    # 98th percentile of (0, 1, 2) = 1.96 < 2: the maximum is flagged ...
    np.testing.assert_array_equal(select_kl_mask(np.array([0.0, 1.0, 2.0]), 0.02, "one")[0], [False, False, True])
    # ... but with tied maxima the threshold equals them and the strict inequality flags nothing
    assert not select_kl_mask(np.array([0.0, 2.0, 2.0]), 0.02, "one")[0].any()


def test_select_kl_mask_without_candidates() -> None:
    mask, info = select_kl_mask(np.array([-1.0, -2.0, np.nan]), 0.1, "one")
    assert not mask.any() and np.isnan(info["kl/threshold"])
    with pytest.raises(ValueError):
        select_kl_mask(np.array([1.0]), 0.0, "one")


# ----------------------------------------------------------------------------------- controller


def test_controller_scripted_trajectory() -> None:
    ctrl = FractionController(_cfg(buffer_size=3))
    means = [1.0, 2.0, 1.5, 0.5, 1.8, 1.9]
    # first -> .1; 2 > 1 up; 1.5 inside; .5 < 1 down; 1.8 in [.5, 2]; buffer (.5, 1.8) after trim: 1.9 up
    expected = [0.1, 0.11, 0.11, 0.099, 0.099, 0.1089]
    got = [ctrl.update([m - 0.5, m + 0.5]) for m in means]
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert ctrl.buffer == pytest.approx([0.5, 1.8, 1.9])


def test_controller_clips_to_bounds() -> None:
    ctrl = FractionController(_cfg())
    for m in range(1, 30):  # always a new maximum: *1.1 until the 0.2 cap
        f = ctrl.update([float(m)])
    assert f == 0.2
    for m in range(30):  # always a new minimum: *0.9 until the 0.02 floor
        f = ctrl.update([-float(m)])
    assert f == 0.02


def test_controller_empty_candidates_leave_state() -> None:
    ctrl = FractionController(_cfg())
    ctrl.update([1.0])
    state = ctrl.state_dict()
    assert ctrl.update([]) == 0.1 and ctrl.update([np.nan]) == 0.1
    assert ctrl.state_dict() == state


def test_controller_state_round_trip() -> None:
    a = FractionController(_cfg())
    for m in [1.0, 3.0, 0.2]:
        a.update([m])
    b = FractionController(_cfg())
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for m in [5.0, 0.1, 2.0]:
        assert a.update([m]) == b.update([m])
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({"fraction": 0.1})
    with pytest.raises(KeyError, match="unexpected"):
        b.load_state_dict({**a.state_dict(), "beta_rc": 0.1})


def test_compute_kl_mask_end_to_end_and_sign() -> None:
    cols = {"hps": [4.0, 3.0, 2.0, 1.0, 0.0], "mq": [0.0, 1.0, 2.0, 3.0, 4.0]}
    # u (main_under) = (-4, -2, 0, 2, 4): candidates (0, 2, 4); fraction .1 -> 90th pct = 3.6
    release = _cfg(sign="main_under", scope="global")
    mask, u, info = compute_kl_mask(cols, release, FractionController(release))
    np.testing.assert_array_equal(u, [-4.0, -2.0, 0.0, 2.0, 4.0])
    np.testing.assert_array_equal(mask, [False, False, False, False, True])
    assert info["kl/threshold"] == pytest.approx(3.6)
    mask_over, _, _ = compute_kl_mask(cols, _cfg(scope="global"), FractionController(_cfg()))
    np.testing.assert_array_equal(mask_over, [True, False, False, False, False])
    with pytest.raises(ValueError, match="group_ids"):
        compute_kl_mask(cols, _cfg(scope="group"), FractionController(_cfg()))
    off, u_off, _ = compute_kl_mask(cols, _cfg(enabled=False), FractionController(_cfg()))
    assert off.all() and np.isnan(u_off).all()


def test_selective_kl_config_validation() -> None:
    with pytest.raises(ValueError, match="auxiliary_rewards is empty"):
        SelectiveKLConfig(main_reward="hps", auxiliary_rewards=[])
    with pytest.raises(ValueError, match="also in auxiliary_rewards"):
        SelectiveKLConfig(main_reward="hps", auxiliary_rewards=["mq", "hps"])
    with pytest.raises(ValueError, match="duplicates"):
        SelectiveKLConfig(main_reward="hps", auxiliary_rewards=["mq", "mq"])
    with pytest.raises(ValueError, match="initial_fraction"):
        _cfg(initial_fraction=0.5)
    with pytest.raises(ValueError):
        SelectiveKLConfig(main_reward="hps")  # aux must be named explicitly


# ----------------------------------------------------------------------------------- schedules


def test_old_policy_decay_kinds() -> None:
    assert [old_policy_decay(s, "release_linear") for s in (0, 100, 499, 500, 2000)] == pytest.approx(
        [0.0, 0.1, 0.499, 0.5, 0.5]
    )
    assert old_policy_decay(1000, "none") == 0.0
    ramp = [old_policy_decay(s, "flat_then_ramp") for s in (0, 74, 75, 76, 208, 209)]
    assert ramp == pytest.approx([0.0, 0.0, 0.0, 0.0075, 0.9975, 0.999])
    with pytest.raises(ValueError):
        old_policy_decay(3, "linear")
    assert PolicyAveragingConfig().old_policy_decay == "release_linear"


def test_ema_decay_and_blend() -> None:
    assert ema_decay(0) == pytest.approx(0.1)
    assert ema_decay(1) == pytest.approx(2 / 11)
    assert ema_decay(80) == pytest.approx(0.9) and ema_decay(10_000) == 0.9
    target = [torch.tensor([1.0, 2.0]), torch.tensor([4.0], dtype=torch.bfloat16)]
    source = [torch.tensor([3.0, 6.0]), torch.tensor([8.0], dtype=torch.bfloat16)]
    blend_into_(target, source, 0.25)
    _close(target[0], torch.tensor([2.5, 5.0]))
    assert target[1].dtype == torch.bfloat16 and target[1].item() == 7.0
    with pytest.raises(ValueError, match="shape"):
        blend_into_([torch.zeros(2)], [torch.zeros(3)], 0.5)


def test_reference_refresher_fixed_adaptation() -> None:
    ref = ReferenceRefresher(ReferenceRefreshConfig())
    assert not ref.should_refresh(0, 1.0)  # never at the creation step
    assert not ref.should_refresh(3, 0.1)
    assert ref.should_refresh(3, 0.2)
    ref.mark_refreshed(3)  # age 3 < 5: raise toward 0.2
    assert ref.threshold == pytest.approx(0.16)
    assert not ref.should_refresh(10, 0.155)
    assert not ref.should_refresh(10, float("nan"))
    assert not ref.should_refresh(18, None)  # age 15 is not older than 15
    assert ref.should_refresh(19, None)
    ref.mark_refreshed(19)  # age 16 > 15: lower toward 0.1
    assert ref.threshold == pytest.approx(0.15)
    ref.mark_refreshed(29)  # age 10: unchanged
    assert ref.threshold == pytest.approx(0.15) and ref.n_refreshes == 3


def test_reference_refresher_release_bug_and_off() -> None:
    ref = ReferenceRefresher(ReferenceRefreshConfig(threshold_adaptation="release"))
    ref.mark_refreshed(2)  # quick refresh: min(0.16, 0.05) -> 0.05 (the release's clamp bug)
    assert ref.threshold == pytest.approx(0.05)
    ref.mark_refreshed(30)  # slow refresh: max(0.04, 0.1) -> 0.1
    assert ref.threshold == pytest.approx(0.1)
    off = ReferenceRefresher(ReferenceRefreshConfig(threshold_adaptation="off"))
    off.mark_refreshed(1)
    off.mark_refreshed(40)
    assert off.threshold == 0.15
    with pytest.raises(ValueError, match="threshold_bounds"):
        ReferenceRefreshConfig(threshold=0.3)


def test_reference_refresher_state_round_trip() -> None:
    a = ReferenceRefresher(ReferenceRefreshConfig())
    a.mark_refreshed(2)
    a.mark_refreshed(20)
    b = ReferenceRefresher(ReferenceRefreshConfig())
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    for step, kl in [(21, 0.0), (25, 0.2), (40, None)]:
        assert a.should_refresh(step, kl) == b.should_refresh(step, kl)
    with pytest.raises(KeyError, match="missing"):
        b.load_state_dict({"threshold": 0.1, "last_refresh_iteration": 3})
    with pytest.raises(ValueError):
        a.mark_refreshed(5)  # before the last refresh
