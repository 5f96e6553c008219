"""Krea's served sampling loop (kv_cache = "recompute", models-reference 5.7) on the tiny DiT and VAE."""

import dataclasses
import json

import pytest
import torch
from typer.testing import CliRunner

from astrolabe.models.wan.attention import CausalWindow
from astrolabe.models.wan.config import tiny
from astrolabe.models.wan.dit import WanDiT
from astrolabe.models.wan.rope import rope_apply, rope_frequencies
from astrolabe.models.wan.vae import StreamingDecoder, WanVAE, tiny_vae
from astrolabe.sampling.recompute import VaeFirstFrameReencoder, keeps_first_latent
from astrolabe.sampling.schedule import FlowSchedule, StepSchedule
from astrolabe.sampling.streaming import BlockStreamer, SampleNoise, StreamConfig, rebuild_context

DT = torch.float64
F, K = 3, 3


def make_model(seed=0):
    m = WanDiT(tiny())
    m.init_weights(torch.Generator().manual_seed(seed))
    return m.to(DT).eval()


def recompute_stream(window=6):
    steps = StepSchedule.from_steps(FlowSchedule(5.0), [1000, 937, 833, 625], warp=False)
    return StreamConfig(CausalWindow(F, window, 0), steps, 16, 4, 4, kv_cache="recompute")


def text(seed=3):
    return torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(seed), dtype=DT)


class SpyReencoder:
    """A FirstFrameReencoder returning a distinct known latent per call, recording what it was asked."""

    def __init__(self):
        self.calls, self.outputs = [], []

    def __call__(self, num_latent_frames):
        z = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(100 + num_latent_frames))
        self.calls.append(num_latent_frames)
        self.outputs.append(z)
        return z


def spy_forwards(model):
    """Record every DiT forward: its input, timesteps, positions, cache state and whether it wrote."""
    calls, inner = [], model.forward

    def forward(x, t, context, **kw):
        cache = kw.get("kv_cache")
        start = kw.get("start_frame", 0)
        calls.append(dict(x=x.clone(), t=t.clone(), positions=list(range(start, start + x.shape[1])),
                          write=kw.get("cache_write", False), cached=list(cache.positions) if cache else []))
        return inner(x, t, context, **kw)

    model.forward = forward
    return calls


def kv_by_hand(model, latents, context):
    """Keys/values of ``latents`` from a plain (non-cached) block-causal forward at t = 0, RoPE positions
    0..n-1: per layer, the self-attention input captured by a hook and projected by hand."""
    inputs = []
    hooks = [b.self_attn.register_forward_pre_hook(lambda mod, args: inputs.append(args[0])) for b in model.blocks]
    try:
        model(latents, torch.zeros(1, dtype=DT), context, causal=CausalWindow(F))
    finally:
        for h in hooks:
            h.remove()
    freqs = rope_frequencies(model._rope, list(range(latents.shape[1])), (2, 2))
    out = []
    for blk, x in zip(model.blocks, inputs):
        a = blk.self_attn
        b, n = x.shape[0], a.num_heads
        k = rope_apply(a.norm_k(a.k(x)).view(b, x.shape[1], n, -1), freqs)
        out.append((k, a.v(x).view(b, x.shape[1], n, -1)))
    return out


def run(model, blocks, reencoder, seed=4):
    s = BlockStreamer(model, recompute_stream(), text(), SampleNoise([seed]), reencoder=reencoder)
    return s, [s.step() for _ in range(blocks)]


def test_each_block_recomputes_the_context_cache_as_a_fresh_t0_forward_and_denoises_at_3_to_5():
    m = make_model()
    calls = spy_forwards(m)
    spy = SpyReencoder()
    s = BlockStreamer(m, recompute_stream(), text(), SampleNoise([4]), reencoder=spy)
    blocks = []
    for b in range(5):
        n_before = len(calls)
        blocks.append(s.step())
        mine = calls[n_before:]
        if b == 0:  # no context: 4 denoising forwards at positions 0..2 on an empty cache, nothing written
            assert [c["positions"] for c in mine] == [[0, 1, 2]] * 4 and all(not c["write"] and not c["cached"] for c in mine)
            continue
        recompute, denoise = mine[0], mine[1:]
        # (1) the context latents: first latent (re-encoded once it left the window) + the newest 2
        first = blocks[0][:, 0] if b == 1 else spy.outputs[-1]
        expected = torch.stack([first, blocks[-2][:, 1], blocks[-2][:, 2]], dim=1)
        assert torch.equal(recompute["x"], expected)
        # (2) one write at t = 0, positions 0..2, into a zeroed cache
        assert recompute["write"] and recompute["cached"] == [] and recompute["positions"] == [0, 1, 2]
        assert torch.all(recompute["t"] == 0)
        # (3) the new block: 4 read-only forwards at positions 3..5 against the 3 context frames
        assert [c["positions"] for c in denoise] == [[3, 4, 5]] * 4
        assert all(not c["write"] and c["cached"] == [0, 1, 2] for c in denoise)
        # the cache after the block holds exactly the K/V of a fresh t=0 forward over the context
        assert s.cache.positions == [0, 1, 2]
        for (k, v), layer in zip(kv_by_hand(m, expected, text()), s.cache.self_kv):
            assert torch.allclose(layer.k, k, atol=1e-12) and torch.allclose(layer.v, v, atol=1e-12)
        # and the block's first prediction equals a plain block-causal forward over [context @ t=0, block @ t]
        x = denoise[0]["x"]
        t = torch.tensor([[0.0] * 3 + [float(denoise[0]["t"][0])] * 3], dtype=DT)
        with torch.no_grad():
            full = m(torch.cat([expected, x], dim=1), t, text(), causal=CausalWindow(F))[:, 3:]
            cached = m(x, denoise[0]["t"], text(), kv_cache=s.cache, start_frame=3)
        assert torch.allclose(full, cached, atol=1e-10)


def test_first_frame_is_replaced_exactly_when_it_leaves_the_window():
    spy = SpyReencoder()
    _, blocks = run(make_model(), 10, spy)
    assert spy.calls == [3 * b for b in range(2, 10)]  # blocks 2..9; block 1 still uses the real first frame
    assert len(blocks) == 10


def test_keeps_first_latent_follows_krea_rule():
    # get_clean_context_frames: keep while (block_idx - 1) * f < K
    assert [keeps_first_latent(3 * b, 3, 3) for b in range(1, 5)] == [True, False, False, False]
    assert [keeps_first_latent(b, 1, 3) for b in range(1, 7)] == [True, True, True, False, False, False]


def test_unbounded_length_with_a_six_frame_buffer():
    m = make_model()
    calls = spy_forwards(m)
    s, blocks = run(m, 10, SpyReencoder())
    assert s.next_frame == 30 and s.cache.causal.window_frames == 6
    assert max(p for c in calls for p in c["positions"]) == 5  # window-relative: never beyond slot 5
    assert all(torch.isfinite(b).all() for b in blocks)


def test_vae_reencoder_encodes_the_oldest_of_the_last_nine_decoded_frames():
    torch.manual_seed(0)
    vae = WanVAE(tiny_vae()).to(DT).eval()
    re = VaeFirstFrameReencoder(vae)
    ref = StreamingDecoder(vae)
    g = torch.Generator().manual_seed(1)
    zs = [torch.randn(1, 16, 3, 4, 4, generator=g, dtype=DT) for _ in range(3)]
    with pytest.raises(RuntimeError, match="decode every clean block"):
        re(0)
    pixels = []
    for z in zs:
        out = re.decode_block(z)
        pixels.append(ref.decode_block(z))
        assert torch.equal(out, pixels[-1])  # it is the video's streaming decoder
    with pytest.raises(RuntimeError, match="decode every clean block"):
        re(6)  # the sampler is ahead of the decoder
    video = torch.cat(pixels, dim=2)  # (1, 3, 9 + 12 + 12, H, W)
    oldest = video[:, :, -9:][:, :, :1]
    torch.testing.assert_close(re(9), vae.encode(oldest)[:, :, 0], rtol=0, atol=0)


def test_streamer_with_the_vae_reencoder_uses_the_right_decoded_frame():
    torch.manual_seed(0)
    vae = WanVAE(tiny_vae()).to(DT).eval()
    m = make_model()
    calls = spy_forwards(m)
    re = VaeFirstFrameReencoder(vae)
    s = BlockStreamer(m, recompute_stream(), text(), SampleNoise([2]), reencoder=re)
    pixels = []
    for _ in range(4):
        pixels.append(re.decode_block(s.step().permute(0, 2, 1, 3, 4)))
    video = torch.cat(pixels, dim=2)  # 9 + 12 + 12 + 12 frames
    recomputes = [c for c in calls if c["write"]]
    # block 3 recomputed from the encode of pixel frame 33 - 9 = 24 (blocks 0..2 decoded: 33 frames)
    first = vae.encode(video[:, :, 24:25])[:, :, 0].float()  # cast to the latents' dtype as the sampler does
    assert torch.equal(recomputes[-1]["x"][:, 0], first)


def test_recompute_refuses_branching_rebuild_and_bad_configs():
    m = make_model()
    s, blocks = run(m, 1, SpyReencoder())
    with pytest.raises(ValueError, match="branching"):
        s.fork(2, [[1, 2]])
    with pytest.raises(ValueError, match="context_pass"):
        rebuild_context(m, recompute_stream(), text(), blocks[0])
    with pytest.raises(ValueError, match="window of at least 6"):
        recompute_stream(window=5)
    with pytest.raises(ValueError, match="rope"):
        dataclasses.replace(recompute_stream(), rope="cache_relative")
    with pytest.raises(RuntimeError, match="FirstFrameReencoder"):
        run(m, 3, None)


def test_hard_cut_restarts_the_loop_soft_switch_keeps_it():
    m = make_model()
    calls = spy_forwards(m)
    s, _ = run(m, 3, SpyReencoder())
    s.switch_prompt(text(7), hard=False)
    n = len(calls)
    s.step()
    assert calls[n]["write"] and calls[n + 1]["positions"] == [3, 4, 5]
    s.switch_prompt(text(8), hard=True)
    n = len(calls)
    s.step()  # a new video: no context, positions 0..2
    assert not calls[n]["write"] and calls[n]["positions"] == [0, 1, 2] and calls[n]["cached"] == []


def test_cli_generate_recompute_on_the_tiny_model(tmp_path):
    from astrolabe.data.video import decode_mp4
    from flows.cli import app

    runner = CliRunner()
    args = ["generate", "--prompt", "a red ball", "--num-frames", "49", "--set", "sampling.kv_cache=recompute"]
    res = runner.invoke(app, [*args, "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert decode_mp4(tmp_path / "a/0000.mp4").shape == (49, 64, 64, 3)  # 5 blocks: the re-encode runs at 2..4
    assert json.loads((tmp_path / "a/0000.json").read_text())["config"]["sampling"]["kv_cache"] == "recompute"
    res = runner.invoke(app, ["generate", "--prompt", "a red ball", "--num-frames", "49", "-o", str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "a/0000.mp4").read_bytes() != (tmp_path / "b/0000.mp4").read_bytes()
    # the served card is sampled (no refusal); at 14B it only needs its files
    res = runner.invoke(app, ["generate", "--prompt", "a", "--set", "model.base=krea_served", "-o", str(tmp_path)])
    assert res.exit_code == 2 and "checkpoint_dir" in res.output and "recompute" not in res.output
