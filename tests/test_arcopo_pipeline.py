"""AR-CoPO in the pipeline: pivot-group rollout payload, the update's first ratio, the semi buffer, the merge rule."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from astrolabe.artifacts.engine import execute
from astrolabe.artifacts.manifest import Manifest
from astrolabe.artifacts.stagedir import stage_root
from astrolabe.config import load_config
from astrolabe.build import stream_config
from astrolabe.models.registry import get_base_model
from astrolabe.rl.arcopo_semi import choose_merge_scale, lora_delta_scaled
from astrolabe.rl import update_states
from astrolabe.rl.arcopo_update import accumulate_groups
from astrolabe.sampling.noise_tape import BranchTapeSeeds
from stages import arcopo_buffer, filter_prompts, label_uncertainty, nft_update, rollout, score
from stages.nft_update import read_labelled_groups

REPO = Path(__file__).resolve().parents[1]
G = 3
OVERRIDES = [
    "rollout.prompts_per_iteration=2", f"rollout.group_size={G}", "rollout.num_latent_frames=9", "arcopo.anchors=2",
    "rl.optim.precision=fp32", "rl.optim.lr=1e-3", "rl.lora.rank=4", "rl.lora.alpha=4", "rl.epochs=1",
    "pipeline.eval_max_prompts=1", "pipeline.eval_seeds=[1000]",
]


def _out(run: Path, m: Manifest) -> Path:
    return stage_root(run, m.stage, m.iteration) / m.key


def _cfg(runs_root: Path, *extra: str):
    return load_config(REPO / "configs" / "tiny-arcopo.yaml", [*OVERRIDES, f"pipeline.runs_root={runs_root}", *extra])


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    root = tmp_path_factory.mktemp("arcopo")
    run = root / "run"
    cfg = _cfg(root, "arcopo.semi=null")
    p = _out(run, execute(filter_prompts, cfg, run, {}))
    r = _out(run, execute(rollout, cfg, run, {"prompts": p}, 0))
    s = _out(run, execute(score, cfg, run, {"rollout": r}, 0))
    lab = _out(run, execute(label_uncertainty, cfg, run, {"rollout": r, "score": s}, 0))
    upd = execute(nft_update, cfg, run, {"rollout": r, "labels": lab}, 0)
    return cfg, run, p, r, lab, upd


def _records(rollout_dir: Path) -> list[dict]:
    from astrolabe.data.shards import list_shards, read_rollout_shards

    return list(read_rollout_shards(list_shards(rollout_dir)))


# ----------------------------------------------------------------------------------- rollout payload


def test_rollout_payload_and_branches_identical_outside_the_pivot(chain):
    cfg, _, _, r, _, _ = chain
    recs = _records(r)
    assert len(recs) == 2 * G
    base = get_base_model(cfg.model.base)
    stream = stream_config(cfg.model, base)
    groups: dict[str, list[dict]] = {}
    for rec in recs:
        groups.setdefault(rec["meta"]["group"], []).append(rec)
    for gid, rs in groups.items():
        rs.sort(key=lambda x: x["meta"]["candidate"])
        meta = rs[0]["meta"]
        p, start = meta["pivot_block"], meta["pivot_start_frame"]
        assert meta["algorithm"] == "arcopo" and meta["num_blocks"] == 3 and start == 3 * p
        steps = len(meta["pivot_timesteps"])
        for x in rs:
            assert x["prefix"].shape == (start, 16, 8, 8) and x["latents"].shape == (9 - start, 16, 8, 8)
            assert x["pivot_inputs"].shape == x["pivot_x0"].shape == (steps, 3, 16, 8, 8)
            np.testing.assert_array_equal(x["prefix"], rs[0]["prefix"])  # one shared prefix
            np.testing.assert_array_equal(x["pivot_x0"][-1], x["latents"][:3])  # last x0 = the clean pivot block
            assert x["meta"]["tape"] == meta["tape"]
        # the recorded tape: every draw shared by the branches except the pivot block's initial noise
        tape = BranchTapeSeeds.from_dict(meta["tape"]).build(stream)
        for b, block in enumerate(tape.blocks):  # (S, G, f, C, h, w)
            for k in range(block.shape[0]):
                same = all(torch.equal(block[k, i], block[k, 0]) for i in range(G))
                assert same == (not (b == p and k == 0)), (gid, b, k)
        # the stored pivot inputs start from exactly the tape's per-branch pivot noise, and differ
        for i, x in enumerate(rs):
            np.testing.assert_array_equal(x["pivot_inputs"][0], tape.blocks[p][0, i].numpy())
        assert np.abs(rs[0]["latents"] - rs[1]["latents"]).max() > 1e-4
        assert rs[0]["video"] != rs[1]["video"]


def test_labels_are_group_advantages(chain):
    _, _, _, r, lab, _ = chain
    groups, skipped = read_labelled_groups(r, lab)
    assert skipped == 0 and len(groups) == 2
    for g in groups:
        assert g.advantages.shape == (G,)
        np.testing.assert_allclose(g.advantages.mean(), 0.0, atol=1e-6)
        assert np.abs(g.advantages).max() > 0.1  # std-normalised inside the group


# ----------------------------------------------------------------------------------- update


def test_first_update_step_has_ratio_exactly_one_and_later_steps_move(chain):
    cfg, _, _, r, lab, _ = chain
    groups, _ = read_labelled_groups(r, lab)
    base = get_base_model(cfg.model.base)
    from astrolabe.build import build_dit
    from astrolabe.rl.update_states import build_training_state
    from stages.nft_update import encode_prompts

    state = build_training_state(cfg.rl, build_dit(cfg.model, base))
    state.register_generator("anchors", torch.Generator().manual_seed(0))
    ctx = encode_prompts(cfg, [g.prompt for g in groups])
    stream = stream_config(cfg.model, base)
    g = groups[0]

    def group_step(policy):  # one group's surrogate, back-propagated (no optimizer step); its metrics
        return accumulate_groups(state, [g], ctx, stream, cfg.arcopo, policy)[0]

    m = group_step("old")
    assert m["arcopo/ratio_min"] == 1.0 and m["arcopo/ratio_max"] == 1.0 and m["arcopo/clip_fraction"] == 0.0
    semi = group_step("ref")  # semi adapter: pi_old = base model
    assert semi["arcopo/ratio_min"] == 1.0 and semi["arcopo/ratio_max"] == 1.0
    grads = [p.grad for p in state.params if p.grad is not None]
    assert grads and any(float(gr.abs().max()) > 0 for gr in grads)  # gradient reaches the adapter
    for p in state.params:  # a large step on the default adapter only: the ratio must leave 1
        if p.grad is not None:
            p.data.add_(torch.sign(p.grad), alpha=-0.05)
    state.optimizer.zero_grad(set_to_none=True)
    m2 = group_step("old")
    assert m2["arcopo/ratio_min"] != 1.0 or m2["arcopo/ratio_max"] != 1.0


def test_update_stage_checkpoint_logs_and_syncs_old(chain):
    _, run, _, _, _, upd = chain
    metrics = upd.metrics  # typed, finite metrics of the stage result
    for k in ("loss/policy", "arcopo/entropy", "arcopo/clip_fraction", "update/grad_norm"):
        assert k in metrics, k
    assert 0 < metrics["arcopo/entropy"] <= np.log(G) + 1e-9
    state = nft_update.checkpoint_state_dir(_out(run, upd))
    lora = load_file(str(state / "lora" / "adapter_model.safetensors"))
    old = load_file(str(state / "adapters" / "old.safetensors"))
    b = [k for k in lora if "lora_B" in k]
    assert any(float(lora[k].abs().max()) > 0 for k in b)  # the adapter moved
    for k in lora:  # old <- default at the end of the phase: the next rollout samples the trained policy
        key = k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        torch.testing.assert_close(old[key], lora[k], rtol=0, atol=0)


def _adapter_files(state: Path) -> dict[str, bytes]:
    return {str(f.relative_to(state)): f.read_bytes()
            for f in [state / "lora" / "adapter_model.safetensors", *sorted((state / "adapters").glob("*"))]}


@pytest.mark.parametrize("old_policy", ["old", "ref"])  # the on-policy adapter; the semi one (buffer picks)
def test_update_resumed_after_an_iteration_equals_the_uninterrupted_run(chain, tmp_path, old_policy):
    cfg, _, _, r, lab, _ = chain
    cfg = cfg.model_copy(update={"rl": cfg.rl.model_copy(update={"epochs": 2, "accumulation_steps": 1})})
    groups, _ = read_labelled_groups(r, lab)
    ctx = nft_update.encode_prompts(cfg, [g.prompt for g in groups])
    extra, pick = ((), None) if old_policy == "old" else (("buffer",), 1)
    # uninterrupted: one state in memory through iterations 0 and 1
    state = update_states.build_arcopo_state(cfg, None, 0, extra)
    for it in (0, 1):
        update_states.arcopo_adapter_phase(cfg, state, groups, ctx, it, old_policy, pick)
    state.save(tmp_path / "uninterrupted")
    # interrupted after iteration 0's update: the stage saves it; iteration 1 restores it into a fresh state
    update_states.train_arcopo_adapter(cfg, groups, ctx, None, tmp_path / "it0", 0, old_policy, extra, pick)
    update_states.train_arcopo_adapter(cfg, groups, ctx, tmp_path / "it0", tmp_path / "it1", 1, old_policy, extra, pick)
    a, b = _adapter_files(tmp_path / "uninterrupted"), _adapter_files(tmp_path / "it1")
    assert a.keys() == b.keys() and a == b, "the adapters differ (byte for byte)"
    o1, o2 = (torch.load(tmp_path / d / "optimizer.pt", weights_only=False)["optimizer"] for d in ("uninterrupted", "it1"))
    assert o1["state"].keys() == o2["state"].keys() and o1["state"]
    for k in o1["state"]:
        for name, v in o1["state"][k].items():
            assert torch.equal(v, o2["state"][k][name]), (k, name)
    g1, g2 = (torch.load(tmp_path / d / "rng.pt", weights_only=False)["torch_generators"] for d in ("uninterrupted", "it1"))
    assert g1.keys() == {"sigma", "noise", "shuffle", "anchors", *extra} and all(torch.equal(g1[k], g2[k]) for k in g1)
    steps = 2 * 2 * -(-(pick or len(groups)) // cfg.rl.accumulation_steps)  # iterations x epochs x steps per pass
    assert json.loads((tmp_path / "it1" / "state.json").read_text())["step"] == state.step == steps


# ----------------------------------------------------------------------------------- merge


def test_merge_rule_picks_the_papers_scale_on_table_3():
    # AR-CoPO Table 3 (Self-Forcing): s -> VideoAlign (in-domain), VBench (held-out); base 7.76 / 82.15
    va = {1.0: 8.33, 0.8: 8.22, 0.6: 7.99, 0.4: 7.72, 0.0: 7.61}
    vb = {1.0: 81.99, 0.8: 82.17, 0.6: 82.23, 0.4: 82.40, 0.0: 82.45}
    table = {s: {"va": va[s], "vb": vb[s]} for s in va}
    base = {"va": 7.76, "vb": 82.15}
    assert choose_merge_scale(table, base, "va", "vb") == 0.8
    assert choose_merge_scale(table, {"va": 9.0, "vb": 82.15}, "va", "vb") is None
    table[0.8]["vb"] = None  # a missing metric never beats the base
    assert choose_merge_scale(table, base, "va", "vb") == 0.6
    with pytest.raises(KeyError):
        choose_merge_scale(table, {"va": 1.0}, "va", "vb")


def test_lora_delta_scaling_scales_only_b():
    t = {"m.lora_A.weight": torch.ones(2, 3), "m.lora_B.weight": torch.ones(3, 2)}
    out = lora_delta_scaled(t, 0.5)
    assert torch.equal(out["m.lora_A.weight"], t["m.lora_A.weight"]) and float(out["m.lora_B.weight"][0, 0]) == 0.5


# ----------------------------------------------------------------------------------- buffer resume


_BUILD = """
import sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from astrolabe.config import load_config
from astrolabe.artifacts.engine import execute
from stages import arcopo_buffer
cfg = load_config(sys.argv[1], sys.argv[4:])
execute(arcopo_buffer, cfg, Path(sys.argv[2]), {"prompts": Path(sys.argv[3])})
"""


def _buffer_overrides(root: Path) -> list[str]:
    return [*OVERRIDES, f"pipeline.runs_root={root}", "arcopo.semi.groups=3", "arcopo.semi.groups_per_part=1",
            "rollout.save_mp4=true"]


def _build_cmd(root: Path, run: Path, prompts: Path) -> list[str]:
    return [sys.executable, "-c", _BUILD, str(REPO / "configs" / "tiny-arcopo.yaml"), str(run), str(prompts),
            *_buffer_overrides(root)]


def _part_dirs(root: Path) -> list[Path]:
    shared = arcopo_buffer.buffer_root(_cfg(root))
    return sorted(p.parent for p in shared.rglob("manifest.json"))


@pytest.mark.slow
def test_buffer_resumes_after_sigkill_and_equals_an_uninterrupted_build(chain, tmp_path):
    _, _, prompts, _, _, _ = chain
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # uninterrupted reference build (in-process)
    ref_root = tmp_path / "ref"
    cfg_ref = load_config(REPO / "configs" / "tiny-arcopo.yaml", _buffer_overrides(ref_root))
    m_ref = execute(arcopo_buffer, cfg_ref, ref_root / "run", {"prompts": prompts})
    # killed build: SIGKILL once part 1's rollout is being written
    root = tmp_path / "killed"
    proc = subprocess.Popen(_build_cmd(root, root / "run", prompts), env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=open(tmp_path / "build.log", "wb"))
    cfg = load_config(REPO / "configs" / "tiny-arcopo.yaml", _buffer_overrides(root))
    part1 = arcopo_buffer.buffer_root(cfg) / "iter-0001" / "rollout"
    deadline = time.monotonic() + 180
    while not (part1.is_dir() and any(p.name.startswith(".") for p in part1.iterdir())):
        assert proc.poll() is None, (tmp_path / "build.log").read_text()
        assert time.monotonic() < deadline, "the buffer build never reached part 1"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done = _part_dirs(root)
    assert {d.parent.parent.name for d in done} == {"iter-0000"}, "only part 0 was published before the kill"
    created = {d: Manifest.load(d).created for d in done}
    # rerun: part 0 is reused, the rest is built, the buffer equals the reference
    m = execute(arcopo_buffer, cfg, root / "run", {"prompts": prompts})
    assert {d: Manifest.load(d).created for d in done} == created
    assert m.key == m_ref.key and m.counts == m_ref.counts
    ours = json.loads((_out(root / "run", m) / "parts.json").read_text())["parts"]
    theirs = json.loads((_out(ref_root / "run", m_ref) / "parts.json").read_text())["parts"]
    assert [p["keys"] for p in ours] == [p["keys"] for p in theirs] and len(ours) == 3
    for a, b in zip(ours, theirs):
        for x, y in zip(_records(Path(a["rollout"])), _records(Path(b["rollout"]))):
            assert x["__key__"] == y["__key__"] and x["meta"] == y["meta"]
            for name in ("latents", "prefix", "pivot_inputs", "pivot_x0"):
                np.testing.assert_array_equal(x[name], y[name])
            assert x["video"] == y["video"]


# ----------------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_tiny_arcopo_train_completes_and_compares_with_nft(tmp_path_factory, monkeypatch):
    import pipeline_helpers as ph
    from astrolabe.tracking import compare_runs
    from flows.run import train_run

    nft_run = ph.reference_run(tmp_path_factory)  # the small tiny NFT run of the pipeline tests
    base = ph.base_dir(tmp_path_factory)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", ph.mlflow_uri(base))
    cfg = load_config(REPO / "configs" / "tiny-arcopo.yaml", [
        *OVERRIDES, "pipeline.iterations=2", "pipeline.eval_every=1", f"pipeline.runs_root={base / 'runs'}",
        "name=arc", "arcopo.semi.groups=2", "arcopo.semi.groups_per_part=1", "arcopo.semi.groups_per_iteration=1",
    ])
    summary = train_run(cfg)
    assert summary.computed_nodes == 13 and summary.cached_nodes == 0  # filter, buffer, 2 x 4 stages, 3 evals
    ev = Manifest.load(next((summary.run_path / "iter-0002" / "evaluate").iterdir()))
    assert ev.metrics["eval/merge/s"] in (0.0, 0.5, 1.0)
    assert {f"eval/merge/s{s:g}/reward/colorfulness/mean" for s in (0.0, 0.5, 1.0)} <= set(ev.metrics)
    assert (summary.run_path / "iter-0002" / "evaluate" / ev.key / "merge" / "s0.5" / "metrics.json").is_file()
    rows = {r["run_name"]: r for r in compare_runs([nft_run.name, "arc"], ph.mlflow_uri(base))}
    names = (nft_run.name, "arc")
    rewards = [{k for k in rows[n]["metrics"] if k.startswith(("reward/", "eval/reward/"))} for n in names]
    assert rewards[0] and rewards[0] == rewards[1], "NFT and AR-CoPO log rewards under the same names"


def test_buffer_key_ignores_the_run_name_and_follows_the_semi_settings(tmp_path):
    a = _cfg(tmp_path, "name=run-a")
    b = _cfg(tmp_path / "elsewhere", "name=run-b")
    assert arcopo_buffer.STAGE.config_subset(a) == arcopo_buffer.STAGE.config_subset(b)
    c = _cfg(tmp_path, "name=run-a", "arcopo.semi.seed=5")
    assert arcopo_buffer.STAGE.config_subset(a) != arcopo_buffer.STAGE.config_subset(c)
    bc = arcopo_buffer.buffer_config(_cfg(tmp_path, "arcopo.semi.reward_weights={text_color_match: 1.0}"))
    assert {s.name: s.weight for s in bc.rewards.rewards} == {"colorfulness": 0.0, "smoothness": 0.0,
                                                              "text_color_match": 1.0}
    assert bc.rollout.prompts_per_iteration == a.arcopo.semi.groups_per_part and bc.rollout.seed == a.arcopo.semi.seed
