"""Text encoder: Wan <-> HF key table, an independent Wan-T5 reference, cleaning, padding, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from astrolabe.models.wan import text_encoder as te
from astrolabe.models.wan.config import tiny as tiny_dit

# ----------------------------------------------------------------- independent Wan T5 encoder (tiny size)


def wan_bucket(rel_pos: torch.Tensor, num_buckets: int = 32, max_dist: int = 128) -> torch.Tensor:
    """Wan's T5RelativeEmbedding._relative_position_bucket, bidirectional."""
    half = num_buckets // 2
    buckets = (rel_pos > 0).long() * half
    rel_pos = rel_pos.abs()
    max_exact = half // 2
    large = max_exact + (
        torch.log(rel_pos.float() / max_exact) / math.log(max_dist / max_exact) * (half - max_exact)
    ).long()
    large = torch.minimum(large, torch.full_like(large, half - 1))
    return buckets + torch.where(rel_pos < max_exact, rel_pos, large)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def wan_t5_reference(sd: dict, ids: torch.Tensor, mask: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Wan T5Encoder forward (shared_pos=False): pre-RMSNorm, per-layer rel. bias, no attention scaling."""
    x = sd["token_embedding.weight"][ids]  # (B, L, D)
    b, length, d = x.shape
    hd = d // num_heads
    rel = torch.arange(length)[None, :] - torch.arange(length)[:, None]  # key - query, (L, L)
    n_layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    for i in range(n_layers):
        p = f"blocks.{i}."
        h = rms_norm(x, sd[p + "norm1.weight"])
        q, k, v = (F.linear(h, sd[p + f"attn.{n}.weight"]).view(b, length, num_heads, hd) for n in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][wan_bucket(rel)].permute(2, 0, 1)[None]  # (1, N, L, L)
        bias = bias.expand(b, -1, -1, -1).masked_fill(mask.view(b, 1, 1, length) == 0, torch.finfo(x.dtype).min)
        attn = torch.softmax(torch.einsum("binc,bjnc->bnij", q, k) + bias, dim=-1)
        out = torch.einsum("bnij,bjnc->binc", attn, v).reshape(b, length, d)
        x = x + F.linear(out, sd[p + "attn.o.weight"])
        h = rms_norm(x, sd[p + "norm2.weight"])
        ff = F.linear(h, sd[p + "ffn.fc1.weight"]) * gelu_tanh(F.linear(h, sd[p + "ffn.gate.0.weight"]))
        x = x + F.linear(ff, sd[p + "ffn.fc2.weight"])
    return rms_norm(x, sd["norm.weight"])


def test_bucket_reference_hand_values() -> None:
    rel = torch.tensor([0, -1, 1, -7, 8, 127, -200, 1000])
    # 0 -> 0; -1 -> 1; +1 -> 16+1; -7 -> 7; +8 -> 16+8; +127 -> 16+8+floor(log(127/8)/log(16)*8)=16+15; clamp 15
    assert wan_bucket(rel).tolist() == [0, 1, 17, 7, 24, 31, 15, 31]


# ---------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_encoder() -> te.WanTextEncoder:
    return te.build_text_encoder(te.tiny_text_encoder_config(), seed=3)


@pytest.fixture(scope="module")
def wan_sd(tiny_encoder: te.WanTextEncoder) -> dict[str, torch.Tensor]:
    """A tiny state dict in Wan's layout, made by mapping the random HF tiny model to Wan names."""
    return {k: v.clone() for k, v in te.hf_to_wan_t5_keys(tiny_encoder.model.state_dict()).items()}


# ----------------------------------------------------------------------------------------------- mapping


def test_key_mapping_both_ways(tiny_encoder: te.WanTextEncoder, wan_sd: dict) -> None:
    hf_sd = tiny_encoder.model.state_dict()
    n_layers = tiny_encoder.model.config.num_layers
    assert len(wan_sd) == 2 + 10 * n_layers  # token_embedding, norm + 10 per block (242 for 24 layers)
    assert len(hf_sd) == len(wan_sd) + 1  # shared + embed_tokens
    assert torch.equal(wan_sd["blocks.1.ffn.gate.0.weight"], hf_sd["encoder.block.1.layer.1.DenseReluDense.wi_0.weight"])
    assert torch.equal(wan_sd["blocks.1.ffn.fc1.weight"], hf_sd["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"])
    assert torch.equal(
        wan_sd["blocks.0.pos_embedding.embedding.weight"],
        hf_sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"],
    )
    assert torch.equal(wan_sd["norm.weight"], hf_sd["encoder.final_layer_norm.weight"])
    back = te.wan_to_hf_t5_keys(wan_sd)
    assert set(back) == set(hf_sd)
    assert all(torch.equal(back[k], hf_sd[k]) for k in hf_sd)
    assert back["shared.weight"] is back["encoder.embed_tokens.weight"]
    assert set(te.hf_to_wan_t5_keys(back)) == set(wan_sd)


def test_mapping_rejects_unknown_and_untied_keys(wan_sd: dict) -> None:
    with pytest.raises(te.T5KeyError, match="not in the Wan->HF table"):
        te.wan_to_hf_t5_keys({**wan_sd, "blocks.0.attn.qkv.weight": torch.zeros(1)})
    with pytest.raises(te.T5KeyError, match="not in the HF->Wan table"):
        te.hf_to_wan_t5_keys({"decoder.block.0.layer.0.layer_norm.weight": torch.zeros(1)})
    emb = wan_sd["token_embedding.weight"]
    with pytest.raises(ValueError, match="tied embedding"):
        te.hf_to_wan_t5_keys({"shared.weight": emb, "encoder.embed_tokens.weight": emb + 1})


def test_strict_load_reports_missing_unexpected_and_shapes(wan_sd: dict) -> None:
    model = te.UMT5EncoderModel(te.tiny_umt5_config())
    partial = {k: v for k, v in wan_sd.items() if k != "blocks.1.norm2.weight"}
    with pytest.raises(ValueError, match=r"missing 1: \['encoder.block.1.layer.1.layer_norm.weight'\]"):
        te.load_wan_t5_state(model, partial)
    bad = {**wan_sd, "norm.weight": torch.ones(7)}
    with pytest.raises(ValueError, match="mis-shaped 1"):
        te.load_wan_t5_state(model, bad)
    extra = {**wan_sd, "blocks.9.norm1.weight": torch.ones(32)}
    with pytest.raises(ValueError, match="unexpected 1"):
        te.load_wan_t5_state(model, extra)


def test_hf_through_mapping_matches_wan_reference(wan_sd: dict) -> None:
    """Load the Wan-layout dict into a meta-built HF model via the table; compare to the reference math."""
    model = te.umt5_from_wan_state(te.tiny_umt5_config(), wan_sd)
    assert model.shared.weight.data_ptr() == model.encoder.embed_tokens.weight.data_ptr()
    encoder = te.WanTextEncoder(model, te.ByT5Tokenizer(), text_len=16)
    ids, mask = encoder.tokenize(["a cat on a mat", "dog", "x" * 40])
    hf_raw = model(input_ids=ids, attention_mask=mask).last_hidden_state
    ref = wan_t5_reference(wan_sd, ids, mask, num_heads=4)
    assert torch.allclose(hf_raw, ref, atol=1e-5, rtol=1e-5), (hf_raw - ref).abs().max()
    out = encoder.encode(["a cat on a mat", "dog", "x" * 40])
    valid = mask.bool()
    assert torch.allclose(out[valid], ref[valid], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------- encode / tokenize


def test_tokenize_byte_ids_eos_and_padding(tiny_encoder: te.WanTextEncoder) -> None:
    ids, mask = tiny_encoder.tokenize(["ab", "  ab\n\t "])
    expected = [ord("a") + 3, ord("b") + 3, 1] + [0] * 13  # ByT5: byte + 3, EOS 1, pad 0
    assert ids.tolist() == [expected, expected]  # cleaning strips whitespace
    assert mask.tolist() == [[1, 1, 1] + [0] * 13] * 2
    long_ids, long_mask = tiny_encoder.tokenize(["y" * 100])
    assert long_ids.shape == (1, 16) and long_mask.all() and long_ids[0, -1] == 1  # truncation keeps EOS


def test_encode_zero_rows_past_length_and_shape(tiny_encoder: te.WanTextEncoder) -> None:
    dit = tiny_dit()
    out = tiny_encoder.encode(["hello there", "hi"])
    assert out.shape == (2, dit.text_len, dit.text_dim)
    assert not out.requires_grad
    assert (out[0, 12:] == 0).all() and (out[1, 3:] == 0).all()  # 11 bytes + EOS; 2 bytes + EOS
    assert (out[0, :12].abs().sum(-1) > 0).all() and (out[1, :3].abs().sum(-1) > 0).all()
    # a prompt's encoding does not depend on its batch-mates
    assert torch.allclose(tiny_encoder.encode(["hi"])[0], out[1], atol=1e-6)


def test_tiny_is_deterministic_per_seed() -> None:
    cfg = te.tiny_text_encoder_config()
    a = te.build_text_encoder(cfg, seed=1).encode(["same prompt"])
    b = te.build_text_encoder(cfg, seed=1).encode(["same prompt"])
    c = te.build_text_encoder(cfg, seed=2).encode(["same prompt"])
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_lru_cache_gives_same_result_and_evicts() -> None:
    cfg = te.TextEncoderConfig(kind="tiny", text_len=16, dtype="float32", cache_size=2)
    enc = te.build_text_encoder(cfg, seed=0)
    plain = te.build_text_encoder(te.tiny_text_encoder_config(), seed=0)
    prompts = ["one", "two", "one", "three"]
    assert torch.allclose(enc.encode(prompts), plain.encode(prompts), atol=1e-6)
    assert list(enc._cache) == ["one", "three"]


# -------------------------------------------------------------------------------------------- cleaning


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("  a   cat\n\n on\ta mat  ", "a cat on a mat"),
        ("Tom &amp; Jerry", "Tom & Jerry"),
        ("Tom &amp;amp; Jerry", "Tom & Jerry"),  # unescaped twice
        ("caf\u00c3\u00a9 au lait", "caf\u00e9 au lait"),  # mojibake fixed by ftfy
        ("\u201cquoted\u201d", '"quoted"'),  # ftfy uncurls quotes
    ],
)
def test_clean_prompt(raw: str, clean: str) -> None:
    assert te.clean_prompt(raw) == clean


# ---------------------------------------------------------------------------------------------- errors


def test_missing_directory_and_files_errors(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="models_t5_umt5-xxl-enc-bf16.pth.*Wan-AI/Wan2.1-T2V-1.3B"):
        te.build_text_encoder(te.TextEncoderConfig())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        te.build_text_encoder(te.TextEncoderConfig(directory=tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="weights file .* is missing.*google/umt5-xxl"):
        te.build_text_encoder(te.TextEncoderConfig(directory=tmp_path))
    (tmp_path / te.WAN_T5_WEIGHTS_FILE).write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="tokenizer folder"):
        te.build_text_encoder(te.TextEncoderConfig(directory=tmp_path))


def test_umt5_xxl_path_reads_files_and_rejects_wrong_weights(tmp_path, wan_sd: dict) -> None:
    """The real loader: local tokenizer + weights_only torch.load; tiny weights must not fit the XXL shapes."""
    te.ByT5Tokenizer().save_pretrained(tmp_path / te.WAN_T5_TOKENIZER_DIR)
    weights = tmp_path / te.WAN_T5_WEIGHTS_FILE
    torch.save(wan_sd, weights)
    with pytest.raises(ValueError, match="mis-shaped"):
        te.build_text_encoder(te.TextEncoderConfig(directory=tmp_path))
    weights.write_bytes(weights.read_bytes()[:200])  # truncated download
    with pytest.raises(RuntimeError, match="re-download"):
        te.build_text_encoder(te.TextEncoderConfig(directory=tmp_path))


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="takes no directory"):
        te.TextEncoderConfig(kind="tiny", directory="/tmp")
    with pytest.raises(ValueError):
        te.TextEncoderConfig(text_len=0)
    with pytest.raises(ValueError):
        te.TextEncoderConfig(unknown=1)
