"""Rollout stage on the tiny model: shards, group structure, determinism, branching equivalence, cache."""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch

from astrolabe.build import build_generation_stack
from astrolabe.config import config_from_dict
from astrolabe.data.shards import list_shards, read_rollout_shards
from astrolabe.data.video import decode_mp4, to_uint8_frames
from astrolabe.sampling.branching import (
    choose_prompts,
    decode_window_pixels,
    group_seeds,
    rollout_group,
    window_start_block,
)
from astrolabe.sampling.streaming import BlockStreamer, SampleNoise
from stages import rollout as rollout_stage
from astrolabe.artifacts.engine import execute
from astrolabe.artifacts.stage import StageInfo, StageResult

PROMPTS = ["a red fox runs in snow", "a boat on a calm lake", "city lights at night", "a cat sleeps on a sofa",
           "waves crash on rocks"]
K = 3
META_KEYS = {"prompt", "prompt_index", "group", "candidate", "window_start_frame", "window_frames", "prefix_seed",
             "candidate_seed", "base_model", "iteration"}


def _cfg(window_start: str = "last", **rollout):
    ro = {"group_size": K, "window_blocks": 1, "window_start": window_start, "prompts_per_iteration": 2,
          "num_latent_frames": 9, "seed": 7, **rollout}
    return config_from_dict({"rollout": ro})


def _prompts_stage(prompts: list[str]) -> types.SimpleNamespace:
    def run(cfg, inputs, out_dir: Path, iteration) -> StageResult:
        (out_dir / "train.txt").write_text("\n".join(prompts) + "\n", encoding="utf-8")
        return StageResult(counts={"prompts": len(prompts)})

    info = StageInfo(name="filter_prompts", code_version="test", config_subset=lambda c: {}, per_iteration=False)
    return types.SimpleNamespace(STAGE=info, run=run)


def _run_rollout(run_path: Path, cfg, iteration: int = 1):
    prompts_m = execute(_prompts_stage(PROMPTS), cfg, run_path, {})
    prompts_dir = next((run_path).rglob("train.txt")).parent
    assert prompts_m.counts["prompts"] == len(PROMPTS)
    m = execute(rollout_stage, cfg, run_path, {"prompts": prompts_dir}, iteration=iteration)
    out = next(p.parent for p in run_path.rglob("manifest.json") if p.parent.parent.name == "rollout")
    return m, out, prompts_dir


def _records(out: Path) -> list[dict]:
    return list(read_rollout_shards(list_shards(out, "rollout")))


@pytest.fixture(scope="module")
def stage_runs(tmp_path_factory):
    cfg = _cfg()
    a = tmp_path_factory.mktemp("runA")
    b = tmp_path_factory.mktemp("runB")
    ma, out_a, prompts_dir = _run_rollout(a, cfg)
    mb, out_b, _ = _run_rollout(b, cfg)
    return cfg, (a, ma, out_a, prompts_dir), (b, mb, out_b)


def test_shards_groups_and_meta(stage_runs):
    cfg, (_, m, out, _), _ = stage_runs
    recs = _records(out)
    assert len(recs) == 2 * K
    assert m.counts["prompts"] == 2 and m.counts["candidates"] == 2 * K
    assert m.metrics["rollout/candidates"] == 2 * K and m.metrics["time/rollout"] == m.timings["total"]
    # 3 blocks per video, window = last block: prefix of 2 blocks once + K windows of 1 block per prompt
    assert m.counts["blocks"] == 2 * (2 + K * 1)
    chosen = choose_prompts(len(PROMPTS), 2, cfg.rollout.seed, 1)
    groups: dict[str, list[dict]] = {}
    for r in recs:
        assert META_KEYS <= set(r["meta"])
        groups.setdefault(r["meta"]["group"], []).append(r)
    assert sorted(groups) == ["it1-p0", "it1-p1"]
    for slot, (gid, rs) in enumerate(sorted(groups.items())):
        assert sorted(r["meta"]["candidate"] for r in rs) == list(range(K))
        meta0 = rs[0]["meta"]
        assert meta0["prompt_index"] == chosen[slot] and meta0["prompt"] == PROMPTS[chosen[slot]]
        assert meta0["window_start_frame"] == 6 and meta0["window_frames"] == 3 and meta0["iteration"] == 1
        assert meta0["base_model"] == "tiny"
        ps, cs = group_seeds(cfg.seed, cfg.rollout.seed, 1, slot, K)
        assert {r["meta"]["prefix_seed"] for r in rs} == {ps}
        assert [r["meta"]["candidate_seed"] for r in sorted(rs, key=lambda r: r["meta"]["candidate"])] == cs
        assert m.seeds["groups"][gid]["candidate_seeds"] == cs
        for r in rs:
            assert r["latents"].dtype == np.float32 and r["latents"].shape == (3, 16, 8, 8)
            assert r["prefix"].shape == (6, 16, 8, 8)
            np.testing.assert_array_equal(r["prefix"], rs[0]["prefix"])
            frames = decode_mp4(r["video"])
            assert frames.shape == (12, 64, 64, 3)  # 4 pixel frames per latent frame after a prefix
        for i in range(K):
            for j in range(i + 1, K):
                assert np.abs(rs[i]["latents"] - rs[j]["latents"]).max() > 1e-3


def test_deterministic_across_run_dirs_and_cached(stage_runs, monkeypatch):
    cfg, (a, ma, out_a, prompts_dir), (_, mb, out_b) = stage_runs
    ra, rb = _records(out_a), _records(out_b)
    assert [r["__key__"] for r in ra] == [r["__key__"] for r in rb]
    for x, y in zip(ra, rb):
        np.testing.assert_array_equal(x["latents"], y["latents"])
        np.testing.assert_array_equal(x["prefix"], y["prefix"])
        assert x["meta"] == y["meta"]
    assert ma.key == mb.key

    def boom(*args, **kwargs):
        raise AssertionError("a cached stage must not run again")

    monkeypatch.setattr(rollout_stage, "run", boom)
    again = execute(rollout_stage, cfg, a, {"prompts": prompts_dir}, iteration=1)
    assert again.key == ma.key and again.created == ma.created


def test_candidate_equals_fresh_unforked_run(stage_runs):
    cfg, (_, _, out, _), _ = stage_runs
    stack, _ = build_generation_stack(cfg)
    rec = next(r for r in _records(out) if r["meta"]["group"] == "it1-p1" and r["meta"]["candidate"] == 2)
    meta = rec["meta"]
    ctx = stack.encode_text([meta["prompt"]])
    streamer = BlockStreamer(stack.dit, stack.stream, ctx, SampleNoise([meta["prefix_seed"]]))
    prefix = torch.cat([streamer.step() for _ in range(2)], dim=1)[0]
    streamer.noise = SampleNoise([meta["candidate_seed"]])  # continue the same stream with the candidate's seed
    window = streamer.step()[0]
    np.testing.assert_allclose(rec["prefix"], prefix.numpy(), atol=1e-5)
    np.testing.assert_allclose(rec["latents"], window.numpy(), atol=1e-5)


def test_first_window_no_prefix_and_pixels_match_full_decode():
    cfg = _cfg("first", num_latent_frames=6)
    stack, _ = build_generation_stack(cfg)
    g = rollout_group(stack, "a boat", prefix_seed=5, cand_seeds=[11, 12], window_start_block=0, window_blocks=1)
    assert g.prefix_latents.shape == (0, 16, 8, 8) and g.window_latents.shape == (2, 3, 16, 8, 8)
    assert g.window_pixels.shape == (2, 9, 64, 64, 3) and g.window_start_frame == 0
    fresh = BlockStreamer(stack.dit, stack.stream, stack.encode_text(["a boat"]), SampleNoise([12])).step()[0]
    np.testing.assert_allclose(g.window_latents[1].numpy(), fresh.numpy(), atol=1e-5)

    # with a prefix: the window pixels are the tail of the full-video decode (independent reference)
    g2 = rollout_group(stack, "a boat", prefix_seed=5, cand_seeds=[11, 12], window_start_block=1, window_blocks=1)
    full = torch.cat([g2.prefix_latents, g2.window_latents[0]], dim=0)  # (6, C, h, w)
    ref = stack.vae.decode(full.permute(1, 0, 2, 3)[None])[0]  # (3, 21, H, W)
    ref_u8 = to_uint8_frames(ref.permute(1, 0, 2, 3))[1 + 4 * 2:]  # window frames of the full decode
    assert g2.window_pixels.shape == (2, 12, 64, 64, 3)
    assert np.abs(g2.window_pixels[0].astype(int) - ref_u8.astype(int)).max() <= 1
    assert decode_window_pixels(stack, g2.prefix_latents, g2.window_latents).shape == g2.window_pixels.shape


def test_choose_prompts_cycles_without_replacement():
    n, count = 5, 2
    seq = [i for it in range(10) for i in choose_prompts(n, count, seed=3, iteration=it)]  # 20 = 4 epochs
    for e in range(4):
        assert sorted(seq[e * n : (e + 1) * n]) == list(range(n))
    assert choose_prompts(n, count, 3, 4) == choose_prompts(n, count, 3, 4)
    assert seq != [i for it in range(10) for i in choose_prompts(n, count, seed=4, iteration=it)]
    assert len(choose_prompts(3, 7, 0, 0)) == 7


def test_window_start_modes_and_seeds():
    assert window_start_block("first", 5, 2, 0, 0, 0, 0) == 0
    assert window_start_block("last", 5, 2, 0, 0, 0, 0) == 3
    starts = {window_start_block("random", 5, 2, 0, 1, it, s) for it in range(10) for s in range(4)}
    assert starts == {0, 1, 2, 3}
    assert window_start_block("random", 5, 2, 0, 1, 2, 3) == window_start_block("random", 5, 2, 0, 1, 2, 3)
    with pytest.raises(ValueError, match="window_blocks"):
        window_start_block("first", 2, 3, 0, 0, 0, 0)
    p, c = group_seeds(0, 0, 0, 0, 4)
    assert len({p, *c}) == 5 and (p, c) == group_seeds(0, 0, 0, 0, 4) and (p, c) != group_seeds(0, 0, 0, 1, 4)


def test_rank_slices_partition_groups(tmp_path, monkeypatch):
    cfg = _cfg(prompts_per_iteration=3, save_mp4=False)
    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    (prompts_dir / "train.txt").write_text("\n".join(PROMPTS))
    keys = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        out = tmp_path / f"r{rank}"
        res = rollout_stage.run(cfg, {"prompts": prompts_dir}, out, iteration=0)
        shards = list_shards(out, "rollout")
        assert all(f"-r{rank:03d}-" in s.name for s in shards)
        recs = list(read_rollout_shards(shards))
        assert all(r["video"] is None for r in recs)
        keys += [r["__key__"] for r in recs]
        assert res.counts["candidates"] == len(recs)
    assert sorted(keys) == sorted(f"it0-p{s}-c{j}" for s in range(3) for j in range(K))


def _checkpoint_stage(cfg) -> types.SimpleNamespace:
    """A fake nft_update output: state/lora (trained) and state/adapters/old.safetensors (sampling policy)
    holding two different non-identity adapters."""
    from astrolabe.build import build_dit
    from astrolabe.models.registry import get_base_model
    from safetensors.torch import save_file

    from astrolabe.rl.lora import LoRAConfig, adapter_parameters, adapter_state_dict, apply_lora, save_adapter

    def run(c, inputs, out_dir: Path, iteration) -> StageResult:
        g = torch.Generator().manual_seed(0)
        peft = apply_lora(build_dit(cfg.model, get_base_model("tiny")), LoRAConfig(rank=4, alpha=4.0), generator=g)
        with torch.no_grad():
            for key, p in adapter_parameters(peft, "default").items():
                if key.endswith("lora_B.weight"):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        (out_dir / "state" / "adapters").mkdir(parents=True)
        save_file(adapter_state_dict(peft, "default"), str(out_dir / "state" / "adapters" / "old.safetensors"))
        with torch.no_grad():
            for key, p in adapter_parameters(peft, "default").items():
                if key.endswith("lora_B.weight"):
                    p.mul_(-3.0)
        save_adapter(peft, out_dir / "state" / "lora")  # the trained policy: must not be sampled from
        return StageResult()

    info = StageInfo(name="nft_update", code_version="test", config_subset=lambda c: {}, per_iteration=True)
    return types.SimpleNamespace(STAGE=info, run=run)


def test_checkpoint_policy_is_used(stage_runs):
    cfg, (a, m_base, out_base, prompts_dir), _ = stage_runs
    ckpt_m = execute(_checkpoint_stage(cfg), cfg, a, {}, iteration=0)
    ckpt_dir = next(p.parent for p in a.rglob("manifest.json") if p.parent.parent.name == "nft_update")
    assert ckpt_m.key == ckpt_dir.name
    m = execute(rollout_stage, cfg, a, {"prompts": prompts_dir, "checkpoint": ckpt_dir}, iteration=1)
    assert m.key != m_base.key and m.extra["policy"] == str(ckpt_dir)
    out = next(p.parent for p in a.rglob("manifest.json") if p.parent.name == m.key)
    rec = next(r for r in _records(out) if r["__key__"] == "it1-p0-c1")
    base = next(r for r in _records(out_base) if r["__key__"] == "it1-p0-c1")
    assert np.abs(rec["latents"] - base["latents"]).max() > 1e-3  # the adapter changed the policy
    stack, _ = build_generation_stack(cfg, lora=ckpt_dir / "state", policy="old")
    trained, _ = build_generation_stack(cfg, lora=ckpt_dir / "state")  # lora/: differs from the old policy
    sd_old, sd_new = stack.dit.state_dict(), trained.dit.state_dict()
    assert max(float((sd_old[k] - sd_new[k]).abs().max()) for k in sd_old) > 1e-3
    meta = rec["meta"]
    g = rollout_group(stack, meta["prompt"], meta["prefix_seed"], [meta["candidate_seed"]], 2, 1, decode=False)
    np.testing.assert_allclose(rec["prefix"], g.prefix_latents.numpy(), atol=1e-5)
    np.testing.assert_allclose(rec["latents"], g.window_latents[0].numpy(), atol=1e-5)


SCENE_LINE = "a red fox runs in snow[1s] | waves crash on rocks"  # at the tiny model's 16 fps: 1 block, then 2


def test_window_start_stays_inside_one_scene():
    from astrolabe.sampling.scenes import SceneSegment

    plan = [SceneSegment("a", 0, 1, False), SceneSegment("b", 1, 3, False)]
    assert {window_start_block("random", 3, 2, 0, 1, it, s, segments=plan) for it in range(8) for s in range(4)} == {1}
    assert window_start_block("last", 3, 2, 0, 0, 0, 0, segments=plan) == 1
    with pytest.raises(ValueError, match="straddles a scene switch"):
        window_start_block("first", 3, 2, 0, 0, 0, 0, segments=plan)
    with pytest.raises(ValueError, match="no window of 3 blocks"):
        window_start_block("random", 3, 3, 0, 0, 0, 0, segments=plan)
    one = [SceneSegment("a", 0, 5, False)]  # a one-scene plan draws what no plan draws
    assert [window_start_block("random", 5, 2, 0, 1, it, 0, segments=one) for it in range(8)] == [
        window_start_block("random", 5, 2, 0, 1, it, 0) for it in range(8)]


def test_scene_prompt_rollout_conditions_each_block_on_its_scene(tmp_path):
    """Stage on a two-scene line, window = the last block (scene 2): the record names the window's scene and the plan,
    the prefix is scene 1's block then scene 2's (a soft switch), and the window continues under scene 2's text, as
    a hand-driven stream with the same switch gives; encoding the whole line as one text (the old behaviour) differs."""
    cfg = _cfg(prompts_per_iteration=1, save_mp4=False)
    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    (prompts_dir / "train.txt").write_text(SCENE_LINE + "\n")
    rollout_stage.run(cfg, {"prompts": prompts_dir}, tmp_path / "out", iteration=0)
    recs = _records(tmp_path / "out")
    meta = recs[0]["meta"]
    assert meta["prompt"] == SCENE_LINE and meta["window_prompt"] == "waves crash on rocks"
    assert meta["scenes"] == [["a red fox runs in snow", 0, 1, False], ["waves crash on rocks", 1, 3, False]]
    stack, _ = build_generation_stack(cfg)
    first_text = stack.encode_text(["a red fox runs in snow"])
    s = BlockStreamer(stack.dit, stack.stream, first_text, SampleNoise([meta["prefix_seed"]]))
    first = s.step()
    s.switch_prompt(stack.encode_text(["waves crash on rocks"]), hard=False)
    prefix = torch.cat([first, s.step()], dim=1)[0]
    s.noise = SampleNoise([meta["candidate_seed"]])
    np.testing.assert_allclose(recs[0]["prefix"], prefix.numpy(), atol=1e-5)
    np.testing.assert_allclose(recs[0]["latents"], s.step()[0].numpy(), atol=1e-5)
    whole = rollout_group(stack, SCENE_LINE, meta["prefix_seed"], [meta["candidate_seed"]], 2, 1, decode=False)
    assert np.abs(whole.window_latents[0].numpy() - recs[0]["latents"]).max() > 1e-3


def test_hard_cut_into_the_window_makes_it_a_fresh_stream_of_its_scene():
    """``p1[1s#] | p2`` with the window at block 1: the cut flushes the cache, so candidate j's window is the first
    block of a fresh stream of p2 with j's seed (RoPE is relative: only the absolute positions differ)."""
    from astrolabe.sampling.scenes import parse_scene_prompt, plan_scenes

    cfg = _cfg(num_latent_frames=6)
    stack, _ = build_generation_stack(cfg)
    line = "a red fox runs in snow[1s#] | waves crash on rocks"
    plan = plan_scenes(parse_scene_prompt(line), 2, stack.fps, stack.stream.block_frames)
    g = rollout_group(stack, line, prefix_seed=5, cand_seeds=[11, 12], window_start_block=1, window_blocks=1,
                      decode=False, segments=plan)
    for j, seed in enumerate([11, 12]):
        fresh = BlockStreamer(stack.dit, stack.stream, stack.encode_text(["waves crash on rocks"]), SampleNoise([seed]))
        np.testing.assert_allclose(g.window_latents[j].numpy(), fresh.step()[0].numpy(), atol=1e-4)


def test_scene_prompts_that_do_not_fit_fail_before_generating(tmp_path):
    cfg = _cfg(prompts_per_iteration=1, save_mp4=False)
    prompts_dir = tmp_path / "prompts"
    prompts_dir.mkdir()
    (prompts_dir / "train.txt").write_text("a boat on a calm lake\n" + "a red fox runs in snow[5s] | a boat\n")
    with pytest.raises(ValueError, match=r"training prompt 2 .*rollout.num_latent_frames"):
        rollout_stage.run(cfg, {"prompts": prompts_dir}, tmp_path / "out", iteration=0)
    assert not (tmp_path / "out").exists() or not list_shards(tmp_path / "out", "rollout")
