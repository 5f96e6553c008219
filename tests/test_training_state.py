"""TrainingState: optimizer steps, gradient accumulation, atomic save / strict load, RNG resume."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from peft import PeftModel

from astrolabe.models.wan.config import tiny
from astrolabe.models.wan.dit import WanDiT
from astrolabe.rl.lora import LoRAConfig, LoraMismatchError, adapter_parameters, load_lora_model
from astrolabe.rl.policies import PolicyConfig, PolicySet
from astrolabe.rl.schedules import PolicyAveragingConfig
from astrolabe.rl.selective_kl import FractionController, SelectiveKLConfig
from astrolabe.rl.accumulation import accumulate_gradients, accumulate_step
from astrolabe.rl.state import CheckpointError, OptimConfig, TrainingState, lr_factor, read_controller_state

LORA = LoRAConfig(rank=4, alpha=8.0)
OPTIM = OptimConfig(lr=1e-3, precision="fp32")
POLICY = PolicyConfig(averaging=PolicyAveragingConfig(old_policy_decay="release_linear", ema=True), reference="lagging")
KL = SelectiveKLConfig(main_reward="hps", auxiliary_rewards=("mq",))


def base_model(seed=0):
    m = WanDiT(tiny())
    m.init_weights(torch.Generator().manual_seed(seed))
    return m.eval()


def make_state(lora_seed=7, lora=LORA, policy=POLICY, optim=OPTIM, controller=True):
    ps = PolicySet.build(base_model(), lora, policy, generator=torch.Generator().manual_seed(lora_seed))
    return TrainingState(ps, optim, FractionController(KL) if controller else None)


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 16, 4, 4, generator=g)
    ctx = torch.randn(n, 4, 32, generator=g)
    target = torch.randn(n, 3, 16, 4, 4, generator=g)
    return x, torch.full((n,), 500.0), ctx, target


def loss_fn(model):
    def f(mb):
        x, t, ctx, target = mb
        return (model(x, t, ctx) - target).pow(2).mean()
    return f


def split(b):
    return [tuple(v[i : i + 1] for v in b) for i in range(b[0].shape[0])]


@torch.no_grad()
def randomize_(model, adapter, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model, adapter).values():
        p.copy_(torch.randn(p.shape, generator=g) * scale)


def snap(model, adapter):
    return {k: p.detach().clone() for k, p in adapter_parameters(model, adapter).items()}


def train_steps(state, n, seed=1):
    for i in range(n):
        accumulate_step(state, loss_fn(state.policies.model), [batch(2, seed + i)], [2])


def test_step_changes_every_default_lora_tensor_and_nothing_else():
    st = make_state()
    model = st.policies.model
    randomize_(model, "default", 3)  # B != 0 so every A also gets a gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ema_before = {k: v.clone() for k, v in st.policies.ema.items()}
    loss, stats = accumulate_step(st, loss_fn(model), [batch()], [4])
    assert stats.step == 1 and st.step == 1 and stats.lr == pytest.approx(1e-3) and stats.grad_norm > 0
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    default = {n for n in before if ".lora_A.default." in n or ".lora_B.default." in n}
    assert changed == default
    for n in default:  # every element moved (Adam's first step moves each by about lr)
        assert (dict(model.named_parameters())[n] != before[n]).all(), n
    assert all(p.grad is None for n, p in model.named_parameters())  # zeroed (set_to_none)
    # EMA at step 0: reset to theta then d = 0.1 blend of equal values
    assert any(not torch.equal(st.policies.ema[k], ema_before[k]) for k in ema_before)
    assert all(torch.allclose(st.policies.ema[k], p, atol=1e-7) for k, p in st.policies.parameters_of("default").items())


def test_old_and_ref_never_get_gradients():
    st = make_state()
    model = st.policies.model
    randomize_(model, "default", 3)
    x, t, ctx, target = batch()
    with torch.no_grad(), st.policies.use("old") as m:
        o = m(x, t, ctx)
    with torch.no_grad(), st.policies.use("ref") as m:
        g = m(x, t, ctx)
    f = model(x, t, ctx)
    st.backward(((f - target) ** 2).mean() + ((f - o) ** 2).mean() + ((f - g) ** 2).mean())
    for n, p in model.named_parameters():
        has = p.grad is not None
        assert has == (".default." in n), n


def test_gradient_accumulation_equivalence():
    """micro-batch 1 x accumulation 4 == micro-batch 4 x accumulation 1 on a mean loss."""
    a, b = make_state(), make_state()
    for st in (a, b):
        randomize_(st.policies.model, "default", 3)
    data = batch(4)
    la = accumulate_gradients(a, loss_fn(a.policies.model), split(data), [1, 1, 1, 1])
    lb = accumulate_gradients(b, loss_fn(b.policies.model), [data], [4])
    assert la == pytest.approx(lb, rel=1e-5)
    ga = {k: p.grad.clone() for k, p in a.policies.parameters_of("default").items()}
    for k, p in b.policies.parameters_of("default").items():
        assert torch.allclose(ga[k], p.grad, rtol=1e-4, atol=1e-7), k
    # an un-normalised sum of micro-batch losses would give 4x the gradient
    assert not torch.allclose(4 * ga[k], p.grad, rtol=1e-2)
    a.optimizer_step(), b.optimizer_step()
    for k, p in b.policies.parameters_of("default").items():
        assert torch.allclose(a.policies.parameters_of("default")[k], p, atol=1e-6), k


def test_unequal_micro_batches_give_the_mean_loss_gradient():
    """Micro-batches of 1 and 3 samples: sample weighting gives the gradient of the mean over the 4 samples
    (weights 1/4 and 3/4); the old equal weighting (1/2 each) would not."""
    a, b = make_state(), make_state()
    for st in (a, b):
        randomize_(st.policies.model, "default", 3)
    data = batch(4)
    parts = [tuple(v[:1] for v in data), tuple(v[1:] for v in data)]
    la = accumulate_gradients(a, loss_fn(a.policies.model), parts, [1, 3])
    lb = accumulate_gradients(b, loss_fn(b.policies.model), [data], [4])
    assert la == pytest.approx(lb, rel=1e-5)
    ga = {k: p.grad.clone() for k, p in a.policies.parameters_of("default").items()}
    for k, p in b.policies.parameters_of("default").items():
        assert torch.allclose(ga[k], p.grad, rtol=1e-4, atol=1e-7), k
    c = make_state()
    randomize_(c.policies.model, "default", 3)
    f = loss_fn(c.policies.model)
    (0.5 * f(parts[0]) + 0.5 * f(parts[1])).backward()  # equal weighting of unequal micro-batches
    assert any(not torch.allclose(ga[k], p.grad, rtol=1e-3) for k, p in c.policies.parameters_of("default").items())
    with pytest.raises(ValueError, match="sizes"):
        accumulate_gradients(a, f, parts, [4])


def test_controller_piece_read_alone_and_missing_is_an_error(tmp_path):
    st = make_state()
    st.controller.update([0.5, 1.0])
    path = st.save(tmp_path / "c")
    assert read_controller_state(path) == st.controller.state_dict()
    assert read_controller_state(make_state(controller=False).save(tmp_path / "n")) is None
    (path / "state.json").write_text("{}")  # size differs from the manifest
    with pytest.raises(CheckpointError, match="state.json"):
        read_controller_state(path)
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        read_controller_state(tmp_path / "nothing")


def test_grad_clip_and_warmup():
    assert [lr_factor(s, 4) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert lr_factor(0, 0) == 1.0
    st = make_state(optim=OptimConfig(lr=1e-3, precision="fp32", warmup_steps=2, grad_clip=1e-3))
    randomize_(st.policies.model, "default", 3)
    lrs = []
    for i in range(3):
        st.backward(loss_fn(st.policies.model)(batch(2, i)))
        params = st.policies.trainable_parameters()
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        stats = st.optimizer_step()
        assert stats.grad_norm == pytest.approx(float(norm), rel=1e-5)
        lrs.append(stats.lr)
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3])
    with pytest.raises(ValueError, match="beta"):
        OptimConfig(betas=(0.9, 1.0))


def all_tensors(st):
    ps = st.policies
    out = {f"{n}/{k}": v for n in ("default", "old", "ref") for k, v in ps.tensors(n).items()}
    out |= {f"ema/{k}": v for k, v in ps.tensors("ema").items()}
    for i, s in st.optimizer.state_dict()["state"].items():
        out |= {f"opt/{i}/{k}": v for k, v in s.items()}
    return out


def trained_state(tmp_path):
    st = make_state()
    g_torch, g_np = torch.Generator().manual_seed(11), np.random.default_rng(12)
    st.register_generator("noise", g_torch)
    st.register_generator("prompts", g_np)
    train_steps(st, 2)
    st.update_old(1)  # end of iteration 0
    st.policies.refresh_ref(2)
    train_steps(st, 1, seed=5)
    st.controller.update([0.5, 1.0, 2.0])
    st.controller.update([3.0, 4.0])
    st.extra = {"sampler_position": 17, "epoch": 3}
    torch.randn(5, generator=g_torch)
    g_np.random(3)
    return st, g_torch, g_np


def draws(g_torch, g_np):
    return (torch.randn(4), np.random.rand(3), random.random(), torch.randn(4, generator=g_torch), g_np.random(3))


def assert_draws_equal(a, b):
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]
    assert torch.equal(a[3], b[3]) and np.array_equal(a[4], b[4])


def test_save_load_round_trip_restores_everything(tmp_path):
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    st, g_torch, g_np = trained_state(tmp_path)
    path = st.save(tmp_path / "ckpt")
    after_save = draws(g_torch, g_np)
    files = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()}
    assert {"lora/adapter_model.safetensors", "lora/adapter_config.json", "adapters/old.safetensors",
            "adapters/ref.safetensors", "adapters/ema.safetensors", "optimizer.pt", "state.json", "rng.pt",
            "manifest.json"} <= files
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["pieces"]) == {"lora", "old", "ref", "ema", "optimizer", "state", "rng"}
    assert not list(tmp_path.glob(".ckpt.*"))

    fresh = make_state(lora_seed=99)  # different init: everything must come from the checkpoint
    g2_torch, g2_np = torch.Generator().manual_seed(0), np.random.default_rng(0)
    fresh.register_generator("noise", g2_torch)
    fresh.register_generator("prompts", g2_np)
    torch.randn(7), np.random.rand(2), random.random()  # move the global streams elsewhere
    fresh.load(path, verify_checksums=True)
    assert_draws_equal(draws(g2_torch, g2_np), after_save)

    ta, tb = all_tensors(st), all_tensors(fresh)
    assert ta.keys() == tb.keys() and len(ta) == 4 * 40 + 3 * 40  # 4 policies x 40 LoRA tensors + AdamW (step, exp_avg, exp_avg_sq)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert fresh.step == st.step == 3
    assert fresh.extra == {"sampler_position": 17, "epoch": 3}
    assert fresh.controller.state_dict() == st.controller.state_dict()
    ref_state = fresh.policies.refresher.state_dict()
    assert ref_state == st.policies.refresher.state_dict()
    # refreshed at iteration 2, 2 after the start (< quick_refresh_iterations): threshold raised 0.15 -> 0.16
    assert ref_state == {"threshold": pytest.approx(0.16), "last_refresh_iteration": 2, "n_refreshes": 1}
    assert fresh.scheduler.state_dict()["last_epoch"] == st.scheduler.state_dict()["last_epoch"] == 3
    assert fresh.optimizer.state_dict()["param_groups"] == st.optimizer.state_dict()["param_groups"]

    # resume equivalence: one more identical step on both gives identical weights
    train_steps(st, 1, seed=9), train_steps(fresh, 1, seed=9)
    for k, p in st.policies.parameters_of("default").items():
        assert torch.equal(p, fresh.policies.parameters_of("default")[k]), k


def test_distributed_checkpoint_round_trip_in_one_process(tmp_path):
    """``distributed_checkpoint`` (FSDP) without a process group: adapters, EMA and optimizer through DCP in
    ``dcp/``, the PEFT/safetensors copies beside it; a fresh state reads it whatever its own setting."""
    st, _, _ = trained_state(tmp_path)
    st.distributed_checkpoint = True
    path = st.save(tmp_path / "ckpt")
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["pieces"]) == {"lora", "old", "ref", "ema", "sharded", "state", "rng"}
    assert manifest["pieces"]["sharded"] == ["dcp/.metadata", "dcp/__0_0.distcp"] and not (path / "optimizer.pt").exists()
    fresh = make_state(lora_seed=99)
    fresh.register_generator("noise", torch.Generator())
    fresh.register_generator("prompts", np.random.default_rng())
    fresh.load(path, verify_checksums=True)
    ta, tb = all_tensors(st), all_tensors(fresh)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert fresh.step == st.step == 3 and fresh.scheduler.state_dict() == st.scheduler.state_dict()
    assert fresh.optimizer.state_dict()["param_groups"] == st.optimizer.state_dict()["param_groups"]
    train_steps(st, 1, seed=9), train_steps(fresh, 1, seed=9)
    for k, p in st.policies.parameters_of("default").items():
        assert torch.equal(p, fresh.policies.parameters_of("default")[k]), k
    (path / "dcp" / "__0_0.distcp").unlink()
    with pytest.raises(CheckpointError, match="'sharded' piece"):
        fresh.load(path)


def test_checkpoint_lora_loads_with_peft_from_pretrained(tmp_path):
    st, _, _ = trained_state(tmp_path)
    path = st.save(tmp_path / "ckpt")
    x, t, ctx, _ = batch(1)
    with torch.no_grad():
        y = st.policies.model(x, t, ctx)
        assert torch.equal(PeftModel.from_pretrained(base_model(), path / "lora")(x, t, ctx), y)
        assert torch.equal(load_lora_model(base_model(), path)(x, t, ctx), y)
        with st.policies.use("ref") as m:
            assert not torch.equal(m(x, t, ctx), y)  # the checkpoint's lora/ is the trained adapter


def test_missing_piece_is_an_error_naming_it(tmp_path):
    st, _, _ = trained_state(tmp_path)
    path = st.save(tmp_path / "ckpt")
    for rel, name in [("adapters/old.safetensors", "'old'"), ("adapters/ema.safetensors", "'ema'"),
                      ("rng.pt", "'rng'"), ("optimizer.pt", "'optimizer'"), ("lora/adapter_model.safetensors", "'lora'")]:
        broken = tmp_path / f"broken-{rel.replace('/', '_')}"
        shutil.copytree(path, broken)
        (broken / rel).unlink()
        fresh = make_state()
        fresh.register_generator("noise", torch.Generator())
        fresh.register_generator("prompts", np.random.default_rng())
        before = snap(fresh.policies.model, "default")
        with pytest.raises(CheckpointError, match=name):
            fresh.load(broken)
        assert all(torch.equal(p, before[k]) for k, p in fresh.policies.parameters_of("default").items())
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="manifest.json"):
        make_state().load(path)


def test_mismatches_are_errors(tmp_path):
    st, _, _ = trained_state(tmp_path)
    path = st.save(tmp_path / "ckpt")

    def fresh(**kw):
        s = make_state(**kw)
        s.register_generator("noise", torch.Generator())
        s.register_generator("prompts", np.random.default_rng())
        return s

    with pytest.raises(LoraMismatchError, match="LoRA config"):
        fresh(lora=LoRAConfig(rank=8, alpha=8.0)).load(path)
    with pytest.raises(CheckpointError, match="selective-KL"):
        fresh(controller=False).load(path)
    with pytest.raises(CheckpointError, match="'ref'"):  # base reference: the checkpoint holds an unused piece
        fresh(policy=PolicyConfig(reference="base")).load(path)
    changed = OptimConfig(lr=2e-3, precision="fp32")
    with pytest.raises(CheckpointError, match="optim config changed"):
        fresh(optim=changed).load(path)
    s = fresh(optim=changed)
    s.load(path, allow_config_change=True)
    assert s.step == 3
    no_gens = make_state()
    with pytest.raises(CheckpointError, match="noise"):
        no_gens.load(path)
    (path / "rng.pt").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="corrupt"):
        fresh().load(path)


def test_save_is_atomic(tmp_path, monkeypatch):
    st, _, _ = trained_state(tmp_path)
    path = st.save(tmp_path / "ckpt")
    old_manifest = (path / "manifest.json").read_text()
    st.step = 99
    real_save = torch.save

    def failing(obj, f, *a, **k):
        if str(f).endswith("rng.pt"):
            raise OSError("disk full")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing)
    with pytest.raises(OSError, match="disk full"):
        st.save(tmp_path / "ckpt")
    with pytest.raises(OSError, match="disk full"):
        st.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert (path / "manifest.json").read_text() == old_manifest  # the previous checkpoint is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary leftovers
    monkeypatch.setattr(torch, "save", real_save)
    st.save(tmp_path / "ckpt")  # overwriting a checkpoint replaces it
    assert json.loads((path / "state.json").read_text())["step"] == 99
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_extra_must_be_json(tmp_path):
    st = make_state()
    st.extra = {"t": torch.zeros(1)}
    with pytest.raises(TypeError, match="JSON"):
        st.save(tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_grad_scaler_only_for_fp16_and_resumed(tmp_path):
    assert not make_state().scaler.is_enabled()  # fp32
    assert not make_state(optim=OptimConfig(precision="bf16")).scaler.is_enabled()
    fp16 = OptimConfig(lr=1e-3, precision="fp16")
    st = make_state(optim=fp16)
    assert st.scaler.is_enabled()
    _, stats = accumulate_step(st, loss_fn(st.policies.model), [batch(2)], [2])
    assert not stats.skipped and st.scaler.state_dict()["_growth_tracker"] == 1
    path = st.save(tmp_path / "c")
    fresh = make_state(optim=fp16)
    fresh.load(path)
    assert fresh.scaler.state_dict() == st.scaler.state_dict()
