"""RL schedules per iteration (issue 12 point 5): old-policy decay and reference age count iterations, group
size 1 is refused, and the selective KL's default sign/scope pulls the flagged samples toward the reference."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from astrolabe.config import ConfigError, load_config
from astrolabe.rl.nft import NFTConfig, nft_loss
from astrolabe.rl.schedules import ReferenceRefreshConfig, ReferenceRefresher, old_policy_decay
from astrolabe.rl.selective_kl import FractionController, SelectiveKLConfig, compute_kl_mask
from stages.nft_update import end_phase


class _Recorder:
    """Stands in for TrainingState: records what end_phase feeds the schedules; ``step`` is deliberately large."""

    def __init__(self, steps_per_iteration: int) -> None:
        self.step = 0
        self.steps_per_iteration = steps_per_iteration
        self.refresher = ReferenceRefresher(ReferenceRefreshConfig(max_age_iterations=3, quick_refresh_iterations=1))
        self.policies = SimpleNamespace(maybe_refresh_ref=self._maybe_refresh)
        self.decays: list[float] = []
        self.refreshed_at: list[int] = []

    def update_old(self, iterations: int) -> float:
        d = old_policy_decay(iterations, "release_linear")
        self.decays.append(d)
        return d

    def _maybe_refresh(self, iteration: int, kl: float | None) -> bool:
        if not self.refresher.should_refresh(iteration, kl):
            return False
        self.refresher.mark_refreshed(iteration)
        self.refreshed_at.append(iteration)
        return True


def test_old_decay_and_reference_age_count_iterations_not_optimizer_steps() -> None:
    state = _Recorder(steps_per_iteration=64)  # about the tiny run's optimizer steps per iteration
    for it in range(24):  # the tiny run's 24 iterations
        state.step += state.steps_per_iteration  # what optimizer steps would have counted
        metrics = {"loss/kl": 0.0}
        end_phase(state, metrics, it)
        assert metrics["update/old_decay"] == pytest.approx(0.001 * (it + 1))
    # release decay type 1 after 24 epochs: 0.024; counted in optimizer steps it hit the 0.5 cap at iteration 8
    assert state.decays[-1] == pytest.approx(0.024) and max(state.decays) < 0.5
    assert old_policy_decay(8 * 64, "release_linear") == 0.5
    # the reference is refreshed when older than 3 iterations: at iterations 4, 8, ... (never by steps)
    assert state.refreshed_at == [4, 8, 12, 16, 20, 24]


def test_reference_refresh_on_kl_uses_iteration_age() -> None:
    state = _Recorder(steps_per_iteration=16)
    end_phase(state, {"loss/kl": 1.0}, 0)  # KL above the 0.15 threshold: refresh at iteration 1
    end_phase(state, {"loss/kl": float("nan")}, 1)  # NaN never triggers
    assert state.refreshed_at == [1]
    assert state.refresher.threshold == pytest.approx(0.15)  # age 1 is not < quick_refresh_iterations = 1


def test_group_size_one_is_refused_with_a_clear_error() -> None:
    with pytest.raises(ConfigError) as e:
        load_config("configs/tiny.yaml", ["rollout.group_size=1"])
    msg = str(e.value)
    assert "rollout.group_size" in msg and "at least 2 candidates per group" in msg and "learns nothing" in msg
    assert load_config("configs/tiny.yaml", ["rollout.group_size=2"]).rollout.group_size == 2


# ----------------------------------------------------------------------------------- selective KL


def test_default_mask_flags_what_the_main_reward_overrates_within_its_group() -> None:
    cfg = SelectiveKLConfig(main_reward="hps", auxiliary_rewards=["mq"], initial_fraction=0.2)
    assert (cfg.sign, cfg.scope) == ("main_over", "group")
    # group a: sample 0 is best by hps and worst by mq (over-rated by the main reward); group b: all agree.
    # Group b's hps values are higher everywhere (a prompt offset): global ranks would flag b's samples instead.
    cols = {"hps": [3.0, 2.0, 1.0, 10.0, 9.0, 8.0], "mq": [0.0, 1.0, 2.0, 3.0, 2.0, 1.0]}
    groups = ["a", "a", "a", "b", "b", "b"]
    mask, u, _ = compute_kl_mask(cols, cfg, FractionController(cfg), groups)
    np.testing.assert_array_equal(u, [2.0, 0.0, -2.0, 0.0, 0.0, 0.0])
    np.testing.assert_array_equal(mask, [True, False, False, False, False, False])
    release = SelectiveKLConfig(main_reward="hps", auxiliary_rewards=["mq"], sign="main_under", scope="global")
    mask_rel, _, _ = compute_kl_mask(cols, release, FractionController(release), groups)
    assert not mask_rel[0]  # the release never flags the over-rated sample


def test_kl_term_pulls_toward_the_reference_on_flagged_samples_only() -> None:
    g = torch.Generator().manual_seed(0)
    b = 4
    f = torch.randn(b, 3, 2, 2, generator=g, requires_grad=True)  # current policy x0 prediction
    o, x0 = torch.randn(b, 3, 2, 2, generator=g), torch.randn(b, 3, 2, 2, generator=g)
    ref = torch.randn(b, 3, 2, 2, generator=g)
    r = torch.tensor([0.9, 0.1, 0.6, 0.3])
    mask = torch.tensor([True, False, True, False])
    w = 0.5

    def grad(kl_weight: float) -> torch.Tensor:
        loss, _ = nft_loss(f, o, x0, r, 0.5, cfg=NFTConfig(kl_weight=kl_weight), kl_ref=ref, kl_mask=mask)
        (gf,) = torch.autograd.grad(loss, f)
        return gf

    kl_grad = grad(w) - grad(0.0)  # the KL term's own gradient
    assert torch.equal(kl_grad[~mask], torch.zeros_like(kl_grad[~mask]))  # unflagged: untouched
    # flagged: d/df of w * mean_flagged(mean((f - ref)^2)) = w * 2 (f - ref) / (n_flagged * elements per sample)
    expected = w * 2.0 * (f - ref)[mask] / (int(mask.sum()) * f[0].numel())
    np.testing.assert_allclose(kl_grad[mask].numpy(), expected.detach().numpy(), rtol=1e-5, atol=1e-7)
    # a descent step on the KL term moves every flagged sample toward the reference, no other one
    with torch.no_grad():
        stepped = f - 1.0 * kl_grad
        before, after = ((f - ref) ** 2).flatten(1).sum(1), ((stepped - ref) ** 2).flatten(1).sum(1)
    assert bool((after[mask] < before[mask]).all()) and torch.equal(after[~mask], before[~mask])
