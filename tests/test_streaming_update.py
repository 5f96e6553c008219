import contextlib
import copy

import pytest
import torch

from astrolabe.models.wan.attention import CausalWindow
from astrolabe.models.wan.config import tiny
from astrolabe.models.wan.dit import WanDiT
from astrolabe.parallel import ParallelConfig, parallelize
from astrolabe.rl.nft import NFTConfig, nft_loss
from astrolabe.rl.streaming_update import (
    StreamingUpdateConfig,
    WindowBatch,
    build_prefix_cache,
    clip_causal_window,
    clip_predictions,
    draw_training_noise,
    window_nft_loss,
    window_nft_step,
    window_predictions,
)
from astrolabe.sampling.schedule import FlowSchedule, StepSchedule
from astrolabe.sampling.streaming import StreamConfig

DT = torch.float64
NFT = NFTConfig(kl_weight=0.5)


def make_model(seed=0):
    m = WanDiT(tiny())
    m.init_weights(torch.Generator().manual_seed(seed))
    return m.to(DT)


def perturbed(model, seed):
    """A copy that differs only where no key/value of any frame depends on it: the head and the last FFN.
    So every policy's prefix cache is identical and the full-forward reference is exact."""
    m = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in list(m.head.parameters()) + list(m.blocks[-1].ffn.parameters()):
            p.add_(0.05 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m.requires_grad_(False)


def make_stream(window=None, sink=0, block=3):
    steps = StepSchedule.from_steps(FlowSchedule(5.0), [1000, 750, 500, 250])
    return StreamConfig(CausalWindow(block, window, sink), steps, 16, 4, 4)


def make_batch(b=2, p=9, w=6, seed=1, prefix_grad=False):
    g = torch.Generator().manual_seed(seed)
    prefix = torch.randn(b, p, 16, 4, 4, generator=g, dtype=DT).requires_grad_(prefix_grad)
    return WindowBatch(
        context=torch.randn(b, 4, 32, generator=g, dtype=DT),
        prefix_latents=prefix,
        window_x0=torch.randn(b, w, 16, 4, 4, generator=g, dtype=DT),
        r=torch.tensor([0.9, 0.2][:b], dtype=DT),
        kl_mask=torch.tensor([True, False][:b]),
    )


def gens(seed=0):
    return torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 100)


def full_forward_x0(model, stream, batch, x_t, sigma):
    """Independent reference: non-cached block-causal forward over [prefix at t=0, window at t]."""
    p = batch.window_start
    x = torch.cat([batch.prefix_latents.detach(), x_t], dim=1)
    b, f = x.shape[:2]
    t = torch.zeros(b, f, dtype=DT)
    t[:, p:] = (sigma * 1000)[:, None]
    v = model(x, t, batch.context, causal=stream.causal)[:, p:]
    return x_t - sigma.view(-1, 1, 1, 1, 1) * v


@pytest.mark.parametrize("window,sink", [(None, 0), (6, 3)])
def test_window_loss_equals_full_block_causal_forward(window, sink):
    stream = make_stream(window, sink)
    cur = make_model()
    old, ref = perturbed(cur, 1), perturbed(cur, 2)
    batch = make_batch()
    sig_g, eps_g = gens()
    loss, metrics = window_nft_step(
        {"default": contextlib.nullcontext, "old": old, "ref": ref}, cur, stream, batch, NFT, sig_g, eps_g, backward=False
    )
    sigma, eps = draw_training_noise(batch.window_x0, stream, NFT, *gens())
    x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * batch.window_x0 + sigma.view(-1, 1, 1, 1, 1) * eps
    f, o, g = (full_forward_x0(m, stream, batch, x_t, sigma) for m in (cur, old, ref))
    assert not torch.allclose(f, o) and not torch.allclose(f, g)
    want, _ = nft_loss(f, o, batch.window_x0, batch.r, sigma, x_t, cfg=NFT, kl_ref=g, kl_mask=batch.kl_mask)
    assert metrics["loss/kl"] > 0
    assert abs(float(loss) - float(want)) < 1e-10 * max(1.0, abs(float(want)))


@pytest.mark.parametrize("window,sink", [(None, 0), (6, 3)])
def test_window_predictions_match_reference_per_frame(window, sink):
    stream, m = make_stream(window, sink), make_model()
    batch = make_batch(p=12, w=9)
    sigma = torch.tensor([0.9375, 0.625], dtype=DT)
    x_t = torch.randn_like(batch.window_x0)
    with torch.no_grad():
        cache = build_prefix_cache(m, stream, batch.context, batch.prefix_latents)
        got = window_predictions(m, cache, x_t, sigma, batch.context, batch.window_start)
        want = full_forward_x0(m, stream, batch, x_t, sigma)
    assert torch.allclose(got, want, atol=1e-10)


def test_no_gradient_reaches_prefix():
    stream, m = make_stream(6, 3), make_model()
    batch = make_batch(prefix_grad=True)
    fired = []
    batch.prefix_latents.register_hook(lambda grad: fired.append(grad))
    cache = build_prefix_cache(m, stream, batch.context, batch.prefix_latents)
    for kv in cache.self_kv:
        for t in (kv.k, kv.v):
            assert t.grad_fn is None and not t.requires_grad
    for kv in cache.cross_kv:
        assert all(t.grad_fn is None and not t.requires_grad for t in kv)
    sigma, eps = draw_training_noise(batch.window_x0, stream, NFT, *gens())
    same = {"default": contextlib.nullcontext, "old": contextlib.nullcontext}
    loss, _ = window_nft_loss(same, m, cache, batch, sigma, eps, NFT)
    loss.backward()
    assert not fired and batch.prefix_latents.grad is None
    assert m.head.head.weight.grad is not None  # the window itself did get gradients
    # also through the full step (cache built inside)
    m.zero_grad()
    window_nft_step(same, m, stream, batch, NFT, *gens())
    assert not fired and batch.prefix_latents.grad is None


def test_cache_unchanged_by_window_forwards():
    stream, m = make_stream(6, 3), make_model()
    batch = make_batch()
    cache = build_prefix_cache(m, stream, batch.context, batch.prefix_latents)
    positions, origin = list(cache.positions), cache.origin
    kv_ids = [id(kv) for kv in cache.self_kv]
    snap = [(kv.k.clone(), kv.v.clone()) for kv in cache.self_kv]
    cross = [(k.clone(), v.clone()) for k, v in cache.cross_kv]
    sigma, eps = draw_training_noise(batch.window_x0, stream, NFT, *gens())
    pol = {"default": contextlib.nullcontext, "old": perturbed(m, 1), "ref": perturbed(m, 2)}
    for _ in range(2):
        loss, _ = window_nft_loss(pol, m, cache, batch, sigma, eps, NFT)
        loss.backward()
    assert cache.positions == positions and cache.origin == origin and not cache._staged
    assert [id(kv) for kv in cache.self_kv] == kv_ids
    for kv, (k, v) in zip(cache.self_kv, snap):
        assert torch.equal(kv.k, k) and torch.equal(kv.v, v)
    for (k, v), (k0, v0) in zip(cache.cross_kv, cross):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _count_block_forwards(model):
    """A counter of DiT block forwards (every block, every call, recomputations in backward included; a pre-hook,
    as checkpoint's recomputation stops early, before the block's forward returns)."""
    calls = [0]
    for blk in model.blocks:
        blk.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("mode", ["window", "clip"])
def test_activation_checkpointing_engages_on_an_eval_model_with_same_gradients(mode):
    """The model comes in eval mode (as built for the rollout): with parallelize(activation_checkpointing) the
    update's backward re-runs every block of the trained policy's forward once; without it, none."""
    stream, m = make_stream(6, 3), make_model().eval()
    calls = _count_block_forwards(m)
    batch = make_batch()
    pol = {"default": contextlib.nullcontext, "old": perturbed(m, 1), "ref": perturbed(m, 2)}
    out, recomputed = [], []
    for ckpt in (False, True):
        assert parallelize(m, ParallelConfig(activation_checkpointing=ckpt)) is m
        m.zero_grad(set_to_none=True)
        calls[0] = 0
        loss, _ = window_nft_step(pol, m, stream, batch, NFT, *gens(), cfg=StreamingUpdateConfig(mode=mode),
                                  backward=False)
        forward_calls = calls[0]
        loss.backward()
        recomputed.append(calls[0] - forward_calls)
        out.append((float(loss), _grads(m)))
        assert not m.training  # the mode is restored after the update
    assert recomputed == [0, len(m.blocks)]
    (l0, g0), (l1, g1) = out
    assert l0 == pytest.approx(l1, abs=1e-12)
    assert g0.keys() == g1.keys() and "blocks.0.cross_attn.k.weight" in g0
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-12, rtol=1e-9), n


def test_trained_forward_in_train_mode_no_grad_forwards_in_eval():
    stream, m = make_stream(6, 3), make_model().eval()
    seen = []
    m.blocks[0].register_forward_pre_hook(lambda mod, _: seen.append((torch.is_grad_enabled(), mod.training)))
    window_nft_step({"default": contextlib.nullcontext, "old": contextlib.nullcontext}, m, stream, make_batch(), NFT,
                    *gens())
    assert (True, True) in seen and (False, False) in seen
    assert all(grad == training for grad, training in seen)  # no-grad passes in eval, the trained one in train


def test_context_manager_policies_equal_module_policies():
    """A context manager that swaps weights in place (as adapters do) gives the module-policy loss and grads."""
    stream, m = make_stream(6, 3), make_model()
    old = perturbed(m, 1)
    batch = make_batch()

    @contextlib.contextmanager
    def use_old():
        saved = {k: v.clone() for k, v in m.state_dict().items()}
        m.load_state_dict(old.state_dict())
        try:
            yield
        finally:
            m.load_state_dict(saved)

    res = []
    for pol in ({"default": contextlib.nullcontext, "old": old}, {"default": contextlib.nullcontext, "old": use_old}):
        m.zero_grad(set_to_none=True)
        loss, _ = window_nft_step(pol, m, stream, batch, NFT, *gens())
        res.append((float(loss), _grads(m)))
    assert res[0][0] == pytest.approx(res[1][0], abs=1e-12)
    for n in res[0][1]:
        assert torch.allclose(res[0][1][n], res[1][1][n], atol=1e-12), n


def test_grouped_cache_fork_equals_per_sample_cache():
    stream, m = make_stream(6, 3), make_model()
    batch = make_batch(b=2)
    prefix = batch.prefix_latents[:1].expand(2, -1, -1, -1, -1)
    context = batch.context[:1].expand(2, -1, -1)
    with torch.no_grad():
        a = build_prefix_cache(m, stream, context, prefix, group_size=2)
        b = build_prefix_cache(m, stream, context, prefix)
    assert a.positions == b.positions
    for x, y in zip(a.self_kv, b.self_kv):
        assert torch.allclose(x.k, y.k, atol=1e-12) and torch.allclose(x.v, y.v, atol=1e-12)
    with pytest.raises(ValueError, match="share prefix"):
        build_prefix_cache(m, stream, batch.context, batch.prefix_latents, group_size=2)


def test_clip_predictions_block_causal_not_frame_causal():
    stream, m = make_stream(), make_model()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, 6, 16, 4, 4, generator=g, dtype=DT)
    c = torch.randn(1, 4, 32, generator=g, dtype=DT)
    x2 = x.clone()
    x2[:, 1] += 1.0  # frame 1: same block as frame 0
    x3 = x.clone()
    x3[:, 3] += 1.0  # frame 3: next block
    causal = clip_causal_window(stream.causal)
    with torch.no_grad():
        base, same_blk, next_blk = (clip_predictions(m, causal, z, 0.625, c) for z in (x, x2, x3))
        frame_causal = clip_predictions(m, clip_causal_window(stream.causal, "release_frame_causal"), x2, 0.625, c)
        frame_base = clip_predictions(m, CausalWindow(1), x, 0.625, c)
    assert not torch.allclose(base[:, 0], same_blk[:, 0])  # full attention inside a 3-frame block
    assert torch.equal(base[:, :3], next_blk[:, :3])  # no attention to the future block
    assert torch.allclose(frame_causal[:, 0], frame_base[:, 0], atol=1e-12)  # the release bug: frame 0 blind to 1
    # whole clip from frame 0 == window prediction with an empty prefix cache
    empty = WindowBatch(c, x[:, :0], x, torch.tensor([0.5], dtype=DT))
    with torch.no_grad():
        cache = build_prefix_cache(m, stream, c, empty.prefix_latents)
        win = window_predictions(m, cache, x, 0.625, c, 0)
    assert torch.allclose(win, base, atol=1e-10)


def test_sigma_per_micro_batch_and_validation():
    stream = make_stream()
    batch = make_batch(b=2)
    sig, eps = draw_training_noise(batch.window_x0, stream, NFT, *gens(3))
    assert sig[0] == sig[1] and float(sig[0]) in [pytest.approx(s) for s in stream.steps.sigmas]
    sig2, eps2 = draw_training_noise(batch.window_x0, stream, NFT, *gens(3))
    assert torch.equal(eps, eps2) and torch.equal(sig, sig2)
    with pytest.raises(ValueError, match="lack"):
        window_nft_step({"default": contextlib.nullcontext}, make_model(), stream, batch, NFT, *gens())
    with pytest.raises(ValueError, match="r must be"):
        WindowBatch(batch.context, batch.prefix_latents, batch.window_x0, torch.ones(3, dtype=DT))


def test_shared_noise_repeats_one_draw_over_the_micro_batch():
    """noise_per="micro_batch": every row is the draw a single sample would get from the same generator state
    (so each sample's noise is still N(0, I)), and the generator advances by one sample's draw."""
    stream, x0 = make_stream(), torch.randn(3, 6, 16, 4, 4, generator=torch.Generator().manual_seed(4), dtype=DT)
    _, alone = draw_training_noise(x0[:1], stream, NFT, *gens(5))
    sig_g, eps_g = gens(5)
    _, shared = draw_training_noise(x0, stream, NFT, sig_g, eps_g, noise_per="micro_batch")
    assert all(torch.equal(shared[i], alone[0]) for i in range(3))
    _, per_sample = draw_training_noise(x0, stream, NFT, *gens(5))
    assert not torch.equal(per_sample[1], per_sample[0])
    _, after_one = gens(5)
    torch.randn(x0[:1].shape, generator=after_one, dtype=x0.dtype)
    assert torch.equal(eps_g.get_state(), after_one.get_state())
    with pytest.raises(ValueError, match="noise_per"):
        draw_training_noise(x0, stream, NFT, *gens(), noise_per="group")


def _group_gradients(noise_per: str, seeds: range) -> list[torch.Tensor]:
    """Gradients of one group's window NFT loss (4 near-identical candidates of one prompt, optimalities
    summing to 2, i.e. centred) for several independent noise draws."""
    stream, m = make_stream(), make_model()
    g = torch.Generator().manual_seed(3)
    base = torch.randn(1, 6, 16, 4, 4, generator=g, dtype=DT)
    batch = WindowBatch(
        context=torch.randn(1, 4, 32, generator=g, dtype=DT).expand(4, 4, 32),
        prefix_latents=torch.zeros(4, 0, 16, 4, 4, dtype=DT),
        window_x0=base + 0.05 * torch.randn(4, 6, 16, 4, 4, generator=g, dtype=DT),
        r=torch.tensor([0.9, 0.1, 0.8, 0.2], dtype=DT),
    )
    same = {"default": contextlib.nullcontext, "old": contextlib.nullcontext}
    out = []
    for seed in seeds:
        m.zero_grad()
        window_nft_step(same, m, stream, batch, NFTConfig(kl_weight=0.0), *gens(seed),
                        StreamingUpdateConfig(noise_per=noise_per), group_size=4)  # fmt: skip
        out.append(torch.cat([p.grad.flatten() for p in m.parameters() if p.grad is not None]))
    return out


def test_shared_noise_lowers_the_variance_of_a_group_gradient():
    """The module docstring's claim: with one (sigma, eps) per group the eps-driven part of the candidates'
    residuals cancels in the centred sum. The expected gradient is the same either way (each sample's noise
    has the same law), so E|g|^2 = |E g|^2 + Var g compares the variances: the shared draws' is far smaller."""

    def mean_square(grads: list[torch.Tensor]) -> float:
        return sum(float(g.square().sum()) for g in grads) / len(grads)

    shared, per_sample = mean_square(_group_gradients("micro_batch", range(4))), mean_square(_group_gradients("sample", range(4)))
    assert 0.0 < shared < 0.01 * per_sample, (shared, per_sample)
