import pytest
import torch

from astrolabe.models.wan.attention import CausalWindow
from astrolabe.models.wan.config import tiny
from astrolabe.models.wan.dit import WanDiT
from astrolabe.sampling.schedule import FlowSchedule, StepSchedule
from astrolabe.sampling.streaming import (
    BlockStreamer,
    SampleNoise,
    StreamConfig,
    make_cache,
    rebuild_context,
    write_context,
)

DT = torch.float64


def make_model(seed=0):
    m = WanDiT(tiny())
    m.init_weights(torch.Generator().manual_seed(seed))
    return m.to(DT).eval()


def make_stream(window=None, sink=0, block=3):
    steps = StepSchedule.from_steps(FlowSchedule(5.0), [1000, 750, 500, 250])
    return StreamConfig(CausalWindow(block, window, sink), steps, 16, 4, 4)


def ctx(b=1, seed=3):
    return torch.randn(b, 4, 32, generator=torch.Generator().manual_seed(seed), dtype=DT)


@pytest.mark.parametrize("window,sink", [(None, 0), (6, 3), (9, 3)])
def test_cached_forward_equals_noncached_block_causal(window, sink):
    """Teacher-forced check: the cached streaming forward of block b equals the non-cached block-causal
    forward over [clean blocks 0..b-1 at t=0, noisy block b at t] restricted to block b."""
    m, stream = make_model(), make_stream(window, sink)
    g = torch.Generator().manual_seed(5)
    n_blocks = 5
    clean = torch.randn(1, 3 * n_blocks, 16, 4, 4, generator=g, dtype=DT)
    noisy = torch.randn(1, 3 * n_blocks, 16, 4, 4, generator=g, dtype=DT)
    c = ctx()
    cache = make_cache(m, stream)
    for b in range(n_blocks):
        sl = slice(3 * b, 3 * b + 3)
        v_cached = m(noisy[:, sl], torch.tensor([625.0]), c, kv_cache=cache, start_frame=3 * b)
        x = torch.cat([clean[:, : 3 * b], noisy[:, sl]], dim=1)
        t = torch.cat([torch.zeros(1, 3 * b), torch.full((1, 3), 625.0)], dim=1)
        v_full = m(x, t, c, causal=stream.causal)[:, sl]
        assert torch.allclose(v_cached, v_full, atol=1e-10), b
        write_context(m, cache, c, clean[:, sl], stream, start_frame=3 * b)
        if window is not None:
            assert cache.num_frames <= window


def test_window_bounds_cache_and_sink_always_attended():
    m, stream = make_model(), make_stream(window=6, sink=3)
    streamer = BlockStreamer(m, stream, ctx(), SampleNoise([7]))
    for _ in range(6):
        streamer.step()
        assert streamer.cache.num_frames <= 6
    assert streamer.cache.positions[:3] == [0, 1, 2]  # sink kept
    assert streamer.cache.positions[3:] == [15, 16, 17]
    # perturbing cached K/V of a sink frame changes the next block; frames outside the window are gone
    x = torch.randn(1, 3, 16, 4, 4, dtype=DT)
    base = m(x, torch.tensor([500.0]), streamer.context, kv_cache=streamer.cache, start_frame=18)
    for layer in streamer.cache.self_kv:
        layer.k[:, :16] += 1.0  # frame 0 (sink) occupies the first 16 tokens
    changed = m(x, torch.tensor([500.0]), streamer.context, kv_cache=streamer.cache, start_frame=18)
    assert not torch.allclose(base, changed)


def test_frames_outside_window_not_attended():
    m, stream = make_model(), make_stream(window=6, sink=3)
    g = torch.Generator().manual_seed(2)
    clean = torch.randn(1, 12, 16, 4, 4, generator=g, dtype=DT)
    x = torch.randn(1, 3, 16, 4, 4, generator=g, dtype=DT)
    outs = []
    for delta in (0.0, 5.0):
        c2 = clean.clone()
        c2[:, 4] += delta  # frame 4: neither sink (0..2) nor in the window of the block 12..14 (sees 9..11)
        cache = make_cache(m, stream)
        for b in range(4):
            write_context(m, cache, ctx(), c2[:, 3 * b : 3 * b + 3], stream, start_frame=3 * b)
        outs.append(m(x, torch.tensor([500.0]), ctx(), kv_cache=cache, start_frame=12))
    assert torch.equal(outs[0], outs[1])


def test_same_seed_same_video_and_batch_invariance():
    m, stream = make_model(), make_stream()
    c = ctx(2)
    a = torch.cat([BlockStreamer(m, stream, c, SampleNoise([1, 2])).step() for _ in range(1)], dim=1)
    s1 = BlockStreamer(m, stream, c, SampleNoise([1, 2]))
    b = torch.cat([s1.step(), s1.step()], dim=1)
    s2 = BlockStreamer(m, stream, c, SampleNoise([1, 2]))
    b2 = torch.cat([s2.step(), s2.step()], dim=1)
    assert torch.equal(b, b2)
    assert torch.equal(a, b[:, :3])
    assert not torch.allclose(b[0], b[1])
    # sample 1 alone equals sample 1 in the batch: a video depends only on its seed
    s3 = BlockStreamer(m, stream, c[1:], SampleNoise([2]))
    alone = torch.cat([s3.step(), s3.step()], dim=1)
    assert torch.allclose(alone[0], b[1], atol=1e-10)


def test_forked_candidate_equals_separate_run():
    m, stream = make_model(), make_stream(window=6, sink=3)
    c = ctx(1)
    prefix = BlockStreamer(m, stream, c, SampleNoise([11]))
    p = torch.cat([prefix.step(), prefix.step()], dim=1)
    group = prefix.fork(3, [[100, 101, 102]])
    cand = torch.cat([group.step(), group.step()], dim=1)  # (3, 6, ...)
    assert not torch.allclose(cand[0], cand[1])
    for i, seed in enumerate([100, 101, 102]):
        solo = BlockStreamer(m, stream, c, SampleNoise([11]))
        p2 = torch.cat([solo.step(), solo.step()], dim=1)
        assert torch.equal(p, p2)
        solo.noise = SampleNoise([seed])
        x = torch.cat([solo.step(), solo.step()], dim=1)
        assert torch.allclose(x[0], cand[i], atol=1e-10)


def test_rebuild_context_matches_sampler_cache():
    m, stream = make_model(), make_stream(window=6, sink=3)
    s = BlockStreamer(m, stream, ctx(), SampleNoise([4]))
    prefix = torch.cat([s.step() for _ in range(4)], dim=1)
    rebuilt = rebuild_context(m, stream, ctx(), prefix)
    assert rebuilt.positions == s.cache.positions
    for a, b in zip(rebuilt.self_kv, s.cache.self_kv):
        assert torch.allclose(a.k, b.k, atol=1e-12) and torch.allclose(a.v, b.v, atol=1e-12)


def test_soft_switch_differs_from_hard_cut():
    m, stream = make_model(), make_stream(window=9, sink=3)
    soft = BlockStreamer(m, stream, ctx(seed=1), SampleNoise([3]))
    for _ in range(3):
        soft.step()
    hard = BlockStreamer(m, stream, ctx(seed=1), SampleNoise([3]))
    for _ in range(3):
        hard.step()
    soft.switch_prompt(ctx(seed=2), hard=False)
    hard.switch_prompt(ctx(seed=2), hard=True)
    assert soft.cache.positions == list(range(9)) and hard.cache.num_frames == 0
    assert not torch.allclose(soft.step(), hard.step())


def test_global_cache_capacity_error():
    m = make_model()
    stream = StreamConfig(CausalWindow(3), make_stream().steps, 16, 4, 4, max_cache_frames=6)
    s = BlockStreamer(m, stream, ctx(), SampleNoise([0]))
    s.step()
    s.step()
    with pytest.raises(RuntimeError, match="rolling window"):
        s.step()


def test_read_only_view_reads_the_cache_and_refuses_writes():
    """A forward through ``cache.read_only()`` equals one through the cache itself, stores no text keys, shares
    the self-attention tensors (no copy), leaves the cache untouched, and every write raises."""
    m, stream = make_model(), make_stream(window=6, sink=3)
    s = BlockStreamer(m, stream, ctx(), SampleNoise([4]))
    for _ in range(2):
        s.step()
    cache, x = s.cache, torch.randn(1, 3, 16, 4, 4, generator=torch.Generator().manual_seed(9), dtype=DT)
    view = cache.read_only()
    assert all(a is b for a, b in zip(view.self_kv, cache.self_kv)) and view.positions == cache.positions
    assert all(t is None for t in view.cross_kv) and cache.keeps_text_kv and not view.keeps_text_kv
    before = [(kv.k.clone(), kv.v.clone()) for kv in cache.self_kv]
    with torch.no_grad():
        got = m(x, torch.tensor([625.0]), ctx(), kv_cache=view, start_frame=6)
        want = m(x, torch.tensor([625.0]), ctx(), kv_cache=cache, start_frame=6)
    assert torch.equal(got, want)
    assert all(t is None for t in view.cross_kv)  # text keys recomputed, never stored in the view
    assert all(torch.equal(kv.k, k) and torch.equal(kv.v, v) for kv, (k, v) in zip(cache.self_kv, before))
    k = torch.zeros(1, 4, 2, 16, dtype=DT)
    for write in (lambda: view.store_text_kv(0, k, k), lambda: view.stage(0, k, k), lambda: view.commit([6]),
                  view.reset, view.reset_cross):
        with pytest.raises(RuntimeError, match="read-only KV cache"):
            write()
    with pytest.raises(RuntimeError, match="read-only KV cache"):
        m(x, torch.tensor([0.0]), ctx(), kv_cache=view, start_frame=6, cache_write=True)


@pytest.mark.parametrize("hard", [False, True])
def test_rebuild_context_replays_prompt_switches(hard):
    """A scene stream (prompt 1 for 2 blocks, a switch to prompt 2 for 2 blocks, a soft switch to prompt 3 at the
    branch point) and the replay of its stored prefix with the same switches hold the same cache; the replay
    without the switches does not."""
    from astrolabe.sampling.streaming import PromptSwitch

    m, stream = make_model(), make_stream(window=9, sink=3)
    s = BlockStreamer(m, stream, ctx(seed=1), SampleNoise([4]))
    blocks = [s.step(), s.step()]
    s.switch_prompt(ctx(seed=2), hard=hard)
    blocks += [s.step(), s.step()]
    s.switch_prompt(ctx(seed=5), hard=False)  # the window starts a scene: switched before the branch
    prefix = torch.cat(blocks, dim=1)  # (1, 12, C, h, w)
    switches = [PromptSwitch(6, ctx(seed=2), hard), PromptSwitch(12, ctx(seed=5), False)]
    rebuilt = rebuild_context(m, stream, ctx(seed=1), prefix, switches=switches)
    assert rebuilt.positions == s.cache.positions == ([0, 1, 2, 6, 7, 8, 9, 10, 11] if not hard else list(range(6, 12)))
    for a, b in zip(rebuilt.self_kv, s.cache.self_kv):
        assert torch.allclose(a.k, b.k, atol=1e-12) and torch.allclose(a.v, b.v, atol=1e-12)
    plain = rebuild_context(m, stream, ctx(seed=1), prefix)
    pairs = zip(plain.self_kv, s.cache.self_kv)
    assert any(a.k.shape != b.k.shape or float((a.k - b.k).abs().max()) > 1e-3 for a, b in pairs)
    with pytest.raises(ValueError, match="block boundaries"):
        rebuild_context(m, stream, ctx(seed=1), prefix, switches=[PromptSwitch(4, ctx(seed=2), hard)])
    with pytest.raises(ValueError, match="block boundaries"):
        rebuild_context(m, stream, ctx(seed=1), prefix, switches=[PromptSwitch(15, ctx(seed=2), hard)])
