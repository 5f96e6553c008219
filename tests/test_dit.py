import pytest
import torch

from astrolabe.models.wan.attention import CausalWindow, plan_attention
from astrolabe.models.wan.config import WanConfig, tiny, wan21_t2v_1_3b, wan21_t2v_14b
from astrolabe.models.wan.dit import WanDiT, sinusoidal_embedding
from astrolabe.models.wan.rope import rope_split


def make_model(dtype=torch.float64, seed=0):
    m = WanDiT(tiny())
    m.init_weights(torch.Generator().manual_seed(seed))
    return m.to(dtype).eval()


def test_param_counts_and_keys_match_wan():
    expected = {wan21_t2v_1_3b: (1_418_996_800, 825, 1536), wan21_t2v_14b: (14_288_491_584, 1095, 5120)}
    for builder, (params, keys, dim) in expected.items():
        with torch.device("meta"):
            m = WanDiT(builder())
        sd = m.state_dict()
        assert sum(p.numel() for p in m.parameters()) == params
        assert len(sd) == keys
        assert sd["patch_embedding.weight"].shape == (dim, 16, 1, 2, 2)
        assert sd["head.modulation"].shape == (1, 2, dim)
        assert sd["head.head.weight"].shape == (64, dim)
        assert sd["time_projection.1.weight"].shape == (6 * dim, dim)
        assert sd["blocks.0.modulation"].shape == (1, 6, dim)
        assert sd["blocks.0.norm3.weight"].shape == (dim,)
        assert sd["blocks.0.self_attn.norm_q.weight"].shape == (dim,)
        for suffix in ["text_embedding.0.weight", "text_embedding.2.bias", "time_embedding.0.weight"]:
            assert suffix in sd
        assert not any(k.endswith("freqs") or "norm1" in k or "norm2" in k for k in sd)


def test_rope_split_matches_wan():
    assert rope_split(128) == (22, 21, 21)


def test_sinusoid_cos_first():
    e = sinusoidal_embedding(4, torch.tensor([1.0]))
    # half = 2, w = [1, 10000^-0.5]
    w1 = 10000.0**-0.5
    ref = torch.tensor([[torch.cos(torch.tensor(1.0)), torch.cos(torch.tensor(w1)), torch.sin(torch.tensor(1.0)), torch.sin(torch.tensor(w1))]], dtype=torch.float64)
    assert torch.allclose(e, ref)


def test_forward_shapes_and_text_padding():
    m = make_model()
    x = torch.randn(2, 6, 16, 8, 8, dtype=torch.float64)
    ctx = torch.randn(2, 5, 32, dtype=torch.float64)
    y = m(x, torch.tensor([500.0, 250.0]), ctx)
    assert y.shape == x.shape
    # zero-padding the context to text_len explicitly gives the same output (no mask, rows attended)
    ctx_full = torch.cat([ctx, torch.zeros(2, 11, 32, dtype=torch.float64)], dim=1)
    assert torch.allclose(y, m(x, torch.tensor([500.0, 250.0]), ctx_full))


def test_block_causal_vs_bidirectional_differ_exactly_where_mask_says():
    m = make_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 9, 16, 4, 4, generator=g, dtype=torch.float64)
    ctx = torch.randn(1, 4, 32, generator=g, dtype=torch.float64)
    t = torch.tensor([700.0])
    x2 = x.clone()
    x2[:, 4] += 1.0  # perturb a frame of block 1 (frames 3..5)
    causal = CausalWindow(block_frames=3)
    yc, yc2 = m(x, t, ctx, causal=causal), m(x2, t, ctx, causal=causal)
    diff = (yc - yc2).abs().amax(dim=(0, 2, 3, 4))
    assert torch.all(diff[:3] == 0)  # block 0 cannot see block 1
    assert torch.all(diff[3:] > 0)  # blocks 1 and 2 can (block 1 bidirectionally inside)
    yb, yb2 = m(x, t, ctx), m(x2, t, ctx)
    assert torch.all((yb - yb2).abs().amax(dim=(0, 2, 3, 4)) > 0)
    # frame-causal (block size 1) is NOT what block-causal means: frame 3 sees frame 4 only with blocks of 3
    yf, yf2 = m(x, t, ctx, causal=CausalWindow(1)), m(x2, t, ctx, causal=CausalWindow(1))
    assert (yf - yf2)[:, 3].abs().max() == 0 and (yc - yc2)[:, 3].abs().max() > 0


def test_per_frame_timesteps_honoured():
    m = make_model()
    x = torch.randn(1, 6, 16, 4, 4, dtype=torch.float64)
    ctx = torch.randn(1, 4, 32, dtype=torch.float64)
    causal = CausalWindow(3)
    t_a = torch.tensor([[0.0, 0.0, 0.0, 500.0, 500.0, 500.0]])
    t_b = torch.tensor([[0.0, 0.0, 0.0, 900.0, 900.0, 900.0]])
    ya, yb = m(x, t_a, ctx, causal=causal), m(x, t_b, ctx, causal=causal)
    assert torch.allclose(ya[:, :3], yb[:, :3])
    assert not torch.allclose(ya[:, 3:], yb[:, 3:])
    # a (B,) timestep equals the same value per frame
    assert torch.allclose(m(x, torch.tensor([500.0]), ctx), m(x, torch.full((1, 6), 500.0), ctx))


def test_window_plan_sink_and_rolling_part():
    causal = CausalWindow(block_frames=3, window_frames=12, sink_frames=3)
    plan = plan_attention(list(range(30)), 3, causal, origin=0)  # last block = frames 27..29
    (blk,) = plan
    assert blk.keys == (0, 1, 2, 21, 22, 23, 24, 25, 26, 27, 28, 29)


def test_bad_inputs():
    m = make_model()
    with pytest.raises(ValueError, match="latents must be"):
        m(torch.randn(1, 3, 4, 4, 4, dtype=torch.float64), torch.tensor([1.0]), torch.randn(1, 2, 32))
    with pytest.raises(ValueError, match="text context"):
        m(torch.randn(1, 3, 16, 4, 4, dtype=torch.float64), torch.tensor([1.0]), torch.randn(1, 2, 7))
    with pytest.raises(ValueError, match="RoPE"):
        m(torch.randn(1, 3, 16, 4, 4, dtype=torch.float64), torch.tensor([1.0]), torch.randn(1, 2, 32), start_frame=1023)
    with pytest.raises(ValueError, match="divisible"):
        WanConfig(dim=65, num_heads=2)


def test_gradient_checkpointing_same_grads():
    torch.manual_seed(0)
    m = make_model()
    m.train()
    x = torch.randn(1, 3, 16, 4, 4, dtype=torch.float64)
    ctx = torch.randn(1, 4, 32, dtype=torch.float64)
    m(x, torch.tensor([300.0]), ctx).square().mean().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.gradient_checkpointing = True
    m(x, torch.tensor([300.0]), ctx).square().mean().backward()
    for a, p in zip(g1, m.parameters()):
        assert torch.allclose(a, p.grad)


def test_learned_positions_are_absolute_per_block_slot_and_token():
    """``learned_positions`` (the tiny world's, not Wan's): rows by (frame slot in its block, first block or not,
    token); absent from Wan's configs; a wrong latent size is an error."""
    assert not any("pos_embedding" in k for k in WanDiT(tiny()).state_dict())
    cfg = WanConfig(dim=64, ffn_dim=128, freq_dim=32, text_dim=32, text_len=16, num_heads=2, num_layers=2,
                    learned_positions=(2, 4))
    dit = WanDiT(cfg)
    dit.init_weights(torch.Generator().manual_seed(0))
    assert dit.pos_embedding.shape == (4, 4, 64) and float(dit.pos_embedding.detach().std()) > 0.5
    rows = dit._learned_positions([0, 1, 2, 3, 4, 5], 4).view(6, 4, 64)
    for frame, row in zip(range(6), [0, 1, 2, 3, 2, 3], strict=True):  # blocks of 2: later blocks share rows 2, 3
        assert torch.equal(rows[frame], dit.pos_embedding[row])
    x, ctx = torch.randn(1, 2, 16, 4, 4), torch.randn(1, 5, 32)
    with torch.no_grad():
        first = dit(x, torch.tensor([500.0]), ctx, causal=CausalWindow(2), start_frame=0)
        later = dit(x, torch.tensor([500.0]), ctx, causal=CausalWindow(2), start_frame=2)
        again = dit(x, torch.tensor([500.0]), ctx, causal=CausalWindow(2), start_frame=4)
    assert not torch.allclose(first, later)  # the first block is told apart (RoPE alone is relative)
    torch.testing.assert_close(later, again)  # later blocks look alike: long videos stay in distribution
    with pytest.raises(ValueError, match="learned_positions holds 4 tokens per frame"):
        dit(torch.randn(1, 2, 16, 8, 8), torch.tensor([500.0]), ctx)
    with pytest.raises(ValueError, match="learned_positions"):
        WanConfig(learned_positions=(0, 4))
