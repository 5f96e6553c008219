"""Noise tape, AR-CoPO branch tapes and pivot forking (tiny float64 DiT, CPU, seconds)."""

import math

import pytest
import torch

from astrolabe.models.wan.attention import CausalWindow
from astrolabe.models.wan.config import tiny
from astrolabe.models.wan.dit import WanDiT
from astrolabe.sampling.noise_tape import BranchTapeSeeds, NoiseTape, branch_tapes
from astrolabe.sampling.pivot import generate_pivot_group
from astrolabe.sampling.schedule import FlowSchedule, StepSchedule
from astrolabe.sampling.streaming import BlockStreamer, SampleNoise, StreamConfig

DT = torch.float64
G, SIGMA, BLOCKS = 3, 0.5, 4


def make_model(seed=0):
    m = WanDiT(tiny())
    m.init_weights(torch.Generator().manual_seed(seed))
    return m.to(DT).eval()


def make_stream(window=9, sink=3, first_block_steps=None):  # block p+1 sees block p
    steps = StepSchedule.from_steps(FlowSchedule(5.0), [1000, 750, 500, 250])
    return StreamConfig(CausalWindow(3, window, sink), steps, 16, 4, 4, first_block_steps=first_block_steps)


def ctx(b=1, seed=3):
    return torch.randn(b, 4, 32, generator=torch.Generator().manual_seed(seed), dtype=DT)


def run(m, stream, c, noise, blocks=BLOCKS):
    s = BlockStreamer(m, stream, c, noise)
    return torch.cat([s.step() for _ in range(blocks)], dim=1)


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.mark.parametrize("first", [None, [1000, 750]])
def test_tape_from_seeds_equals_generator_draws_bit_for_bit(model, first):
    fbs = None if first is None else StepSchedule.from_steps(FlowSchedule(5.0), first)
    stream = make_stream(first_block_steps=fbs)
    c = ctx(2)
    by_seeds = run(model, stream, c, SampleNoise([5, 6]))
    tape = NoiseTape.from_seeds([5, 6], stream, BLOCKS)
    assert [t.shape[0] for t in tape.blocks] == [len((fbs or stream.steps).timesteps)] + [4] * (BLOCKS - 1)
    assert torch.equal(run(model, stream, c, tape), by_seeds)


def test_branch_tape_shares_everything_but_pivot_initial_noise():
    stream = make_stream()
    base = NoiseTape.from_seeds([9], stream, BLOCKS)
    pivot = 2
    tape = branch_tapes(base, pivot, G, SIGMA, torch.Generator().manual_seed(77))
    assert len(tape) == G and tape.start_frames == (0, 3, 6, 9)
    for b, (t, t0) in enumerate(zip(tape.blocks, base.blocks)):
        for i in range(G):
            first = 1 if b == pivot else 0  # every re-noising draw, and every other block's initial noise
            assert torch.equal(t[first:, i], t0[first:, 0]), (b, i)
    # the pivot formula, by hand: d_i are the generator's G standard-normal draws in one call
    d = torch.randn((G, 3, 16, 4, 4), generator=torch.Generator().manual_seed(77))
    eps_star = base.blocks[pivot][0, 0]
    for i in range(G):
        expected = math.sqrt(1 - SIGMA**2) * eps_star + SIGMA * d[i]
        assert torch.equal(tape.blocks[pivot][0, i], expected)
        assert not torch.equal(tape.blocks[pivot][0, i], eps_star)
    assert not torch.equal(tape.blocks[pivot][0, 0], tape.blocks[pivot][0, 1])


def test_unit_variance_of_perturbed_noise():
    stream = StreamConfig(CausalWindow(3), make_stream().steps, 16, 32, 32)
    tape = branch_tapes(NoiseTape.from_seeds([1], stream, 1), 0, 8, 0.7, torch.Generator().manual_seed(2))
    x = tape.blocks[0][0]  # (8, 3, 16, 32, 32), ~393k draws
    assert abs(float(x.var()) - 1.0) < 0.01 and abs(float(x.mean())) < 0.01


@pytest.fixture(scope="module")
def group(model):
    stream = make_stream()
    seeds = BranchTapeSeeds(base_seed=9, perturb_seed=77, pivot_block=2, group_size=G, sigma=SIGMA, num_blocks=BLOCKS)
    tape = seeds.build(stream)
    return stream, seeds, tape, generate_pivot_group(model, stream, ctx(), tape, seeds.pivot_block)


def test_pivot_group_shapes_and_divergence(group):
    stream, seeds, tape, out = group
    assert out.pivot_start_frame == 6 and out.prefix_latents.shape == (1, 6, 16, 4, 4)
    assert out.pivot_inputs.shape == out.pivot_x0.shape == (4, G, 3, 16, 4, 4)
    assert out.latents.shape == (G, 6, 16, 4, 4)
    assert torch.equal(out.pivot_x0[-1], out.latents[:, :3])
    assert torch.equal(out.pivot_inputs[0].float(), tape.blocks[2][0])  # step-0 input = the perturbed noise
    for i in range(G):
        for j in range(i + 1, G):
            assert not torch.allclose(out.latents[i, :3], out.latents[j, :3])  # pivot chunk differs
            assert not torch.allclose(out.latents[i, 3:], out.latents[j, 3:])  # and so does what follows it


def test_each_branch_replays_from_its_tape_alone(model, group):
    """Branch i from scratch with tape row i (no fork): its prefix is bit-identical to the shared prefix
    (branches identical before the pivot) and its whole video equals the forked branch."""
    stream, _, tape, out = group
    videos = out.videos()
    for i in range(G):
        solo = run(model, stream, ctx(), tape.select([i]))
        assert torch.equal(solo[:, :6], out.prefix_latents)
        assert torch.allclose(solo[0], videos[i], atol=1e-10)


def test_replay_from_seeds_and_from_safetensors_is_exact(model, group, tmp_path):
    stream, seeds, tape, out = group
    again = generate_pivot_group(model, stream, ctx(), BranchTapeSeeds.from_dict(seeds.to_dict()).build(stream), 2)
    assert torch.equal(again.latents, out.latents) and torch.equal(again.pivot_x0, out.pivot_x0)
    path = tmp_path / "tape.safetensors"
    tape.save(path)
    loaded = NoiseTape.load(path)
    assert all(torch.equal(a, b) for a, b in zip(loaded.blocks, tape.blocks))
    assert path.stat().st_size < 2 * sum(t[:, :1].numel() * 4 for t in tape.blocks)  # shared blocks stored once
    replay = generate_pivot_group(model, stream, ctx(), loaded, 2)
    assert torch.equal(replay.latents, out.latents)


def test_tape_errors_are_clear(model):
    stream = make_stream()
    tape = NoiseTape.from_seeds([1], stream, 2)
    with pytest.raises(KeyError, match="no block starting at latent frame 6"):
        run(model, stream, ctx(), tape, blocks=3)
    with pytest.raises(ValueError, match="different latent size"):
        run(model, StreamConfig(CausalWindow(3, 9, 3), stream.steps, 16, 8, 8), ctx(), tape, blocks=1)
    unshared = NoiseTape.from_seeds([1, 2, 3], stream, 3)
    with pytest.raises(ValueError, match="identical noise before the pivot"):
        generate_pivot_group(model, stream, ctx(), unshared, 1)
    with pytest.raises(ValueError, match="noise rows"):
        BlockStreamer(model, stream, ctx(), tape).fork_with(3, tape)
