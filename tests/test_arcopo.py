"""AR-CoPO (Neighbor GRPO) loss, advantages, anchors and config (pure tensors, milliseconds)."""

import math

import pytest
import torch

from astrolabe.config import ConfigError, load_config
from astrolabe.rl.arcopo import (
    ArCoPOConfig,
    arcopo_advantages,
    arcopo_loss,
    choose_anchors,
    clipped_surrogate,
    gather_candidates,
)

CFG = ArCoPOConfig()


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_ratio_exactly_one_at_first_update_step():
    pivot_x0 = rand(4, 5, 3, 2, 2)  # (T, G, f, C, h) old predictions = the rollout's
    cand, old_anchor = gather_candidates(pivot_x0, [1, 3])
    assert cand.shape == (8, 5, 3, 2, 2) and old_anchor.shape == (8, 3, 2, 2)
    assert torch.equal(old_anchor[4 + 2], pivot_x0[2, 3])  # row a*T + t: anchor 3, step 2
    anchor = old_anchor.clone().requires_grad_(True)  # current == old
    adv = arcopo_advantages(rand(5, seed=1))
    loss, m = arcopo_loss(anchor, cand, adv, cfg=CFG, old_anchor_pred=old_anchor)
    assert m["arcopo/ratio_mean"] == m["arcopo/ratio_min"] == m["arcopo/ratio_max"] == 1.0
    assert m["arcopo/clip_fraction"] == 0.0
    assert loss.item() == pytest.approx(-float(adv.mean()), abs=1e-12)  # mean_i A_i (= 0 for centred A)
    # the default old anchor (candidates[n, anchor_index[n]]) is the same thing
    idx = [1] * 4 + [3] * 4
    _, m2 = arcopo_loss(anchor, cand, adv, cfg=CFG, anchor_index=idx)
    assert m2["arcopo/ratio_min"] == m2["arcopo/ratio_max"] == 1.0
    loss.backward()
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0


def _hand_loss(c, a, a_old, adv, tau, eps):
    """The 3-candidate example with scalar latents in plain Python."""
    def probs(x):
        w = [math.exp(-((ci - x) ** 2) / tau) for ci in c]
        return [wi / sum(w) for wi in w]

    p, po = probs(a), probs(a_old)
    terms = []
    for pi, poi, ai in zip(p, po, adv):
        rho = pi / poi
        terms.append(min(rho * ai, min(max(rho, 1 - eps), 1 + eps) * ai))
    return -sum(terms) / 3


@pytest.mark.parametrize("eps", [0.99, 0.2])
def test_loss_matches_hand_worked_three_candidate_example(eps):
    """Candidates 0, 1, 3 (one latent element each); current anchor 1.5, old anchor 1.0; tau 2; A = (-1, .5, 1.5).

    current d = (2.25, 0.25, 2.25) -> pi   = (0.211942, 0.576117, 0.211942)
    old     d = (1,    0,    4)    -> pi_o = (0.348207, 0.574097, 0.077696)
    rho = pi / pi_o = (0.608665, 1.003518, 2.727846)
    eps = 0.99 (band [0.01, 1.99]): term 3 (A > 0, rho > 1.99) clips at 1.99:
        loss = -(-0.608665 + 0.5 * 1.003518 + 1.5 * 1.99) / 3 = -0.959365
    eps = 0.2 (band [0.8, 1.2]): term 1 (A < 0, rho < 0.8) clips at 0.8, term 3 at 1.2, term 2 inside:
        loss = -(-0.8 + 0.5 * 1.003518 + 1.5 * 1.2) / 3 = -0.500586
    """
    cfg = ArCoPOConfig(tau=2.0, clip_eps=eps)
    c, adv = [0.0, 1.0, 3.0], [-1.0, 0.5, 1.5]
    e1 = math.exp(-2.25 / 2) + math.exp(-0.25 / 2) + math.exp(-2.25 / 2)
    e0 = math.exp(-1 / 2) + 1.0 + math.exp(-4 / 2)
    rho = [math.exp(-2.25 / 2) / e1 / (math.exp(-1 / 2) / e0), math.exp(-0.25 / 2) / e1 / (1 / e0),
           math.exp(-2.25 / 2) / e1 / (math.exp(-4 / 2) / e0)]
    assert rho == pytest.approx([0.608665, 1.003518, 2.727846], abs=1e-6)
    if eps > 0.5:
        expected = -(-rho[0] + 0.5 * rho[1] + 1.5 * 1.99) / 3
        assert expected == pytest.approx(-0.959365, abs=1e-6)
    else:
        expected = -(-0.8 + 0.5 * rho[1] + 1.5 * 1.2) / 3
        assert expected == pytest.approx(-0.500586, abs=1e-6)
    assert expected == pytest.approx(_hand_loss(c, 1.5, 1.0, adv, 2.0, eps), abs=1e-12)
    cand = torch.tensor(c, dtype=torch.float64).view(1, 3, 1)  # (N=1, G=3, D=1)
    anchor = torch.tensor([[1.5]], requires_grad=True)
    loss, m = arcopo_loss(anchor, cand, torch.tensor(adv), cfg=cfg, old_anchor_pred=torch.tensor([[1.0]]))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert m["arcopo/ratio_max"] == pytest.approx(rho[2], rel=1e-6)
    assert m["arcopo/clip_fraction"] == pytest.approx(1 / 3 if eps > 0.5 else 2 / 3)


def test_gradient_flows_only_through_anchor():
    cand = rand(6, 4, 8, seed=2).requires_grad_(True)
    old = rand(6, 8, seed=3).requires_grad_(True)
    adv = torch.tensor([1.0, -0.5, 0.25, -0.75], requires_grad=True)
    anchor = (old.detach() + 0.01 * rand(6, 8, seed=4)).requires_grad_(True)
    loss, _ = arcopo_loss(anchor, cand, adv, cfg=ArCoPOConfig(clip_eps=0.5), old_anchor_pred=old)
    loss.backward()
    assert anchor.grad is not None and anchor.grad.abs().sum() > 0
    assert cand.grad is None and old.grad is None and adv.grad is None


def test_clipping_engages_outside_band():
    eps = 1e-4
    rho = torch.tensor([1 + 2 * eps, 1 + eps / 2, 1 - 2 * eps, 1 - 2 * eps, 1 + 2 * eps], dtype=torch.float64,
                       requires_grad=True)
    adv = torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0], dtype=torch.float64)
    clipped_surrogate(rho, adv, eps).sum().backward()
    # A>0 above the band and A<0 below it: clipped, no gradient; inside the band, or on the pessimistic side: A
    assert rho.grad.tolist() == [0.0, 1.0, 1.0, 0.0, -1.0]
    # through the loss: an anchor far from the old one has every ratio outside [1 - eps, 1 + eps]
    cand = rand(2, 3, 5, seed=5)
    old = cand[:, 0]
    anchor = (old + 0.3).requires_grad_(True)
    _, m = arcopo_loss(anchor, cand, torch.tensor([1.0, 0.0, -1.0]), cfg=CFG, old_anchor_pred=old)
    assert m["arcopo/clip_fraction"] == 1.0
    assert m["arcopo/ratio_max"] > 1 + eps or m["arcopo/ratio_min"] < 1 - eps


def test_advantage_sign_flip_flips_gradient_and_positive_advantage_pulls_anchor():
    cand = rand(1, 3, 6, seed=6)  # (N=1, G=3, D=6)
    old = cand[:, 0].clone()
    adv = torch.tensor([-1.0, 2.0, -1.0])

    def grad(a):
        anchor = old.clone().requires_grad_(True)
        arcopo_loss(anchor, cand, a, cfg=CFG, old_anchor_pred=old)[0].backward()
        return anchor.grad

    g_pos, g_neg = grad(adv), grad(-adv)
    assert g_pos.abs().sum() > 0 and torch.allclose(g_pos, -g_neg, atol=1e-12)
    # gradient descent with A favouring candidate 1 moves the anchor towards candidate 1
    before = ((old - cand[:, 1]) ** 2).sum()
    after = ((old - 1e-2 * g_pos - cand[:, 1]) ** 2).sum()
    assert after < before


def test_entropy_metrics_and_temperature():
    cand = rand(3, 5, 10, seed=7)
    old = cand[:, 2]
    _, cold = arcopo_loss(old.clone(), cand, torch.zeros(5), cfg=ArCoPOConfig(tau=1e-3), old_anchor_pred=old)
    _, hot = arcopo_loss(old.clone(), cand, torch.zeros(5), cfg=ArCoPOConfig(tau=1e3), old_anchor_pred=old)
    assert cold["arcopo/entropy_old"] < 1e-6  # one-hot on the anchor's own branch
    assert hot["arcopo/entropy_old"] == pytest.approx(math.log(5), abs=1e-3)  # uniform over G


def test_std_advantages():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    a = arcopo_advantages(r, "std", eps=0.0)
    c = [1 - 3, 2 - 3, 3 - 3, 6 - 3]
    std = math.sqrt(sum(x * x for x in c) / 4)
    assert a[0].tolist() == pytest.approx([x / std for x in c], rel=1e-12)
    assert a[1].tolist() == [0.0] * 4  # no contrast, no signal
    assert torch.allclose(arcopo_advantages(3 * r + 7, "std", eps=0.0), a)  # affine invariant
    with pytest.raises(ValueError, match="NaN"):
        arcopo_advantages(torch.tensor([1.0, float("nan")]))


def test_quasi_norm_advantages():
    r = torch.tensor([[1.0, 2.0, 3.0, 6.0], [4.0, 0.0, 0.0, 0.0], [1.0, -1.0, 1.0, -1.0]])
    std = arcopo_advantages(r, "std", eps=0.0)
    assert torch.allclose(arcopo_advantages(r, "quasi", p=2.0), std, atol=1e-12)  # p = 2 is std normalisation
    q = arcopo_advantages(r, "quasi", p=0.8)
    assert torch.equal(torch.sign(q), torch.sign(std))  # same ordering and signs, only rescaled per group
    damp = (q / std)[:, 0]  # per-group scale factor
    # a flat group (all deviations equal in size) is damped more than a one-outlier group: ratio G^(1/2 - 1/p)
    assert damp[2] == pytest.approx(4 ** (0.5 - 1 / 0.8), rel=1e-9)
    assert damp[2] < damp[1] < 1.0
    # by hand for the outlier group: c = (3, -1, -1, -1), ||c||_0.8 = (3^0.8 + 3)^(1/0.8)
    assert q[1, 0].item() == pytest.approx(2 * 3 / (3**0.8 + 3) ** 1.25, rel=1e-9)
    assert arcopo_advantages(torch.ones(4), "quasi").tolist() == [0.0] * 4


def test_choose_anchors():
    a = choose_anchors(12, 4, torch.Generator().manual_seed(0))
    assert len(set(a)) == 4 and all(0 <= i < 12 for i in a)
    assert a == choose_anchors(12, 4, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="arcopo.anchors"):
        choose_anchors(3, 4, torch.Generator())


def test_config_section_and_validation():
    cfg = load_config(None)
    assert cfg.rl.algorithm == "nft" and cfg.arcopo.sigma == 0.5 and cfg.arcopo.clip_eps == 1e-4
    cfg = load_config(None, ["rl.algorithm=arcopo", "rollout.group_size=12", "arcopo.advantage_norm=quasi"])
    assert cfg.rl.algorithm == "arcopo" and cfg.arcopo.advantage_norm == "quasi" and cfg.arcopo.anchors == 4
    with pytest.raises(ConfigError, match="rl.algorithm"):
        load_config(None, ["rl.algorithm=grpo"])
    with pytest.raises(ConfigError, match="arcopo.sigma"):
        load_config(None, ["arcopo.sigma=1.5"])
    with pytest.raises(ConfigError, match="arcopo.anchors"):
        load_config(None, ["rl.algorithm=arcopo", "rollout.group_size=3"])
    with pytest.raises(ConfigError, match="rl.selective_kl: null"):  # AR-CoPO has no KL term to make selective
        load_config("configs/tiny.yaml", ["rl.algorithm=arcopo", "arcopo.anchors=2"])
    with pytest.raises(ConfigError, match="parallel.strategy"):  # replicated adapters: DDP, not FSDP shards
        load_config("configs/tiny-arcopo.yaml", ["parallel.strategy=fsdp"])


def test_step_sizes_weight_every_group_equally_and_its_steps_evenly():
    from astrolabe.rl.accumulation import sample_weights
    from astrolabe.rl.arcopo_update import step_sizes

    assert step_sizes([4, 4]) == [1] * 8
    sizes = step_sizes([1, 4])  # a first-block pivot with one step next to a four-step group
    w = sample_weights(sizes, sum(sizes))
    assert sizes == [4, 1, 1, 1, 1] and w[0] == 0.5 and w[1:] == [0.125] * 4  # = 1 / (S_i * groups)
