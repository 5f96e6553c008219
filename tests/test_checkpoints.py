"""Checkpoint adapters: each released layout, written tiny, read back into a tiny WanDiT tensor by tensor."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from astrolabe.models import checkpoints as ck
from astrolabe.models import peft_lora as pl
from astrolabe.models.wan.config import WanConfig, tiny, wan21_t2v_14b
from astrolabe.models.wan.dit import WanDiT

LORA_MODULES = [f"self_attn.{n}" for n in "qkvo"] + [f"cross_attn.{n}" for n in "qkvo"] + ["ffn.0", "ffn.2"]


def random_state(cfg: WanConfig, seed: int) -> dict[str, torch.Tensor]:
    """A Wan-named state dict of ``cfg``'s shapes with distinct random values everywhere."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    return {k: torch.randn(s, generator=g) for k, s in shapes.items()}


def fresh_model() -> WanDiT:
    model = WanDiT(tiny())
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def assert_model_equals(model: WanDiT, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k


def load(sd: dict[str, torch.Tensor]) -> WanDiT:
    model = fresh_model()
    ck.load_dit_state(model, sd)
    return model


@pytest.fixture(scope="module")
def ref() -> dict[str, torch.Tensor]:
    return random_state(tiny(), seed=0)


@pytest.fixture(scope="module")
def ema() -> dict[str, torch.Tensor]:
    return random_state(tiny(), seed=1)


def prefixed(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + k: v for k, v in sd.items()}


# ---------------------------------------------------------------------------------------------- formats


def test_wan_base_single_file(tmp_path, ref) -> None:
    save_file(ref, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    assert_model_equals(load(ck.read_dit_checkpoint("wan21_safetensors", tmp_path)), ref)
    assert_model_equals(load(ck.read_wan_base(tmp_path / "diffusion_pytorch_model.safetensors")), ref)


def test_wan_base_sharded_with_index(tmp_path, ref) -> None:
    keys = list(ref)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:30],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[30:]}
    for name, ks in shards.items():
        save_file({k: ref[k] for k in ks}, str(tmp_path / name))
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in shards.items() for k in ks}}
    (tmp_path / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    assert_model_equals(load(ck.read_wan_base(tmp_path)), ref)
    # a shard holding keys the index does not assign to it
    save_file({k: ref[k] for k in keys[:31]}, str(tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    with pytest.raises(ck.CheckpointReadError, match="does not hold the keys"):
        ck.read_wan_base(tmp_path)
    save_file({k: ref[k] for k in keys[:30]}, str(tmp_path / "diffusion_pytorch_model-00001-of-00002.safetensors"))
    (tmp_path / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ck.CheckpointNotFoundError, match="shard .*00002-of-00002.*Wan-AI/Wan2.1-T2V-14B"):
        ck.read_wan_base(tmp_path)


def test_self_forcing_entries(tmp_path, ref, ema) -> None:
    path = tmp_path / "self_forcing_dmd.pt"
    critic = {"model.head.head.weight": torch.zeros(3)}
    torch.save({"generator": prefixed(ref, "model."), "generator_ema": prefixed(ema, "model."),
                "critic": critic, "step": torch.tensor(600)}, path)
    assert_model_equals(load(ck.read_self_forcing(path)), ema)  # documented default: generator_ema
    assert_model_equals(load(ck.read_self_forcing(path, entry="generator")), ref)
    assert_model_equals(load(ck.read_dit_checkpoint("self_forcing_pt", path, entry="generator_ema")), ema)
    with pytest.raises(ck.CheckpointReadError, match=r"no entry 'model'.*\['critic', 'generator', 'generator_ema', 'step'\]"):
        ck.read_self_forcing(path, entry="model")
    with pytest.raises(ValueError, match="name the entry"):
        ck.read_dit_checkpoint("self_forcing_pt", path)


@pytest.mark.parametrize(
    "prefix",
    ["model._fsdp_wrapped_module.", "module.model.", "model._orig_mod.", "_fsdp_wrapped_module.model."],
)
def test_causal_forcing_wrapper_segments(tmp_path, ref, ema, prefix) -> None:
    """Chunk-wise (`generator`, plain `model.`) and frame-wise (`generator_ema`, FSDP/compile/DDP wrappers)."""
    wrapped = {}
    for k, v in ema.items():  # activation-checkpoint wrappers sit inside each block
        k = k.replace("blocks.0.", "blocks.0._checkpoint_wrapped_module.")
        wrapped[prefix + k] = v
    path = tmp_path / "causal_forcing.pt"
    torch.save({"generator": prefixed(ref, "model."), "generator_ema": wrapped}, path)
    assert_model_equals(load(ck.read_causal_forcing(path, entry="generator")), ref)
    assert_model_equals(load(ck.read_causal_forcing(path, entry="generator_ema")), ema)


def test_normalize_rule_order_and_collisions() -> None:
    assert ck.normalize_wan_key("module.model._fsdp_wrapped_module.blocks.1.ffn.0.weight") == "blocks.1.ffn.0.weight"
    assert ck.normalize_wan_key("model.model.head.modulation") == "model.head.modulation"  # one `model.` only
    assert ck.normalize_wan_key("model.module.head.modulation") == "module.head.modulation"  # module. first
    with pytest.raises(ck.CheckpointReadError, match="both normalise"):
        ck.normalize_wan_keys({"model.freqs": torch.zeros(1), "freqs": torch.zeros(1)})


def test_krea_flat_safetensors(tmp_path, ref) -> None:
    path = tmp_path / "krea-realtime-video-14b.safetensors"
    save_file(prefixed(ref, "model."), str(path))
    assert_model_equals(load(ck.read_dit_checkpoint("krea_safetensors", path)), ref)
    with pytest.raises(ValueError, match="flat safetensors"):
        ck.read_dit_checkpoint("krea_safetensors", path, entry="generator")


def make_lora(cfg: WanConfig, rank: int, seed: int) -> dict[str, pl.LoraPair]:
    g = torch.Generator().manual_seed(seed)
    shapes = {k: v.shape for k, v in random_state(cfg, 0).items()}
    out = {}
    for i in range(cfg.num_layers):
        for m in LORA_MODULES:
            o, n = shapes[f"blocks.{i}.{m}.weight"]
            out[f"blocks.{i}.{m}"] = pl.LoraPair(A=torch.randn(rank, n, generator=g), B=torch.randn(o, rank, generator=g))
    return out


def peft_keys(lora: dict[str, pl.LoraPair], infix: str = "") -> dict[str, torch.Tensor]:
    out = {}
    for m, p in lora.items():
        out[f"base_model.model.{m}.lora_A{infix}.weight"] = p.A
        out[f"base_model.model.{m}.lora_B{infix}.weight"] = p.B
    return out


@pytest.mark.parametrize(("infix", "entry"), [("", "generator_lora"), (".default", "generator_lora"), ("", None)])
def test_longlive_base_plus_lora(tmp_path, ref, infix, entry) -> None:
    rank, alpha = 4, 8.0
    lora = make_lora(tiny(), rank, seed=5)
    assert len(lora) == 10 * tiny().num_layers
    base_path, lora_path = tmp_path / "longlive_base.pt", tmp_path / "lora.pt"
    torch.save({"generator": prefixed(ref, "model.")}, base_path)
    raw = peft_keys(lora, infix)
    torch.save({"generator_lora": raw, "critic_lora": {}, "step": 3} if entry else raw, lora_path)
    sd = ck.read_dit_checkpoint("longlive_pt", base_path, entry="generator", lora_path=lora_path,
                                lora_entry=entry, lora_rank=rank, lora_alpha=alpha)
    expected = dict(ref)
    for m, p in lora.items():  # W + (alpha / r) B A
        expected[f"{m}.weight"] = ref[f"{m}.weight"] + (alpha / rank) * p.B @ p.A
    model = load(sd)
    got = model.state_dict()
    for k, v in expected.items():
        assert torch.allclose(got[k], v, atol=1e-5), k
    assert torch.equal(got["blocks.0.self_attn.q.bias"], ref["blocks.0.self_attn.q.bias"])  # biases untouched
    assert torch.equal(got["blocks.1.norm3.weight"], ref["blocks.1.norm3.weight"])
    base_only = ck.read_longlive(base_path, None)
    assert_model_equals(load(base_only), ref)


def test_lora_merge_matches_peft_merge_and_unload(ref) -> None:
    """Independent check: PEFT itself, given lora_to_peft_state, merges to the same weights."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    rank, alpha = 4, 12.0
    lora = make_lora(tiny(), rank, seed=7)
    model = load(ref)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0,
                     target_modules=r"blocks\.\d+\.((self_attn|cross_attn)\.[qkvo]|ffn\.[02])")
    peft_model = get_peft_model(model, cfg)
    result = set_peft_model_state_dict(peft_model, pl.lora_to_peft_state(lora))
    assert not [k for k in result.unexpected_keys if "lora" in k]
    merged = peft_model.merge_and_unload().state_dict()
    ours = pl.merge_lora(ref, lora, alpha=alpha)
    assert set(merged) == set(ours)
    for k in ours:
        assert torch.allclose(merged[k], ours[k], atol=1e-5), k
    assert not torch.allclose(ours["blocks.1.ffn.2.weight"], ref["blocks.1.ffn.2.weight"])


def test_lora_parse_errors(ref) -> None:
    lora = peft_keys(make_lora(tiny(), 4, seed=1))
    with pytest.raises(ck.CheckpointReadError, match="do not have rank 8"):
        pl.parse_peft_lora(lora, rank=8)
    one_sided = {k: v for k, v in lora.items() if "blocks.0.ffn.0.lora_B" not in k}
    with pytest.raises(ck.CheckpointReadError, match="blocks.0.ffn.0 has only lora_A"):
        pl.parse_peft_lora(one_sided, rank=4)
    with pytest.raises(ck.CheckpointReadError, match="not PEFT LoRA keys"):
        pl.parse_peft_lora({**lora, "base_model.model.head.head.lora_A.weight": torch.zeros(4, 64)}, rank=4)
    with pytest.raises(ck.CheckpointMismatchError, match="B @ A"):
        pl.merge_lora(ref, {"blocks.0.ffn.0": pl.LoraPair(A=torch.zeros(4, 3), B=torch.zeros(128, 4))}, alpha=4)


# ----------------------------------------------------------------------------------------------- errors


def test_truncated_files(tmp_path, ref) -> None:
    pt = tmp_path / "self_forcing_dmd.pt"
    torch.save({"generator_ema": prefixed(ref, "model.")}, pt)
    pt.write_bytes(pt.read_bytes()[: pt.stat().st_size // 2])
    with pytest.raises(ck.CheckpointReadError, match="truncated.*gdhe17/Self-Forcing"):
        ck.read_self_forcing(pt)
    st = tmp_path / "krea.safetensors"
    save_file(ref, str(st))
    st.write_bytes(st.read_bytes()[: st.stat().st_size - 100])
    with pytest.raises(ck.CheckpointReadError, match="Truncated or corrupt.*krea/krea-realtime-video"):
        ck.read_krea(st)


class NotATensor:
    pass


def test_non_tensor_pickle_is_refused(tmp_path, ref) -> None:
    import pickle

    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"generator": NotATensor()}, f, protocol=2)
    with pytest.raises(ck.CheckpointReadError, match="weights_only=True"):
        ck.read_causal_forcing(path, entry="generator")


def test_missing_files_name_the_source(tmp_path) -> None:
    with pytest.raises(ck.CheckpointNotFoundError, match="Efficient-Large-Model/LongLive-1.3B"):
        ck.read_longlive(tmp_path / "longlive_base.pt", None)
    with pytest.raises(FileNotFoundError, match="zhuhz22/Causal-Forcing"):
        ck.read_causal_forcing(tmp_path / "x.pt", entry="generator")
    with pytest.raises(ck.CheckpointNotFoundError, match="diffusion_pytorch_model.safetensors.*Wan-AI/Wan2.1-T2V-1.3B"):
        ck.read_wan_base(tmp_path)


def test_wrong_size_checkpoint(ref) -> None:
    wider = random_state(WanConfig(dim=96, ffn_dim=128, freq_dim=32, text_dim=32, text_len=16,
                                   num_heads=2, num_layers=2), seed=2)
    with pytest.raises(ck.CheckpointMismatchError, match=r"(?s)mis-shaped 6[0-9].*dim 96 and 2 blocks: no known size"):
        ck.load_dit_state(fresh_model(), wider)
    with torch.device("meta"):
        big = WanDiT(wan21_t2v_14b()).state_dict()
    with pytest.raises(ck.CheckpointMismatchError, match=r"(?s)unexpected 1026.*looks like the 14B model \(wan21_t2v_14b\)"):
        ck.load_dit_state(fresh_model(), big)
    with pytest.raises(ck.CheckpointMismatchError, match=r"missing 1: \['head.modulation'\]"):
        ck.load_dit_state(fresh_model(), {k: v for k, v in ref.items() if k != "head.modulation"})
    with pytest.raises(ck.CheckpointMismatchError, match="LoRA keys"):
        ck.load_dit_state(fresh_model(), {**ref, "blocks.0.ffn.0.lora_A.weight": torch.zeros(1)})


def test_nan_weights_and_freqs_rule(ref) -> None:
    bad = dict(ref)
    bad["blocks.1.cross_attn.k.weight"] = ref["blocks.1.cross_attn.k.weight"].clone()
    bad["blocks.1.cross_attn.k.weight"][0, 0] = float("nan")
    model = fresh_model()
    with pytest.raises(ck.NonFiniteWeightsError, match=r"\['blocks.1.cross_attn.k.weight'\]"):
        ck.load_dit_state(model, bad)
    assert (model.state_dict()["blocks.0.ffn.0.weight"] == 0).all()  # nothing was loaded
    assert_model_equals(load({**ref, "freqs": torch.randn(1024, 16)}), ref)


def test_assign_on_meta_model(ref) -> None:
    with torch.device("meta"):
        model = WanDiT(tiny())
    ck.load_dit_state(model, ref, assign=True)
    assert_model_equals(model, ref)


def test_legacy_non_zip_pickle_is_read(tmp_path, ref) -> None:
    """Old torch.save files cannot be memory-mapped; the reader falls back to a plain weights_only load."""
    path = tmp_path / "causal_forcing.pt"
    torch.save({"generator": prefixed(ref, "model.")}, path, _use_new_zipfile_serialization=False)
    assert_model_equals(load(ck.read_causal_forcing(path, entry="generator")), ref)


# ------------------------------------------------------------------- LoRA layouts, safe loading (issue 12)


@pytest.mark.parametrize("layout", ["generator_lora", "bare"])
def test_longlive_lora_auto_accepts_both_layouts(tmp_path, ref, layout) -> None:
    rank = 4
    lora = make_lora(tiny(), rank, seed=5)
    raw = peft_keys(lora)
    path = tmp_path / "lora.pt"
    torch.save({"generator_lora": raw, "critic_lora": {}, "step": 3} if layout == "generator_lora" else raw, path)
    got = pl.read_peft_lora(path, rank=rank)  # default "auto"
    assert set(got) == set(lora) and all(torch.equal(got[m].A, lora[m].A) for m in lora)
    other = None if layout == "generator_lora" else "generator_lora"  # the override forces the other layout: error
    with pytest.raises(ck.CheckpointReadError):
        pl.read_peft_lora(path, entry=other, rank=rank)


def test_longlive_lora_auto_refuses_an_unknown_layout(tmp_path, ref) -> None:
    path = tmp_path / "lora.pt"
    torch.save({"lora": peft_keys(make_lora(tiny(), 4, seed=5)), "step": 3}, path)
    with pytest.raises(ck.CheckpointReadError, match=r"(?s)cannot tell where the LoRA is.*\['lora', 'step'\]"):
        pl.read_peft_lora(path, rank=4)


def test_training_pickle_extras_load_with_weights_only(tmp_path, ref) -> None:
    """What trainers store next to the weights (ints, strings, optimizer state, nn.Parameter, numpy scalars)
    loads under weights_only=True (numpy through the named allow-list); other objects are refused."""
    import argparse

    import numpy as np

    path = tmp_path / "cf.pt"
    gen = {"model." + k: torch.nn.Parameter(v) for k, v in ref.items()}
    torch.save({"generator": gen, "step": np.int64(600), "loss": np.float32(0.25), "name": "cf",
                "optimizer": {"state": {0: {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 2e-6}]}}, path)
    assert_model_equals(load(ck.read_causal_forcing(path, entry="generator")), ref)
    torch.save({"generator": gen, "args": argparse.Namespace(lr=1.0)}, path)
    with pytest.raises(ck.CheckpointReadError, match="Namespace"):
        ck.read_causal_forcing(path, entry="generator")
