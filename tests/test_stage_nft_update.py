"""nft_update stage on a real tiny rollout (filter -> rollout -> score -> label -> update) and the plan."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.checkpoint import checkpoint as torch_checkpoint

from astrolabe.artifacts.stagedir import stage_root
from astrolabe.build import build_dit
from astrolabe.config import load_config
from astrolabe.data.arrays import read_columns, write_columns
from astrolabe.models.registry import get_base_model
from astrolabe.models.wan import dit as dit_module
from astrolabe.models.wan.config import tiny
from astrolabe.parallel import ParallelConfig, parallelize
from astrolabe.rl import lockstep
from astrolabe.rl.accumulation import accumulate_gradients
from astrolabe.rl.rng import CheckpointError
from astrolabe.rl.state import read_controller_state
from astrolabe.rl.update_states import build_training_state
from stages import filter_prompts, label_uncertainty, nft_update, rollout, score
from astrolabe.artifacts.engine import execute
from astrolabe.artifacts.plan import build_plan, eval_points, plan_status
from astrolabe.artifacts.stage import StageInfo, StageResult
from stages import STAGES
from spawn_helpers import free_port, run_ranks

OVERRIDES = [
    "rollout.prompts_per_iteration=2", "rollout.group_size=2", "rl.optim.precision=fp32", "rl.optim.lr=1e-3",
    "rl.lora.rank=4", "rl.lora.alpha=4", "rl.micro_batch_size=2", "rl.epochs=1",
]


def _out(run: Path, m) -> Path:
    return stage_root(run, m.stage, m.iteration) / m.key


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = load_config("configs/tiny.yaml", OVERRIDES + [f"pipeline.runs_root={run.parent}"])
    p = _out(run, execute(filter_prompts, cfg, run, {}))
    r = _out(run, execute(rollout, cfg, run, {"prompts": p}, 0))
    s = _out(run, execute(score, cfg, run, {"rollout": r}, 0))
    lab = _out(run, execute(label_uncertainty, cfg, run, {"rollout": r, "score": s}, 0))
    m = execute(nft_update, cfg, run, {"rollout": r, "labels": lab}, 0)
    return cfg, run, r, lab, m


def test_update_writes_a_complete_checkpoint_that_moved_the_lora(chain):
    cfg, run, _, _, m = chain
    state = nft_update.checkpoint_state_dir(_out(run, m))
    lora = load_file(str(state / "lora" / "adapter_model.safetensors"))
    old = load_file(str(state / "adapters" / "old.safetensors"))
    b = [v for k, v in lora.items() if "lora_B" in k]
    assert b and all(float(t.abs().max()) > 0 for t in b)  # B starts at 0: every B moved
    assert set(old) == set(lora)  # same layout: the next rollout can sample with it
    assert m.counts["trained"] == 4 and m.counts["skipped_nan_r"] == 0
    assert m.counts["optimizer_steps"] == 2  # 2 groups x (2 candidates / micro-batch 2), accumulation 1
    # the old-policy decay counts iterations (1 completed), not the 2 optimizer steps: min(0.001 * 1, 0.5)
    assert m.metrics["update/old_decay"] == pytest.approx(0.001)
    assert math.isfinite(m.metrics["loss/total"])
    assert m.timings["peak_rss_mib"] > 0


def test_update_is_deterministic_and_next_iteration_needs_the_checkpoint(chain, tmp_path):
    cfg, run, r, lab, m = chain
    out = tmp_path / "again"
    out.mkdir()
    nft_update.run(cfg, {"rollout": r, "labels": lab}, out, 0)
    a = load_file(str(nft_update.checkpoint_state_dir(_out(run, m)) / "lora" / "adapter_model.safetensors"))
    b = load_file(str(out / "state" / "lora" / "adapter_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError, match="needs inputs\\['checkpoint'\\]"):
        nft_update.run(cfg, {"rollout": r, "labels": lab}, tmp_path / "x", 1)


def test_checkpoint_holds_the_controller_the_labels_handed_on(chain, tmp_path):
    cfg, run, r, lab, m = chain
    handed = json.loads((lab / "controller.json").read_text())["state"]
    assert handed["buffer"]  # iteration 0's labelling fed the controller
    assert read_controller_state(nft_update.checkpoint_state_dir(_out(run, m))) == handed
    fake = tmp_path / "labels"
    shutil.copytree(lab, fake)
    (fake / "controller.json").unlink()
    with pytest.raises(CheckpointError, match="controller.json is missing"):
        nft_update.run(cfg, {"rollout": r, "labels": fake}, tmp_path / "o", 0)


def test_update_runs_through_parallelize_and_the_one_accumulation(chain, tmp_path, monkeypatch):
    """Production calls parallelize(cfg.parallel) and accumulate_gradients with the micro-batch sample counts,
    and activation checkpointing really engages in the update (the DiT checkpoints its blocks)."""
    cfg, run, r, lab, _ = chain
    cfg = cfg.model_copy(update={"parallel": ParallelConfig(activation_checkpointing=True),
                                 "rl": cfg.rl.model_copy(update={"micro_batch_size": 1, "accumulation_steps": 3})})
    seen = {"parallelize": [], "sizes": [], "checkpointed": 0}

    def spy_parallelize(model, pcfg, mesh=None):
        seen["parallelize"].append(pcfg)
        return parallelize(model, pcfg, mesh)

    def spy_accumulate(state, loss_fn, micro_batches, sizes, **kw):
        seen["sizes"].append(list(sizes))
        return accumulate_gradients(state, loss_fn, micro_batches, sizes, **kw)

    def spy_checkpoint(fn, *args, **kw):
        seen["checkpointed"] += 1
        return torch_checkpoint(fn, *args, **kw)

    monkeypatch.setattr(nft_update, "parallelize", spy_parallelize)
    monkeypatch.setattr(nft_update, "accumulate_gradients", spy_accumulate)
    monkeypatch.setattr(dit_module, "checkpoint", spy_checkpoint)
    res = nft_update.run(cfg, {"rollout": r, "labels": lab}, tmp_path / "o", 0)
    assert seen["parallelize"] == [cfg.parallel]
    assert seen["sizes"] == [[1, 1, 1], [1]] and res.counts["optimizer_steps"] == 2  # 4 micro-batches of 1
    assert seen["checkpointed"] == 4 * len(dit_module.WanDiT(tiny()).blocks)  # each trained forward, each block
    with pytest.raises(RuntimeError, match="parallel.strategy='ddp' needs an initialised"):
        nft_update.run(cfg.model_copy(update={"parallel": ParallelConfig(strategy="ddp")}),
                       {"rollout": r, "labels": lab}, tmp_path / "o2", 0)


# ----------------------------------------------------------------------------------- 2 gloo ranks

# micro-batches of 1 sample, 3 per step: step 1 = 2 micro-batches on rank 0 + 1 on rank 1, step 2 = 1 on rank 0
# and none on rank 1 (it still takes part in the reduction)
RANK_OVERRIDES = ["rl.micro_batch_size=1", "rl.accumulation_steps=3"]


def _rank_worker(rank: int, port: int, runs: dict[str, list[str]], inputs: dict, root: str) -> None:
    """One of 2 gloo ranks: iteration 0 of nft_update for each labelled override set, one process group."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from astrolabe.distributed import init_distributed

    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        for label, overrides in runs.items():
            run = Path(root, label)
            m = execute(nft_update, load_config("configs/tiny.yaml", overrides), run, inputs, 0)
            Path(root, f"{label}-r{rank}.json").write_text(json.dumps({
                "dir": str(_out(run, m)), "extra": m.extra, "world_size": m.world_size, "counts": m.counts,
                "metrics": m.metrics}))
    finally:
        torch.distributed.destroy_process_group()


def _state_tensors(state: Path, optimizer: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of a TrainingState directory: adapters (PEFT + stored policies), optimizer state, the update's
    generators (not the process-global RNG states: the test processes differ in what ran before)."""
    out = {}
    for f in [state / "lora" / "adapter_model.safetensors", *sorted((state / "adapters").glob("*.safetensors"))]:
        out |= {f"{f.relative_to(state)}:{k}": v for k, v in load_file(str(f)).items()}
    if optimizer:
        opt = torch.load(state / "optimizer.pt", weights_only=False)["optimizer"]["state"]
        out |= {f"optimizer:{i}:{k}": v for i, st in opt.items() for k, v in st.items() if torch.is_tensor(v)}
    rng = torch.load(state / "rng.pt", weights_only=False)
    out |= {f"rng:{k}": v for k, v in rng["torch_generators"].items()}
    return out


FSDP = ["parallel.strategy=fsdp", "parallel.fsdp_param_dtype=float32"]  # fp32 params on CPU: equal to 1 process


def _loaded_state_tensors(cfg, state: Path) -> dict[str, torch.Tensor]:
    """:func:`_state_tensors` of a checkpoint as a fresh state loads it in this process (a DCP one resharded to one
    rank, no process group): the live adapters and EMA, the optimizer state in parameter order, the generators."""
    base = get_base_model(cfg.model.base)
    st = build_training_state(cfg.rl, build_dit(cfg.model, base))
    st.load(state)
    out = {f"lora/adapter_model.safetensors:{k}": v for k, v in st.policies.tensors("default").items()}
    for name in st.policies.stored_policies():
        out |= {f"adapters/{name}.safetensors:{k}": v for k, v in st.policies.tensors(name).items()}
    opt = st.optimizer.state_dict()["state"]
    out |= {f"optimizer:{i}:{k}": v for i, s in opt.items() for k, v in s.items() if torch.is_tensor(v)}
    return out | {f"rng:{k}": g.get_state() for k, g in st.generators.items()}


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and any(k.startswith("optimizer:") for k in a)
    assert [k for k in a if k.startswith("rng:") and not torch.equal(a[k], b[k])] == []  # generators advanced alike
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if not k.startswith("rng:"))


@pytest.fixture(scope="module")
def two_rank_runs(chain, tmp_path_factory):
    """Iteration 0 on 2 gloo ranks under DDP and under FSDP (one spawn), and in one process (the reference)."""
    cfg, run, r, lab, _ = chain
    root = tmp_path_factory.mktemp("ranks")
    overrides = [*OVERRIDES, *RANK_OVERRIDES, f"pipeline.runs_root={run.parent}"]
    one = root / "one"
    one.mkdir()
    res1 = nft_update.run(load_config("configs/tiny.yaml", overrides), {"rollout": r, "labels": lab}, one, 0)
    assert res1.extra == {"world_size": 1, "samples_per_rank": [4]}
    runs = {"ddp": [*overrides, "parallel.strategy=ddp"], "fsdp": [*overrides, *FSDP]}
    port = free_port()
    codes = run_ranks(_rank_worker, lambda k: (k, port, runs, {"rollout": r, "labels": lab}, str(root)), timeout=240)
    assert codes == [0, 0]
    ranks = {label: [json.loads((root / f"{label}-r{k}.json").read_text()) for k in range(2)] for label in runs}
    return SimpleNamespace(overrides=overrides, one=one, res1=res1, **ranks)


def _same_run_on_both_ranks(m0: dict, m1: dict, res1) -> None:
    assert m0 == m1
    assert m0["world_size"] == 2 and m0["extra"] == {"world_size": 2, "samples_per_rank": [3, 1]}
    assert m0["counts"] == res1.counts
    for k in ("loss/total", "update/grad_norm"):
        assert m0["metrics"][k] == pytest.approx(res1.metrics[k], rel=1e-5, abs=1e-7), k


def test_two_rank_ddp_update_equals_the_one_process_update(two_rank_runs):
    t = two_rank_runs
    m0, m1 = t.ddp
    _same_run_on_both_ranks(m0, m1, t.res1)
    a, b = _state_tensors(t.one / "state"), _state_tensors(Path(m0["dir"]) / "state")
    assert {"rng:sigma", "rng:noise", "rng:shuffle"} <= a.keys()
    worst = _max_diff(a, b)
    print(f"2-rank DDP vs 1 process: max abs diff {worst:.3g}")
    assert worst <= 1e-5


def test_two_rank_fsdp_update_equals_the_one_process_update(two_rank_runs, chain):
    t = two_rank_runs
    m0, m1 = t.fsdp
    _same_run_on_both_ranks(m0, m1, t.res1)
    cands, _ = nft_update.read_candidates(chain[2], chain[3])
    assert len({c.prefix.shape[0] for c in cands}) > 1  # prefixes of unequal length: the ranks ran idle forwards
    state = Path(m0["dir"]) / "state"
    assert sorted(p.name for p in (state / "dcp").iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
    assert not (state / "optimizer.pt").exists()  # the optimizer state is sharded, in dcp/
    got = _loaded_state_tensors(load_config("configs/tiny.yaml", [*t.overrides, *FSDP]), state)
    want = _state_tensors(t.one / "state")
    worst = _max_diff(want, got)
    files = {k: v for k, v in _state_tensors(state, optimizer=False).items() if not k.startswith("rng:")}
    assert max(float((v - got[k]).abs().max()) for k, v in files.items()) == 0.0  # rank 0's copies = the DCP state
    print(f"2-rank FSDP vs 1 process: max abs diff {worst:.3g}")
    assert worst <= 1e-5


def test_two_rank_fsdp_checkpoint_resumes_in_one_process(two_rank_runs, chain, tmp_path):
    """Iteration 1 in one process (FSDP over one rank: no process group) from the 2-rank DCP checkpoint equals
    iteration 1 from the 1-process checkpoint."""
    overrides, one, m0 = two_rank_runs.overrides, two_rank_runs.one, two_rank_runs.fsdp[0]
    _, _, r, lab, _ = chain
    cfg_one, cfg_fsdp = (load_config("configs/tiny.yaml", o) for o in (overrides, [*overrides, *FSDP]))
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    res_a = nft_update.run(cfg_one, {"rollout": r, "labels": lab, "checkpoint": one}, a, 1)
    res_b = nft_update.run(cfg_fsdp, {"rollout": r, "labels": lab, "checkpoint": Path(m0["dir"])}, b, 1)
    assert res_b.extra == {"world_size": 1, "samples_per_rank": [4]} and res_b.counts == res_a.counts
    assert (b / "state" / "dcp" / ".metadata").is_file()  # one rank still writes DCP: it can grow back to N
    worst = _max_diff(_state_tensors(a / "state"), _loaded_state_tensors(cfg_fsdp, b / "state"))
    print(f"iteration 1 from the 2-rank FSDP checkpoint vs from the 1-process one: max abs diff {worst:.3g}")
    assert worst <= 1e-5


def test_lockstep_plan_pads_ranks_to_the_same_forwards():
    """FSDP: rank 1 holds one micro-batch of a 3-micro-batch step, so it pads with a zero-weight copy of the first;
    at each position the rank with the shorter prefix runs idle forwards up to the longer one's context passes."""
    passes = {0: 2, 1: 0, 2: 1}
    plan = lockstep.lockstep_plan([[0], [1], [2]], 2, lambda idx: passes[idx[0]])
    assert plan == [[([0], 0, True), ([1], 2, True)], [([2], 1, True), ([0], 0, False)]]
    for world in (1, 2, 3, 5):
        for n in (1, 2, 4, 7):
            plan = lockstep.lockstep_plan([[i] for i in range(n)], world, lambda idx: idx[0] % 3)
            assert len({len(r) for r in plan}) == 1  # as many micro-batches on every rank
            for pos in zip(*plan):  # as many no-grad forwards on every rank at every position
                assert len({idle + idx[0] % 3 for idx, idle, _ in pos}) == 1
            assert [i for r in plan for idx, _, real in r if real for i in idx] == list(range(n))


def test_nan_group_is_skipped_and_all_nan_is_an_error(chain, tmp_path):
    cfg, run, r, lab, _ = chain
    keys, cols, attrs = read_columns(lab / "labels.zarr")
    rr = cols["r"].copy()
    rr[:2] = np.nan  # the first group
    fake = tmp_path / "labels"
    fake.mkdir()
    shutil.copy(lab / "controller.json", fake / "controller.json")
    write_columns(fake / "labels.zarr", keys, {**cols, "r": rr}, attrs=attrs)
    res = nft_update.run(cfg, {"rollout": r, "labels": fake}, tmp_path / "o1", 0)
    assert res.counts["skipped_nan_r"] == 2 and res.counts["trained"] == 2
    write_columns(fake / "labels.zarr", keys, {**cols, "r": np.full_like(rr, np.nan)}, attrs=attrs)
    with pytest.raises(ValueError, match="no trainable sample"):
        nft_update.run(cfg, {"rollout": r, "labels": fake}, tmp_path / "o2", 0)


def test_rollout_after_update_samples_the_old_policy(chain):
    cfg, run, r, lab, m = chain
    p = next(stage_root(run, "filter_prompts").iterdir())
    m1 = execute(rollout, cfg, run, {"prompts": p, "checkpoint": _out(run, m)}, 1)
    assert m1.extra["policy"] == str(_out(run, m))


def test_plan_wiring_and_status():
    cfg = load_config("configs/tiny.yaml", ["pipeline.iterations=3", "pipeline.eval_every=2"])
    assert eval_points(cfg) == [0, 2, 3]
    plan = {n.id: dict(n.inputs) for n in build_plan(cfg)}
    assert plan[("rollout", 0)] == {"prompts": ("filter_prompts", None)}
    assert plan[("rollout", 2)]["checkpoint"] == ("nft_update", 1)
    # selective KL on in tiny: the KL controller is read from the previous training checkpoint
    assert plan[("label_uncertainty", 1)]["checkpoint"] == ("nft_update", 0)
    assert "checkpoint" not in plan[("label_uncertainty", 0)]
    off = load_config("configs/tiny.yaml", ["pipeline.iterations=2", "rl.selective_kl=null"])
    assert "checkpoint" not in dict(next(n for n in build_plan(off) if n.id == ("label_uncertainty", 1)).inputs)
    assert plan[("nft_update", 1)] == {"rollout": ("rollout", 1), "labels": ("label_uncertainty", 1),
                                       "checkpoint": ("nft_update", 0)}
    assert plan[("evaluate", 2)]["checkpoint"] == ("nft_update", 1) and ("evaluate", 1) not in plan
    assert plan[("evaluate", 3)]["baseline"] == ("evaluate", 0)


def test_status_done_stale_missing_and_forced_instance(tmp_path):
    """A forced rerun of a stage makes its consumers stale; upstream stays done."""
    calls = []

    def mod(name):
        def run(cfg, inputs, out, it):
            calls.append(name)
            (out / "x.txt").write_text(name)
            return StageResult()

        info = StageInfo(name=name, code_version="1", config_subset=lambda c: {}, per_iteration=False)
        return type("M", (), {"STAGE": info, "run": staticmethod(run)})

    a, b = mod("a"), mod("b")
    cfg = load_config("configs/tiny.yaml")
    ma = execute(a, cfg, tmp_path, {})
    mb = execute(b, cfg, tmp_path, {"a": _out(tmp_path, ma)})
    assert execute(b, cfg, tmp_path, {"a": _out(tmp_path, ma)}).key == mb.key  # cached
    ma2 = execute(a, cfg, tmp_path, {}, force=True)
    assert ma2.key == ma.key and ma2.instance and ma2.created != ma.created
    mb2 = execute(b, cfg, tmp_path, {"a": _out(tmp_path, ma2)})
    assert mb2.key != mb.key  # the consumer of the forced output is recomputed
    assert calls == ["a", "b", "a", "b"]
    # the real plan on an empty run: everything missing
    assert {s.status for s in plan_status(cfg, tmp_path / "empty", STAGES)} == {"missing"}


SCENE_LINES = ["a red fox runs in snow[1s] | waves crash on rocks", "city lights at night[1s#] | a cat sleeps on a sofa"]


def test_scene_records_replay_the_rollouts_prompt_switches(tmp_path):
    """Two-scene training lines, window = the last block: the update conditions the window on its scene's text and
    rebuilds the prefix cache with the rollout's switches (soft for line 1, a cut for line 2), equal to the cache of
    a hand-driven stream; the stage trains on these records end to end."""
    from astrolabe.build import build_generation_stack
    from astrolabe.rl.streaming_update import build_prefix_cache
    from astrolabe.sampling.streaming import BlockStreamer, SampleNoise

    prompts = tmp_path / "train.txt"
    prompts.write_text("\n".join(SCENE_LINES) + "\n")
    cfg = load_config("configs/tiny.yaml", OVERRIDES + [
        f"pipeline.runs_root={tmp_path}", f"data.train_prompts={prompts}", "rollout.window_start=last",
        "rollout.num_latent_frames=9"])
    run = tmp_path / "run"
    p = _out(run, execute(filter_prompts, cfg, run, {}))
    r = _out(run, execute(rollout, cfg, run, {"prompts": p}, 0))
    sc = _out(run, execute(score, cfg, run, {"rollout": r}, 0))
    labels = _out(run, execute(label_uncertainty, cfg, run, {"rollout": r, "score": sc}, 0))
    cands, _ = nft_update.read_candidates(r, labels)
    stack, _ = build_generation_stack(cfg)
    contexts = {t: stack.encode_text([t]) for t in
                ["a red fox runs in snow", "waves crash on rocks", "city lights at night", "a cat sleeps on a sofa"]}
    stream = stack.stream
    for c in cands:
        line = next(x for x in SCENE_LINES if x.startswith(c.scenes[0].prompt))
        assert c.prompt == line.split("| ")[1] and len(c.scenes) == 2
        idx = [i for i, d in enumerate(cands) if d.group == c.group]
        batch = nft_update.make_batch(cands, idx, contexts, torch.device("cpu"), torch.float32, stream.block_frames)
        assert torch.equal(batch.context[0], contexts[c.prompt][0])
        hard = "#" in line
        assert [(s.frame, s.hard) for s in batch.switches] == [(3, hard)]
        assert nft_update.context_passes(cands, idx, cfg, stream) == 2 + (not hard)
        s = BlockStreamer(stack.dit, stream, contexts[c.scenes[0].prompt], SampleNoise([0]))
        s.commit(torch.from_numpy(c.prefix[None, :3]))
        s.switch_prompt(contexts[c.prompt], hard=hard)
        s.commit(torch.from_numpy(c.prefix[None, 3:]))
        cache = build_prefix_cache(stack.dit, stream, batch.prefix_context, batch.prefix_latents, len(idx),
                                   batch.switches)
        assert cache.positions == s.cache.positions
        for a, b in zip(cache.self_kv, s.cache.self_kv):
            assert torch.allclose(a.k[:1], b.k, atol=1e-6) and torch.allclose(a.v[-1:], b.v, atol=1e-6)
    m = execute(nft_update, cfg, run, {"rollout": r, "labels": labels}, 0)
    assert m.counts["trained"] == 4 and math.isfinite(m.metrics["loss/total"])


@pytest.mark.parametrize("noise_per", ["sample", "micro_batch"])
def test_skip_noise_advances_the_generators_as_training_the_micro_batch_would(noise_per):
    """A rank skips the other ranks' micro-batches with skip_noise; its generators must then be where the
    single process's are after drawing those micro-batches' noise, for either rl.update.noise_per."""
    from astrolabe.build import stream_config
    from astrolabe.rl.streaming_update import draw_training_noise

    cfg = load_config(Path("configs/tiny.yaml"), [f"rl.update.noise_per={noise_per}"])
    base = get_base_model(cfg.model.base)
    stream = stream_config(cfg.model, base)
    window = np.zeros((3, 16, 4, 4), np.float32)
    cands = [nft_update.Candidate(f"k{i}", "g", "p", window[:0], window, 0.5, False) for i in range(3)]
    gens = {"sigma": torch.Generator().manual_seed(1), "noise": torch.Generator().manual_seed(2)}
    nft_update.skip_noise(cands, [0, 1, 2], torch.float32, stream, cfg, gens, base.flow_shift)
    sigma_g, noise_g = torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)
    draw_training_noise(torch.ones(3, *window.shape), stream, cfg.rl.nft, sigma_g, noise_g, cfg.rl.update.sigma_per,
                        base.flow_shift, noise_per)  # fmt: skip
    assert torch.equal(gens["sigma"].get_state(), sigma_g.get_state())
    assert torch.equal(gens["noise"].get_state(), noise_g.get_state())
