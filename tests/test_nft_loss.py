"""NFT loss: hand-computed values, gradient direction, x0/velocity factor, adaptive weights, selective KL."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astrolabe.rl.nft import (
    NFTConfig,
    adaptive_weight,
    implicit_policies,
    nft_loss,
    sample_train_sigma,
    sample_train_sigmas,
    unwarp_sigma,
    x0_to_velocity,
)


def _close(actual: torch.Tensor, expected: torch.Tensor, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    """allclose via numpy (torch.testing imports sympy: seconds of start-up)."""
    np.testing.assert_allclose(actual.detach().double().numpy(), expected.detach().double().numpy(), rtol, atol)


WARPED = [1.0, 0.9375, 5 * 0.5 / (1 + 4 * 0.5), 0.625]  # shift-5 images of 1, .75, .5, .25


def _hand_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    f = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64, requires_grad=True)
    o = torch.tensor([[0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    x0 = torch.tensor([[1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    r = torch.tensor([1.0, 0.25])
    return f, o, x0, r


def test_hand_computed_policy_loss_and_metrics() -> None:
    # beta = 0.5: p = [[.5, 1], [.5, 1]], n = [[-.5, -1], [1.5, 1]]
    # sample 0: Lpos = mean(.25, 0) = .125           -> 1 * .125 = .125
    # sample 1: Lpos = mean(.25, 1) = .625, Lneg = mean(2.25, 1) = 1.625 -> .25*.625 + .75*1.625 = 1.375
    f, o, x0, r = _hand_batch()
    cfg = NFTConfig(beta=0.5, kl_weight=0.0)
    loss, m = nft_loss(f, o, x0, r, sigma=0.5, cfg=cfg)
    assert loss.item() == pytest.approx(0.75)
    assert m["loss/policy"] == pytest.approx(0.75)
    assert m["loss/pos"] == pytest.approx((0.125 + 0.625) / 2)
    assert m["loss/neg"] == pytest.approx((3.125 + 1.625) / 2)
    assert m["nft/x0_norm"] == pytest.approx(0.5)
    assert m["nft/old_deviation"] == pytest.approx((1 + 4 + 1 + 0) / 4)
    assert m["loss/kl"] == 0.0


def test_gradient_matches_derivation() -> None:
    f, o, x0, r = _hand_batch()
    beta = 0.5
    loss, _ = nft_loss(f, o, x0, r, sigma=1.0, cfg=NFTConfig(beta=beta))
    loss.backward()
    p, n = implicit_policies(f.detach(), o, beta)
    rr = r.double()[:, None]
    expected = 2 * beta * (rr * (p - x0) - (1 - rr) * (n - x0)) / (2 * 2)  # 1/B * 1/D of the means
    _close(f.grad, expected.float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("r_value", "closer"), [(1.0, True), (0.0, False)])
def test_gradient_step_direction(r_value: float, closer: bool) -> None:
    g = torch.Generator().manual_seed(0)
    o = torch.randn(3, 2, 4, generator=g)
    x0 = torch.randn(3, 2, 4, generator=g)
    f = o.clone().requires_grad_(True)
    loss, _ = nft_loss(f, o, x0, torch.full((3,), r_value), sigma=0.5, cfg=NFTConfig())
    loss.backward()
    f_new = f.detach() - 1.0 * f.grad
    before = ((f.detach() - x0) ** 2).sum(dim=(1, 2))
    after = ((f_new - x0) ** 2).sum(dim=(1, 2))
    assert bool(torch.all(after < before)) is closer
    # at f = o the gradient is 2*beta*(2r-1)*(o - x0) / (B*D)
    _close(f.grad, 2 * 0.1 * (2 * r_value - 1) * (o - x0) / (3 * 8))


def test_symmetric_optimality_gives_zero_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    o = torch.randn(4, 3, 5, generator=g)
    x0 = torch.randn(4, 3, 5, generator=g)
    f = o.clone().requires_grad_(True)
    loss, _ = nft_loss(f, o, x0, torch.full((4,), 0.5), sigma=0.7, cfg=NFTConfig())
    loss.backward()
    assert f.grad.abs().max().item() < 1e-7


def _noised(seed: int, shape: tuple[int, ...], sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x0, eps, f, o, ref = (torch.randn(*shape, generator=g) for _ in range(5))
    s = sigma.view(-1, *([1] * (len(shape) - 1)))
    return x0, (1 - s) * x0 + s * eps, f, o, ref


def test_x0_loss_is_sigma_squared_times_velocity_loss() -> None:
    sigma = 0.625
    x0, x_t, f, o, ref = _noised(2, (3, 2, 4), torch.tensor([sigma] * 3))
    r = torch.tensor([0.9, 0.2, 0.5])
    base = dict(kl_ref=ref, kl_mask=torch.tensor([True, False, True]))
    lx, mx = nft_loss(f, o, x0, r, sigma, x_t, cfg=NFTConfig(kl_weight=1.0), **base)
    vcfg = NFTConfig(kl_weight=1.0, space="velocity", kl_space="velocity")
    lv, mv = nft_loss(f, o, x0, r, sigma, x_t, cfg=vcfg, **base)
    assert mx["loss/policy"] == pytest.approx(sigma**2 * mv["loss/policy"], rel=1e-5)
    assert mx["loss/kl"] == pytest.approx(sigma**2 * mv["loss/kl"], rel=1e-5)
    assert lx.item() == pytest.approx(sigma**2 * lv.item(), rel=1e-5)


def test_per_sample_sigma_velocity_factor() -> None:
    sig = torch.tensor([1.0, 0.5, 0.25])
    x0, x_t, f, o, _ = _noised(3, (3, 6), sig)
    r = torch.tensor([0.8, 0.1, 0.6])
    for i in range(3):
        sl = slice(i, i + 1)
        lx, _ = nft_loss(f[sl], o[sl], x0[sl], r[sl], sig[sl], x_t[sl], cfg=NFTConfig())
        lv, _ = nft_loss(f[sl], o[sl], x0[sl], r[sl], sig[sl], x_t[sl], cfg=NFTConfig(space="velocity"))
        assert lx.item() == pytest.approx(sig[i].item() ** 2 * lv.item(), rel=1e-5)
    # x0_to_velocity of the clean latent is the flow target eps - x0
    eps = (x_t - (1 - sig[:, None]) * x0) / sig[:, None]
    _close(x0_to_velocity(x0, x_t, sig), eps - x0, rtol=1e-5, atol=1e-5)


def test_velocity_space_requires_x_t() -> None:
    f, o, x0, r = _hand_batch()
    with pytest.raises(ValueError, match="x_t"):
        nft_loss(f, o, x0, r, 0.5, cfg=NFTConfig(space="velocity"))


def test_adaptive_weighting_values() -> None:
    f, o, x0, r = _hand_batch()
    loss, m = nft_loss(f, o, x0, r, 0.5, cfg=NFTConfig(beta=0.5, adaptive_weighting=True))
    # weights: sample 0: w+ = mean(.5, 0) = .25, w- = mean(1.5, 2) = 1.75
    #          sample 1: w+ = mean(.5, 1) = .75, w- = mean(1.5, 1) = 1.25
    l0 = 1.0 * 0.125 / 0.25
    l1 = 0.25 * 0.625 / 0.75 + 0.75 * 1.625 / 1.25
    assert loss.item() == pytest.approx((l0 + l1) / 2, rel=1e-6)
    assert m["nft/adaptive_weight_pos"] == pytest.approx((0.25 + 0.75) / 2)
    assert m["nft/adaptive_weight_neg"] == pytest.approx((1.75 + 1.25) / 2)
    # the weight is detached: gradient = plain-loss gradient divided by the weight
    loss.backward()
    p, n = implicit_policies(f.detach(), o, 0.5)
    w_pos = torch.tensor([0.25, 0.75], dtype=torch.float64)[:, None]
    w_neg = torch.tensor([1.75, 1.25], dtype=torch.float64)[:, None]
    rr = r.double()[:, None]
    expected = 2 * 0.5 * (rr * (p - x0) / w_pos - (1 - rr) * (n - x0) / w_neg) / 4
    _close(f.grad, expected.float(), rtol=1e-5, atol=1e-6)


def test_adaptive_weight_is_clipped() -> None:
    x = torch.ones(2, 3)
    _close(adaptive_weight(x, x), torch.full((2,), 1e-5))


def test_scale_by_inverse_beta() -> None:
    f, o, x0, r = _hand_batch()
    plain, _ = nft_loss(f, o, x0, r, 0.5, cfg=NFTConfig(beta=0.5, kl_weight=0.0))
    scaled, _ = nft_loss(f, o, x0, r, 0.5, cfg=NFTConfig(beta=0.5, kl_weight=0.0, scale_by_inverse_beta=True))
    assert scaled.item() == pytest.approx(plain.item() * 5.0 / 0.5)


def test_selective_kl_only_through_flagged_samples() -> None:
    g = torch.Generator().manual_seed(4)
    o, x0, ref = (torch.randn(3, 2, 2, generator=g) for _ in range(3))
    f = o.clone().requires_grad_(True)  # r = .5 and f = o: no policy gradient
    mask = torch.tensor([True, False, True])
    loss, m = nft_loss(f, o, x0, torch.full((3,), 0.5), 0.5, cfg=NFTConfig(kl_weight=2.0), kl_ref=ref, kl_mask=mask)
    per = ((o - ref) ** 2).mean(dim=(1, 2))
    assert m["loss/kl"] == pytest.approx(per[mask].mean().item(), rel=1e-6)
    assert m["kl/flagged_fraction"] == pytest.approx(2 / 3)
    loss.backward()
    f_plain = o.clone().requires_grad_(True)  # the same loss without the KL term
    nft_loss(f_plain, o, x0, torch.full((3,), 0.5), 0.5, cfg=NFTConfig(kl_weight=0.0))[0].backward()
    kl_grad = f.grad - f_plain.grad
    assert kl_grad[1].abs().max().item() == 0.0
    # d/df of 2 * mean_{flagged}(mean((f - g)^2)) = 2 * 2 * (f - g) / (2 flagged * 4 elements)
    _close(kl_grad[mask], (2 * 2 * (o - ref) / (2 * 4))[mask])


def test_selective_kl_none_flagged_keeps_graph() -> None:
    g = torch.Generator().manual_seed(5)
    o, x0, ref = (torch.randn(2, 3, generator=g) for _ in range(3))
    f = o.clone().requires_grad_(True)
    none = torch.zeros(2, dtype=torch.bool)
    loss, m = nft_loss(f, o, x0, torch.full((2,), 0.5), 0.5, cfg=NFTConfig(), kl_ref=ref, kl_mask=none)
    assert m["loss/kl"] == 0.0 and m["kl/flagged_fraction"] == 0.0
    assert loss.requires_grad
    loss.backward()
    assert f.grad is not None and f.grad.abs().max().item() < 1e-7


def test_kl_without_mask_covers_all_samples() -> None:
    g = torch.Generator().manual_seed(6)
    f, o, x0, ref = (torch.randn(3, 4, generator=g) for _ in range(4))
    _, m = nft_loss(f, o, x0, torch.full((3,), 0.3), 0.5, cfg=NFTConfig(), kl_ref=ref)
    assert m["loss/kl"] == pytest.approx(((f - ref) ** 2).mean().item(), rel=1e-6)
    assert m["loss/total"] == pytest.approx(m["loss/policy"] + 1e-4 * m["loss/kl"], rel=1e-6)
    assert m["kl/old_ref_mse"] == pytest.approx(((o - ref) ** 2).mean().item(), rel=1e-6)


def test_bf16_predictions_give_float32_loss_and_bf16_grad() -> None:
    g = torch.Generator().manual_seed(8)
    o, x0 = (torch.randn(2, 3, 4, generator=g) for _ in range(2))
    f = (o + 0.1).to(torch.bfloat16).requires_grad_(True)
    r = torch.tensor([0.9, 0.1])
    loss, m = nft_loss(f, o.to(torch.bfloat16), x0.to(torch.bfloat16), r, 0.5, cfg=NFTConfig())
    assert loss.dtype == torch.float32
    o16, x016 = o.to(torch.bfloat16).float(), x0.to(torch.bfloat16).float()
    ref, _ = nft_loss(f.detach().float(), o16, x016, r, 0.5, cfg=NFTConfig())
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    loss.backward()
    assert f.grad.dtype == torch.bfloat16 and f.grad.abs().sum().item() > 0


def test_invalid_inputs() -> None:
    f, o, x0, _ = _hand_batch()
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        nft_loss(f, o, x0, torch.tensor([1.2, 0.0]), 0.5, cfg=NFTConfig())
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        nft_loss(f, o, x0, torch.tensor([float("nan"), 0.0]), 0.5, cfg=NFTConfig())
    with pytest.raises(ValueError, match="shape"):
        nft_loss(f, o[:1], x0, torch.tensor([1.0, 0.0]), 0.5, cfg=NFTConfig())
    with pytest.raises(ValueError, match="uniform_sigma_range"):
        NFTConfig(uniform_sigma_range=(0.5, 0.2))
    with pytest.raises(ValueError):
        NFTConfig(beta=0.0)
    with pytest.raises(ValueError):
        NFTConfig(unknown_knob=1)


def test_unwarp_sigma_recovers_release_levels() -> None:
    assert [unwarp_sigma(s, 5.0) for s in WARPED] == pytest.approx([1.0, 0.75, 0.5, 0.25])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [("rollout_warped", WARPED), ("release_unwarped", [1.0, 0.75, 0.5, 0.25])],
)
def test_sample_train_sigma_discrete(mode: str, expected: list[float]) -> None:
    cfg = NFTConfig(train_sigmas=mode)
    draws = sample_train_sigmas(cfg, WARPED, torch.Generator().manual_seed(0), 400, shift=5.0)
    assert draws.shape == (400,)
    assert sorted(set(round(v, 6) for v in draws.tolist())) == sorted(round(v, 6) for v in expected)
    one = sample_train_sigma(cfg, WARPED, torch.Generator().manual_seed(7), shift=5.0)
    assert one == sample_train_sigma(cfg, WARPED, torch.Generator().manual_seed(7), shift=5.0)
    assert any(abs(one - e) < 1e-9 for e in expected)


def test_sample_train_sigma_uniform_and_errors() -> None:
    draws = sample_train_sigmas(NFTConfig(train_sigmas="uniform"), WARPED, torch.Generator().manual_seed(0), 500)
    assert draws.min().item() >= 0.625 and draws.max().item() <= 1.0
    assert draws.std().item() > 0.05  # continuous, not the discrete levels
    cfg = NFTConfig(train_sigmas="uniform", uniform_sigma_range=(0.2, 0.4))
    d2 = sample_train_sigmas(cfg, WARPED, torch.Generator().manual_seed(0), 500)
    assert d2.min().item() >= 0.2 and d2.max().item() <= 0.4
    with pytest.raises(ValueError, match="shift"):
        sample_train_sigma(NFTConfig(train_sigmas="release_unwarped"), WARPED, torch.Generator())
    with pytest.raises(ValueError, match="empty"):
        sample_train_sigma(NFTConfig(), [], torch.Generator())
