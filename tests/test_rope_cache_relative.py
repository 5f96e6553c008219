"""``sampling.rope: cache_relative`` = the release's ``InferCausalWanModel`` "block-relativistic" RoPE.

What equals what:
* after the cache has rolled, one self-attention layer equals attention computed by hand with the keys
  rotated by their window slot (sink first) and the query by the slot of its own frame;
* before anything is evicted from a fresh video's cache (all cached frames 0..n-1 visible), slots equal
  absolute positions, so the whole streamed video is bit-identical to ``absolute``;
* with no sink the visible window is contiguous, so every query-key distance is the absolute one and the
  video equals ``absolute`` up to float64 rounding; with a sink the sink is moved next to the window and
  the videos differ.
"""

import math

import pytest
import torch

from astrolabe.models.wan.attention import CausalWindow, plan_attention, slot_positions, slot_rope
from astrolabe.models.wan.config import tiny
from astrolabe.models.wan.dit import WanDiT, WanSelfAttention
from astrolabe.models.wan.rope import rope_apply, rope_frequencies, rope_tables
from astrolabe.sampling.kv_cache import KVCache
from astrolabe.sampling.schedule import FlowSchedule, StepSchedule
from astrolabe.sampling.streaming import BlockStreamer, SampleNoise, StreamConfig

DT = torch.float64
HW = (2, 2)  # token grid per frame
S = HW[0] * HW[1]


def _layer() -> WanSelfAttention:
    torch.manual_seed(0)
    return WanSelfAttention(tiny()).to(DT).eval()


def test_slot_positions_after_roll():
    # window 4 incl. sink 1, blocks of 1 frame; cached frames 0 (sink), 2, 3; new frame 4
    plan = plan_attention([0, 2, 3, 4], 1, CausalWindow(1, 4, 1), origin=0)
    assert plan[0].keys == (0, 1, 2, 3)
    assert slot_positions(plan[0], num_cached=3) == ((0, 1, 2, 3), (3,))
    # the release: once rolled, the query of an f-frame block sits at [L - f, L) of an L-frame buffer
    plan = plan_attention([0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14], 3, CausalWindow(3, 12, 3), origin=0)
    keys, query = slot_positions(plan[0], num_cached=9)
    assert keys == tuple(range(12)) and query == (9, 10, 11)


@torch.no_grad()
def test_rolled_cache_matches_hand_computed_attention():
    """Window 3 with a 1-frame sink, 1-frame blocks: after frames 0, 1, 2 are cached, frame 3 sees the sink
    (frame 0), frame 2 and itself at slots 0, 1, 2 (frame 1 left the window)."""
    layer = _layer()
    cfg = tiny()
    n, d = cfg.num_heads, cfg.head_dim
    tables = rope_tables(d, cfg.rope_max_positions)
    causal = CausalWindow(block_frames=1, window_frames=3, sink_frames=1)
    cache = KVCache(num_layers=1, tokens_per_frame=S, causal=causal, rope="cache_relative")
    x = torch.randn(1, 4 * S, cfg.dim, generator=torch.Generator().manual_seed(1), dtype=DT)  # frames 0..3

    def forward(frame: int, write: bool) -> torch.Tensor:
        positions = cache.positions + [frame]
        plan = plan_attention(positions, 1, causal, cache.origin_for([frame]))
        freqs = slot_rope(tables, plan, cache.num_frames, HW)
        out = layer(x[:, frame * S : (frame + 1) * S], freqs, plan, S, "sdpa", cache, 0, write)
        if write:
            cache.commit([frame])
        return out

    for f in range(3):
        forward(f, write=True)
    assert cache.positions == [0, 1, 2]
    # keys are cached un-rotated: equal to the plain projection of each frame
    k_raw = layer.norm_k(layer.k(x)).view(1, 4 * S, n, d)
    assert torch.equal(cache.layer(0).k, k_raw[:, : 3 * S])

    out = forward(3, write=False)  # (1, S, D)

    # by hand: keys of frames 0, 2, 3 at temporal positions 0, 1, 2; the query (frame 3) at position 2
    q = layer.norm_q(layer.q(x[:, 3 * S :])).view(1, S, n, d)
    v = layer.v(x).view(1, 4 * S, n, d)
    frames = [0, 2, 3]
    keys = torch.cat([k_raw[:, f * S : (f + 1) * S] for f in frames], dim=1)
    vals = torch.cat([v[:, f * S : (f + 1) * S] for f in frames], dim=1)
    keys = rope_apply(keys, rope_frequencies(tables, [0, 1, 2], HW))
    q = rope_apply(q, rope_frequencies(tables, [2], HW))
    logits = torch.einsum("bqnd,bknd->bnqk", q, keys) / math.sqrt(d)
    att = torch.einsum("bnqk,bknd->bqnd", logits.softmax(-1), vals)
    expected = layer.o(att.reshape(1, S, n * d))
    assert torch.allclose(out, expected, atol=1e-12)

    # and it is not the absolute-position answer (frame 3 / sink distance 3 there, 2 here)
    keys_abs = rope_apply(torch.cat([k_raw[:, f * S : (f + 1) * S] for f in frames], 1), rope_frequencies(tables, frames, HW))
    q_abs = rope_apply(layer.norm_q(layer.q(x[:, 3 * S :])).view(1, S, n, d), rope_frequencies(tables, [3], HW))
    att_abs = torch.einsum("bnqk,bknd->bqnd", (torch.einsum("bqnd,bknd->bnqk", q_abs, keys_abs) / math.sqrt(d)).softmax(-1), vals)
    assert not torch.allclose(out, layer.o(att_abs.reshape(1, S, n * d)), atol=1e-6)


def _model() -> WanDiT:
    m = WanDiT(tiny())
    m.init_weights(torch.Generator().manual_seed(0))
    return m.to(DT).eval()


def _video(model: WanDiT, rope: str, window: int | None, sink: int, blocks: int) -> list[torch.Tensor]:
    steps = StepSchedule.from_steps(FlowSchedule(5.0), [1000, 750, 500, 250])
    stream = StreamConfig(CausalWindow(3, window, sink), steps, 16, 4, 4, rope=rope)
    c = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(3), dtype=DT)
    streamer = BlockStreamer(model, stream, c, SampleNoise([7]))
    assert streamer.cache.rope == rope
    return [streamer.step().clone() for _ in range(blocks)]


def test_before_the_roll_bit_identical_to_absolute():
    """Window 9 + sink 3, 3-frame blocks: blocks 0..2 see every earlier frame (slots = absolute positions)."""
    m = _model()
    rel, ab = _video(m, "cache_relative", 9, 3, 5), _video(m, "absolute", 9, 3, 5)
    for b in range(3):
        assert torch.equal(rel[b], ab[b]), b
    # block 3 is the first whose window drops frames 3..5: the sink now sits at slots 0..2 next to frames 6..8
    assert not torch.allclose(rel[3], ab[3], atol=1e-6)


def test_without_sink_only_rounding_differs():
    """No sink: the visible frames are contiguous, query-key distances are the absolute ones."""
    m = _model()
    rel, ab = _video(m, "cache_relative", 6, 0, 5), _video(m, "absolute", 6, 0, 5)
    for b in range(5):
        assert torch.allclose(rel[b], ab[b], atol=1e-9), b


def test_soft_switch_and_long_video_beyond_the_rope_table():
    """Slots never exceed the window, so a cache_relative video outlives a (tiny) RoPE table; a soft switch
    re-encodes the cached frames (multi-block forward, slots per query block)."""
    from dataclasses import replace

    m = WanDiT(replace(tiny(), rope_max_positions=8))
    m.init_weights(torch.Generator().manual_seed(0))
    m = m.to(DT).eval()
    steps = StepSchedule.from_steps(FlowSchedule(5.0), [1000, 500])
    c = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(3), dtype=DT)
    for rope in ("cache_relative", "absolute"):
        stream = StreamConfig(CausalWindow(3, 6, 3), steps, 16, 4, 4, rope=rope)
        streamer = BlockStreamer(m, stream, c, SampleNoise([7]))
        run = lambda: [streamer.step() for _ in range(4)]  # noqa: E731  12 frames > 8 table positions
        if rope == "absolute":
            with pytest.raises(ValueError, match="outside the RoPE table"):
                run()
            continue
        run()
        streamer.switch_prompt(c.flip(1), hard=False)
        assert torch.isfinite(streamer.step()).all()
        assert streamer.cache.fork(2).rope == "cache_relative"


def test_read_only_view_keeps_cache_relative_rope():
    """The update's read-only view of a cache_relative cache rotates as the cache does (past the roll, where
    slots and absolute positions differ), and fork/read_only both carry ``rope``."""
    m = _model()
    stream = StreamConfig(CausalWindow(3, 6, 3), StepSchedule.from_steps(FlowSchedule(5.0), [1000, 500]), 16, 4, 4,
                          rope="cache_relative")
    c = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(3), dtype=DT)
    streamer = BlockStreamer(m, stream, c, SampleNoise([7]))
    for _ in range(4):  # 12 frames through a 6-frame window: the sink is no longer contiguous with the rest
        streamer.step()
    cache = streamer.cache
    view = cache.read_only()
    assert view.rope == cache.fork(1).rope == "cache_relative"
    x = torch.randn(1, 3, 16, 4, 4, generator=torch.Generator().manual_seed(9), dtype=DT)
    with torch.no_grad():
        got = m(x, torch.tensor([500.0]), c, kv_cache=view, start_frame=12)
        want = m(x, torch.tensor([500.0]), c, kv_cache=cache, start_frame=12)
        cache.rope = "absolute"  # what a view that dropped the field would compute
        other = m(x, torch.tensor([500.0]), c, kv_cache=cache.read_only(), start_frame=12)
    assert torch.equal(got, want)
    assert not torch.allclose(got, other, atol=1e-6)


def test_meta_built_model_has_real_rope_tables():
    """Checkpoint loading builds the DiT under torch.device('meta'); its RoPE tables must still be real, or
    the first forward of a loaded checkpoint fails."""
    ref = _model()
    with torch.device("meta"):
        m = WanDiT(tiny())
    m.load_state_dict(ref.state_dict(), assign=True)
    x = torch.randn(1, 3, 16, 4, 4, generator=torch.Generator().manual_seed(0), dtype=DT)
    c = torch.randn(1, 4, 32, generator=torch.Generator().manual_seed(1), dtype=DT)
    t = torch.tensor([500.0])
    assert torch.equal(m(x, t, c, causal=CausalWindow(3)), ref(x, t, c, causal=CausalWindow(3)))
