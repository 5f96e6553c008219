"""Base-model registry: card validity, the numbers per model, files, warped steps at shift 5."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astrolabe.models import registry as rg
from astrolabe.models.wan.config import tiny
from astrolabe.models.wan.dit import WanDiT

LOCAL = ("tiny", "world")  # no downloads: random init, or built locally (astrolabe world build)
REAL = [n for n in rg.base_model_names() if n not in LOCAL]


def warped_steps(steps: tuple[int, ...], shift: float) -> list[float]:
    """Independent re-statement of models-reference 4.2-4.3: sigma_i = 1 - i/1000 (float32),
    sigma' = s sigma / (1 + (s - 1) sigma), T = 1000 sigma', T_ext = T + [0], t_k = T_ext[1000 - S_k]."""
    sigma = np.linspace(1.0, 0.0, 1001, dtype=np.float32)[:-1]
    shifted = shift * sigma / (1 + (shift - 1) * sigma)
    t_ext = np.concatenate([1000.0 * shifted, [0.0]]).astype(np.float32)
    return [float(t_ext[1000 - s]) for s in steps]


def test_names_and_lookup_error() -> None:
    assert set(rg.base_model_names()) >= {
        "self_forcing", "longlive", "causal_forcing_chunk", "causal_forcing_frame", "krea14b", "tiny",
        "causal_forcing_frame_2step", "causal_forcing_frame_1step",
    }
    with pytest.raises(ValueError, match=r"unknown base model 'sf'.*'self_forcing'"):
        rg.get_base_model("sf")


@pytest.mark.parametrize("name", rg.base_model_names())
def test_every_spec_is_valid_and_round_trips(name: str) -> None:
    card = rg.get_base_model(name)
    assert rg.BaseModelCard.model_validate(card.model_dump()) == card
    assert card.flow_shift == 5.0
    assert card.context_noise == 0 and card.fps == 16
    assert card.warp_denoising_steps == (name != "krea_served")
    assert card.kv_cache == ("recompute" if name == "krea_served" else "context_pass")
    assert card.latent_frames % card.frames_per_block == 0
    cfg = card.wan_config()
    if name not in LOCAL:
        assert (card.height, card.width, card.num_frames) == (480, 832, 81)
        assert card.latent_frames == 21
        assert cfg.tokens_per_frame(card.latent_height, card.latent_width) == 1560
        assert cfg.text_len == 512 and cfg.text_dim == 4096


def test_flow_shift_is_required() -> None:
    data = rg.get_base_model("self_forcing").model_dump()
    del data["flow_shift"]
    with pytest.raises(ValueError, match="flow_shift"):
        rg.BaseModelCard.model_validate(data)


def test_per_model_numbers() -> None:
    sf, ll = rg.get_base_model("self_forcing"), rg.get_base_model("longlive")
    cfc, cff = rg.get_base_model("causal_forcing_chunk"), rg.get_base_model("causal_forcing_frame")
    krea = rg.get_base_model("krea14b")
    assert (sf.frames_per_block, sf.local_attn_frames, sf.sink_frames) == (3, None, 0)
    assert (ll.frames_per_block, ll.local_attn_frames, ll.sink_frames) == (3, 12, 3)
    assert (cfc.frames_per_block, cff.frames_per_block) == (3, 1)
    assert (cff.num_blocks, cfc.num_blocks) == (21, 7)
    assert sf.wan_config().dim == 1536 and krea.wan_config().dim == 5120 and krea.wan_config().num_layers == 40
    assert rg.get_base_model("causal_forcing_frame_2step").denoising_steps == (1000, 500)
    assert rg.get_base_model("causal_forcing_frame_1step").denoising_steps == (1000,)
    assert rg.get_base_model("causal_forcing_frame_1step").first_block_denoising_steps == (1000, 750, 500, 250)
    for name in ("self_forcing", "longlive", "causal_forcing_chunk", "causal_forcing_frame", "krea14b"):
        assert rg.get_base_model(name).denoising_steps == (1000, 750, 500, 250)
    t = rg.get_base_model("tiny")
    assert t.wan_config() == tiny() and t.text_encoder_kind == "tiny" and t.files() == {}


def test_warped_steps_at_shift_5() -> None:
    sf = rg.get_base_model("self_forcing")
    np.testing.assert_allclose(warped_steps(sf.denoising_steps, sf.flow_shift), [1000, 937.5, 833.33333, 625], atol=1e-3)
    cf2 = rg.get_base_model("causal_forcing_frame_2step")
    np.testing.assert_allclose(warped_steps(cf2.denoising_steps, cf2.flow_shift), [1000, 833.33333], atol=1e-3)
    # the wrapper default 8.0 would be wrong: [1000, 960, 888.9, 727.3]
    np.testing.assert_allclose(warped_steps(sf.denoising_steps, 8.0), [1000, 960, 888.889, 727.273], atol=1e-2)


def test_checkpoint_files_and_sources() -> None:
    expected = {
        "self_forcing": ("gdhe17/Self-Forcing", "checkpoints/self_forcing_dmd.pt", "self_forcing_pt", "generator_ema"),
        "longlive": ("Efficient-Large-Model/LongLive-1.3B", "models/longlive_base.pt", "longlive_pt", "generator"),
        "causal_forcing_chunk": ("zhuhz22/Causal-Forcing", "chunkwise/causal_forcing.pt", "causal_forcing_pt", "generator"),
        "causal_forcing_frame": ("zhuhz22/Causal-Forcing", "framewise/causal_forcing.pt", "causal_forcing_pt",
                                 "generator_ema"),
        "krea14b": ("krea/krea-realtime-video", "krea-realtime-video-14b.safetensors", "krea_safetensors", None),
    }
    for name, (repo, filename, fmt, entry) in expected.items():
        card = rg.get_base_model(name)
        assert (card.checkpoint.repo, card.checkpoint.filename, card.checkpoint_format, card.checkpoint_entry) == (
            repo, filename, fmt, entry)
    ll = rg.get_base_model("longlive")
    assert (ll.lora.file.filename, ll.lora.entry, ll.lora.rank, ll.lora.alpha) == ("models/lora.pt", "auto", 256, 256.0)
    assert rg.get_base_model("longlive_base").lora is None
    for name in REAL:
        files = rg.get_base_model(name).files()
        assert str(files["vae"].local_path) == "Wan2.1-T2V-1.3B/Wan2.1_VAE.pth"
        assert str(files["text_encoder"].local_path) == "Wan2.1-T2V-1.3B/models_t5_umt5-xxl-enc-bf16.pth"
        assert str(files["tokenizer"].local_path) == "Wan2.1-T2V-1.3B/google/umt5-xxl" and files["tokenizer"].is_dir
        assert rg.text_encoder_directory(rg.get_base_model(name), "/m") == rg.Path("/m/Wan2.1-T2V-1.3B")


def test_validators_reject_inconsistent_specs() -> None:
    data = rg.get_base_model("self_forcing").model_dump()
    bad = [
        ({"sink_frames": 3}, "sink_frames needs a local window"),
        ({"local_attn_frames": 4, "sink_frames": 3}, "must hold the sinks"),
        ({"denoising_steps": (750, 1000)}, "strictly decreasing"),
        ({"num_frames": 80}, "1 \\+ 4k"),
        ({"frames_per_block": 4}, "whole number"),
        ({"height": 472}, "divisible by 16"),
        ({"checkpoint_entry": None}, "needs a checkpoint_entry"),
        ({"wan_size": "wan21_t2v_7b"}, "not a size builder"),
        ({"flow_shift": 0.0}, "greater than 0"),
    ]
    for update, msg in bad:
        with pytest.raises(ValueError, match=msg):
            rg.BaseModelCard.model_validate({**data, **update})


def test_check_files_lists_missing_with_download_commands(tmp_path) -> None:
    card = rg.get_base_model("longlive")
    with pytest.raises(FileNotFoundError, match="(?s)missing 5 file.*huggingface-cli download Efficient-Large-Model"):
        rg.check_files(card, tmp_path)
    for role, path in rg.resolve_files(card, tmp_path).items():
        if role == "tokenizer":
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x")
    assert rg.check_files(card, tmp_path)["lora"] == tmp_path / "LongLive-1.3B/models/lora.pt"


def test_read_base_model_state_wires_entry_and_lora(tmp_path) -> None:
    """The card's format, entry and LoRA (rank = alpha = 256) reach the adapters (tiny tensors, 1.3B names)."""
    g = torch.Generator().manual_seed(0)
    ref = {k: torch.randn(v.shape, generator=g) for k, v in WanDiT(tiny()).state_dict().items()}
    card = rg.get_base_model("longlive")
    paths = rg.resolve_files(card, tmp_path)
    paths["dit"].parent.mkdir(parents=True)
    torch.save({"generator": {"model." + k: v for k, v in ref.items()}}, paths["dit"])
    a = torch.randn(256, 64, generator=g) * 0.01
    b = torch.randn(128, 256, generator=g) * 0.01
    torch.save({"generator_lora": {"base_model.model.blocks.1.ffn.0.lora_A.weight": a,
                                   "base_model.model.blocks.1.ffn.0.lora_B.weight": b}}, paths["lora"])
    sd = rg.read_base_model_state(card, tmp_path)
    assert torch.allclose(sd["blocks.1.ffn.0.weight"], ref["blocks.1.ffn.0.weight"] + b @ a, atol=1e-6)
    assert torch.equal(sd["blocks.0.ffn.0.weight"], ref["blocks.0.ffn.0.weight"])
    sf = rg.get_base_model("self_forcing")
    sf_path = rg.resolve_files(sf, tmp_path)["dit"]
    sf_path.parent.mkdir(parents=True)
    torch.save({"generator": {"model." + k: v for k, v in ref.items()}}, sf_path)
    with pytest.raises(Exception, match="no entry 'generator_ema'"):  # card default: EMA
        rg.read_base_model_state(sf, tmp_path)
    assert torch.equal(rg.read_base_model_state(sf, tmp_path, entry="generator")["head.modulation"],
                       ref["head.modulation"])
    with pytest.raises(ValueError, match="no checkpoint"):
        rg.read_base_model_state(rg.get_base_model("tiny"), tmp_path)


def test_krea_served_is_krea_as_served_with_the_recompute_sampler() -> None:
    served, trained = rg.get_base_model("krea_served"), rg.get_base_model("krea14b")
    assert served.denoising_steps == (1000, 937, 833, 625) and not served.warp_denoising_steps
    # unwarped integers vs the training sampler's warped 937.5 / 833.33 (models-reference 4.3)
    np.testing.assert_allclose(warped_steps(trained.denoising_steps, 5.0), [1000, 937.5, 833.33333, 625], atol=1e-3)
    assert served.checkpoint == trained.checkpoint and served.wan_size == trained.wan_size == "wan21_t2v_14b"
    assert (served.kv_cache, served.frames_per_block, served.local_attn_frames) == ("recompute", 3, 6)
    from astrolabe.build import stream_config
    from astrolabe.config import ModelConfig

    stream = stream_config(ModelConfig(base="krea_served"), served)
    assert stream.kv_cache == "recompute" and stream.recompute_frames == 3
    assert (stream.causal.window_frames, stream.causal.sink_frames) == (6, 0)
    assert stream_config(ModelConfig(base="krea14b"), trained).kv_cache == "context_pass"


def test_empty_checkpoint_dir_lists_every_missing_file_in_one_error(tmp_path) -> None:
    from astrolabe.config import ModelConfig
    from astrolabe.build import build_dit

    for name in REAL:
        card = rg.get_base_model(name)
        with pytest.raises(FileNotFoundError) as info:
            build_dit(ModelConfig(base=name, checkpoint_dir=tmp_path), card)
        message = str(info.value)
        assert f"missing {len(card.files())} file(s)" in message
        for f in card.files().values():
            assert str(f.local_path) in message and f.download_command(tmp_path) in message
    cf = rg.get_base_model("causal_forcing_frame")
    with pytest.raises(FileNotFoundError, match="(?s)missing 5 file.*fill_base.*Wan2.1-T2V-1.3B/diffusion_pytorch_model"):
        build_dit(ModelConfig(base=cf.name, checkpoint_dir=tmp_path, fill_missing_from_base=True), cf)


def _write_tiny_cf(tmp_path, ref, missing: set[str]):
    from safetensors.torch import save_file

    card = rg.get_base_model("causal_forcing_frame")
    paths = rg.resolve_files(card, tmp_path, fill_base=True)
    paths["dit"].parent.mkdir(parents=True)
    ema = {"model._fsdp_wrapped_module." + k: v + 1 for k, v in ref.items() if k not in missing}
    torch.save({"generator": {"model." + k: v for k, v in ref.items()}, "generator_ema": ema}, paths["dit"])
    paths["fill_base"].parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in ref.items()}, str(paths["fill_base"]))
    return card


def test_causal_forcing_ema_missing_keys_listed_or_filled_explicitly(tmp_path, caplog) -> None:
    from astrolabe.models.checkpoints import CheckpointMismatchError, load_dit_state

    g = torch.Generator().manual_seed(0)
    ref = {k: torch.randn(v.shape, generator=g) for k, v in WanDiT(tiny()).state_dict().items()}
    missing = {"blocks.1.norm3.weight", "blocks.1.norm3.bias", "head.modulation"}
    card = _write_tiny_cf(tmp_path, ref, missing)
    sd = rg.read_base_model_state(card, tmp_path)  # default: nothing filled
    assert missing.isdisjoint(sd)
    with pytest.raises(CheckpointMismatchError, match="(?s)missing 3:.*blocks.1.norm3.bias.*fill_missing_from_base"):
        load_dit_state(WanDiT(tiny()), sd)
    with caplog.at_level("WARNING", logger="astrolabe.models.checkpoints"):
        filled = rg.read_base_model_state(card, tmp_path, fill_missing_from_base=True)
    assert all(name in caplog.text for name in missing)
    for k in missing:
        assert torch.equal(filled[k], ref[k])  # from the base DiT
    assert torch.equal(filled["blocks.0.ffn.0.weight"], ref["blocks.0.ffn.0.weight"] + 1)  # the EMA itself
    load_dit_state(WanDiT(tiny()), filled)
    with pytest.raises(ValueError, match="no base DiT"):
        rg.read_base_model_state(rg.get_base_model("self_forcing"), tmp_path, fill_missing_from_base=True)
