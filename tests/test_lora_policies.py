"""LoRA application through peft and the default / old / ref / EMA policies on one model (tiny WanDiT, r=4)."""

import copy

import pytest
import torch
from peft import PeftModel

from astrolabe.models.wan.attention import CausalWindow
from astrolabe.models.wan.config import tiny
from astrolabe.models.wan.dit import WanDiT
from astrolabe.rl.lora import (
    LoRAConfig,
    LoraMismatchError,
    adapter_parameters,
    apply_lora,
    load_adapter,
    load_lora_model,
    read_lora_config,
    resolve_adapter_dir,
    save_adapter,
)
from astrolabe.rl.policies import PolicyConfig, PolicySet
from astrolabe.rl.schedules import PolicyAveragingConfig
from astrolabe.sampling.kv_cache import KVCache

LORA = LoRAConfig(rank=4, alpha=8.0)  # scaling alpha / r = 2
BLOCK_LINEARS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o",
                 "cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2"]


def base_model(seed=0):
    m = WanDiT(tiny())
    m.init_weights(torch.Generator().manual_seed(seed))
    return m.eval()


def inputs(seed=1, batch=1, frames=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, 16, 4, 4, generator=g)
    ctx = torch.randn(batch, 4, 32, generator=g)
    return x, torch.full((batch,), 500.0), ctx


@torch.no_grad()
def randomize_(model, adapter, seed, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    for p in adapter_parameters(model, adapter).values():
        p.copy_(torch.randn(p.shape, generator=g) * scale)


def snapshot(model, adapter):
    return {k: p.detach().clone() for k, p in adapter_parameters(model, adapter).items()}


@torch.no_grad()
def merged_copy(plain, peft_model, adapter, scaling):
    """Independent reference: W <- W + scaling * B @ A on a copy of the plain model."""
    m = copy.deepcopy(plain)
    lora = adapter_parameters(peft_model, adapter)
    mods = dict(m.named_modules())
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        name = key.removeprefix("base_model.model.").split(".lora_A.")[0]
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        mods[name].weight += scaling * (b @ a)
    return m


def make_policies(reference="base", ema=True, ema_start=0, decay="release_linear", seed=0):
    cfg = PolicyConfig(averaging=PolicyAveragingConfig(old_policy_decay=decay, ema=ema), ema_start_step=ema_start,
                       reference=reference)
    return PolicySet.build(base_model(seed), LORA, cfg, generator=torch.Generator().manual_seed(7))


def test_default_targets_are_the_ten_linears_of_every_block():
    pm = apply_lora(base_model(), LORA, generator=torch.Generator().manual_seed(0))
    lora = adapter_parameters(pm, "default")
    modules = {k.removeprefix("base_model.model.").split(".lora_")[0] for k in lora}
    assert modules == {f"blocks.{i}.{n}" for i in range(2) for n in BLOCK_LINEARS}
    d, f = 64, 128  # tiny: dim 64, ffn 128
    per_block = 8 * 4 * (d + d) + 4 * (d + f) + 4 * (f + d)
    assert sum(p.numel() for p in lora.values()) == 2 * per_block
    assert all(p.requires_grad and p.dtype == torch.float32 for p in lora.values())
    assert not any(p.requires_grad for n, p in pm.named_parameters() if "lora_" not in n)
    # B = 0, A ~ U(-1/sqrt(in), 1/sqrt(in)) from the explicit generator
    for k, p in lora.items():
        if ".lora_B." in k:
            assert torch.count_nonzero(p) == 0
        else:
            assert p.abs().max() <= 1 / p.shape[1] ** 0.5 and p.std() > 0
    bf = apply_lora(base_model(), LoRAConfig(rank=4, alpha=4.0, dtype="bfloat16"))
    assert {p.dtype for p in adapter_parameters(bf, "default").values()} == {torch.bfloat16}


def test_apply_lora_is_deterministic_and_leaves_global_rng_alone():
    model = base_model()
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = apply_lora(model, LORA, generator=torch.Generator().manual_seed(3))
    assert torch.equal(torch.get_rng_state(), before)
    b = apply_lora(base_model(), LORA, generator=torch.Generator().manual_seed(3))
    for (ka, pa), (kb, pb) in zip(adapter_parameters(a, "default").items(), adapter_parameters(b, "default").items()):
        assert ka == kb and torch.equal(pa, pb)


def test_forward_kwargs_pass_through_peft():
    plain = base_model()
    pm = apply_lora(copy.deepcopy(plain), LORA, generator=torch.Generator().manual_seed(0))
    assert isinstance(pm.get_base_model(), WanDiT)
    randomize_(pm, "default", seed=4)
    ref = merged_copy(plain, pm, "default", LORA.scaling)
    x, t, ctx = inputs(frames=6)
    with torch.no_grad():
        for kwargs in ({}, {"causal": CausalWindow(3)}, {"causal": CausalWindow(3), "frame_positions": [9, 10, 11, 12, 13, 14]},
                       {"causal": CausalWindow(3), "start_frame": 3}):
            y, y_ref = pm(x, t, ctx, **kwargs), ref(x, t, ctx, **kwargs)
            assert torch.allclose(y, y_ref, atol=1e-5), kwargs
            assert not torch.allclose(y, plain(x, t, ctx, **kwargs), atol=1e-3)  # the LoRA really acts
        # cached streaming: write a context block, then a cached forward at start_frame=3
        causal = CausalWindow(3, window_frames=6, sink_frames=3)
        caches = [KVCache(num_layers=2, tokens_per_frame=4, causal=causal) for _ in range(2)]
        outs = []
        for model, cache in zip((pm, ref), caches):
            model(x[:, :3], torch.zeros(1), ctx, kv_cache=cache, start_frame=0, cache_write=True)
            outs.append(model(x[:, 3:], t, ctx, kv_cache=cache, start_frame=3))
        assert torch.allclose(outs[0], outs[1], atol=1e-5)
        assert caches[0].positions == caches[1].positions == [0, 1, 2]
        assert torch.allclose(caches[0].self_kv[1].k, caches[1].self_kv[1].k, atol=1e-5)


def test_initial_policies_all_equal_the_base_model():
    plain = base_model()
    ps = PolicySet.build(copy.deepcopy(plain), LORA, PolicyConfig(reference="lagging"), torch.Generator().manual_seed(1))
    assert ps.adapters == ("default", "old", "ref")
    x, t, ctx = inputs()
    with torch.no_grad():
        y0 = plain(x, t, ctx)
        for name in ("default", "old", "ref", "ema"):
            with ps.use(name) as m:
                assert torch.equal(m(x, t, ctx), y0), name
    for name in ("old", "ref"):  # exact copies of default (same random A, zero B)
        for k, p in ps.parameters_of(name).items():
            assert torch.equal(p, ps.parameters_of("default")[k])


def test_only_default_requires_grad_across_switches():
    ps = make_policies(reference="lagging")
    trainable = {id(p) for p in ps.trainable_parameters()}
    assert trainable == {id(p) for p in ps.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in ps.parameters_of("default").values()}
    x, t, ctx = inputs()
    for name in ("old", "ref", "ema", "default"):
        with ps.use(name):
            assert ps.model.active_adapter == ("default" if name in ("ema", "default") else name)
            assert not any(p.requires_grad for p in ps.parameters_of("old").values())
            assert not any(p.requires_grad for p in ps.parameters_of("ref").values())
        assert ps.model.active_adapter == "default"
        assert {id(p) for p in ps.model.parameters() if p.requires_grad} == trainable
    randomize_(ps.model, "old", 3)
    with ps.use("old") as m:
        y = m(x, t, ctx)
    assert not y.requires_grad  # nothing trainable on the old path: old never receives gradients


def test_update_old_follows_the_decay_formula():
    ps = make_policies()
    randomize_(ps.model, "default", 1)
    randomize_(ps.model, "old", 2)
    theta, old = snapshot(ps.model, "default"), snapshot(ps.model, "old")
    d = ps.update_old(300)  # release_linear: min(0.001 * 300, 0.5) = 0.3
    assert d == pytest.approx(0.3)
    for k, p in ps.parameters_of("old").items():
        assert torch.allclose(p, 0.3 * old[k] + 0.7 * theta[k], atol=1e-7, rtol=0)
    assert all(torch.equal(p, theta[k]) for k, p in ps.parameters_of("default").items())
    old = snapshot(ps.model, "old")
    assert ps.update_old(10_000) == 0.5  # capped
    for k, p in ps.parameters_of("old").items():
        assert torch.allclose(p, 0.5 * old[k] + 0.5 * theta[k], atol=1e-7, rtol=0)
    ps.update_old(0)  # d = 0: old becomes the latest policy exactly
    assert all(torch.equal(p, theta[k]) for k, p in ps.parameters_of("old").items())


def test_sync_old_copies_default():
    ps = make_policies()
    randomize_(ps.model, "default", 5)
    ps.sync_old()
    assert all(torch.equal(p, ps.parameters_of("default")[k]) for k, p in ps.parameters_of("old").items())


def test_use_ref_base_equals_the_model_without_lora():
    plain = base_model()
    ps = PolicySet.build(copy.deepcopy(plain), LORA, PolicyConfig(reference="base"), torch.Generator().manual_seed(1))
    assert ps.adapters == ("default", "old")
    randomize_(ps.model, "default", 2)
    randomize_(ps.model, "old", 3)
    x, t, ctx = inputs()
    with torch.no_grad():
        with ps.use("ref") as m:
            y_ref = m(x, t, ctx)
        y_def = ps.model(x, t, ctx)
        assert torch.equal(y_ref, plain(x, t, ctx))
        assert not torch.allclose(y_def, y_ref, atol=1e-3)
        assert torch.allclose(y_def, merged_copy(plain, ps.model, "default", LORA.scaling)(x, t, ctx), atol=1e-5)
    assert all(p.requires_grad for p in ps.trainable_parameters())
    with pytest.raises(ValueError, match="lagging"):
        ps.refresh_ref(1)
    assert ps.maybe_refresh_ref(100, 1e9) is False


def test_lagging_refresh_copies_default():
    ps = make_policies(reference="lagging")
    randomize_(ps.model, "default", 2)
    x, t, ctx = inputs()
    with torch.no_grad():
        with ps.use("ref") as m:
            stale = m(x, t, ctx)
        assert not torch.allclose(stale, ps.model(x, t, ctx), atol=1e-3)
        ps.refresh_ref(5)
        assert all(torch.equal(p, ps.parameters_of("default")[k]) for k, p in ps.parameters_of("ref").items())
        with ps.use("ref") as m:
            assert torch.equal(m(x, t, ctx), ps.model(x, t, ctx))
    assert ps.refresher.last_refresh_iteration == 5 and ps.refresher.n_refreshes == 1
    randomize_(ps.model, "default", 3)
    assert ps.maybe_refresh_ref(6, kl_value=0.0) is False  # young and KL below threshold 0.15
    assert not torch.equal(ps.parameters_of("ref")["base_model.model.blocks.0.ffn.0.lora_B.weight"],
                           ps.parameters_of("default")["base_model.model.blocks.0.ffn.0.lora_B.weight"])
    assert ps.maybe_refresh_ref(7, kl_value=0.5) is True  # KL above threshold
    assert all(torch.equal(p, ps.parameters_of("default")[k]) for k, p in ps.parameters_of("ref").items())
    assert ps.refresher.last_refresh_iteration == 7


def test_ema_math_and_swap():
    ps = make_policies(ema_start=1)
    vals = {}
    randomize_(ps.model, "default", 10)
    assert ps.update_ema(0) is None  # before ema_start_step
    randomize_(ps.model, "default", 11)
    vals[1] = snapshot(ps.model, "default")
    assert ps.update_ema(1) == pytest.approx(2 / 11)  # reset to theta first, so the blend is a no-op
    assert all(torch.allclose(ps.ema[k], vals[1][k], atol=1e-7) for k in vals[1])
    randomize_(ps.model, "default", 12)
    vals[2] = snapshot(ps.model, "default")
    assert ps.update_ema(2) == pytest.approx(3 / 12)
    expected = {k: 0.25 * vals[1][k] + 0.75 * vals[2][k] for k in vals[1]}
    assert all(torch.allclose(ps.ema[k], expected[k], atol=1e-7) for k in expected)
    randomize_(ps.model, "default", 13)
    vals[3] = snapshot(ps.model, "default")
    assert ps.update_ema(500) == pytest.approx(0.9)  # capped at ema_max_decay
    expected = {k: 0.9 * expected[k] + 0.1 * vals[3][k] for k in expected}
    assert all(torch.allclose(ps.ema[k], expected[k], atol=1e-7) for k in expected)
    # use("ema") evaluates the EMA weights and restores the trained ones
    x, t, ctx = inputs()
    plain_ema = copy.deepcopy(ps.model)
    for k, p in adapter_parameters(plain_ema, "default").items():
        p.data.copy_(ps.ema[k])
    with torch.no_grad():
        with ps.use("ema") as m:
            y_ema = m(x, t, ctx)
        assert torch.equal(y_ema, plain_ema(x, t, ctx))
    assert all(torch.equal(p, vals[3][k]) for k, p in ps.parameters_of("default").items())


def test_ema_disabled():
    ps = make_policies(ema=False)
    assert ps.ema is None and ps.update_ema(5) is None and ps.stored_policies() == ("old",)
    with pytest.raises(ValueError, match="EMA is disabled"):
        with ps.use("ema"):
            pass


def test_peft_format_round_trip(tmp_path):
    pm = apply_lora(base_model(), LORA, generator=torch.Generator().manual_seed(0))
    randomize_(pm, "default", 6)
    out = save_adapter(pm, tmp_path / "ckpt" / "lora")
    assert {p.name for p in out.iterdir()} >= {"adapter_model.safetensors", "adapter_config.json"}
    x, t, ctx = inputs()
    with torch.no_grad():
        y = pm(x, t, ctx)
        assert torch.equal(PeftModel.from_pretrained(base_model(), out)(x, t, ctx), y)
        assert torch.equal(load_lora_model(base_model(), tmp_path / "ckpt")(x, t, ctx), y)  # checkpoint dir
    assert resolve_adapter_dir(tmp_path / "ckpt") == out
    assert read_lora_config(out) == LORA
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        resolve_adapter_dir(tmp_path)
    other = apply_lora(base_model(), LoRAConfig(rank=8, alpha=8.0))
    with pytest.raises(LoraMismatchError, match="rank"):
        load_adapter(other, out)


def test_policy_set_rejects_mismatched_lora_and_bad_names():
    pm = apply_lora(base_model(), LORA)
    with pytest.raises(LoraMismatchError, match="rank"):
        PolicySet(pm, LoRAConfig(rank=8, alpha=8.0), PolicyConfig())
    ps = PolicySet(pm, LORA, PolicyConfig())
    with pytest.raises(ValueError, match="unknown policy"):
        with ps.use("teacher"):
            pass
    with pytest.raises(KeyError, match="ref"):
        ps.parameters_of("ref")


def test_lora_config_validation():
    with pytest.raises(ValueError, match="regex"):
        LoRAConfig(target_modules="blocks.(")
    with pytest.raises(ValueError):
        LoRAConfig(rank=0)
    assert LoRAConfig(target_modules=["ffn.2", "ffn.0", "ffn.0"]).target_modules == ("ffn.0", "ffn.2")
