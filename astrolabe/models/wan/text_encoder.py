"""umT5-XXL text encoder of Wan2.1, run through ``transformers.UMT5EncoderModel``.

Wan ships the encoder as ``models_t5_umt5-xxl-enc-bf16.pth`` in its own key layout; we load it into
the HF module through an explicit, two-way key table (``shared/reference/models-reference.md`` 3.2)
with strict semantics, and reproduce Wan's preprocessing (3.1):

* text cleaning: ``ftfy.fix_text``, ``html.unescape`` twice, strip, collapse whitespace runs;
* tokenizer ``google/umt5-xxl`` with ``add_special_tokens=True`` (appends EOS id 1), padded to
  ``max_length=text_len`` with pad id 0, truncated;
* output ``(B, text_len, d_model)``; rows at positions >= the prompt's token count (EOS included)
  are set to exactly 0.

A ``tiny`` kind (ByT5 byte tokenizer, 2-layer UMT5 of width 32, seeded random weights) needs no
download and matches the tiny DiT (``text_dim=32``, ``text_len=16``).
"""

from __future__ import annotations

import html
import logging
import re
from collections import OrderedDict
from pathlib import Path
from typing import Literal

import ftfy
import torch
from pydantic import Field, model_validator
from torch import nn

from astrolabe._compat import install_torchvision_guard
from astrolabe.configbase import Frozen

install_torchvision_guard()  # transformers imports torchvision (see astrolabe._compat)
from transformers import AutoTokenizer, ByT5Tokenizer, UMT5Config, UMT5EncoderModel  # noqa: E402

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]

WAN_T5_WEIGHTS_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_T5_TOKENIZER_DIR = "google/umt5-xxl"
WAN_T5_SOURCE = "Hugging Face repo `Wan-AI/Wan2.1-T2V-1.3B` (the 14B repo ships the same files)"
TINY_TEXT_LEN = 16  # == astrolabe.models.wan.config.tiny().text_len
TINY_DIM = 32  # == astrolabe.models.wan.config.tiny().text_dim
TINY_PROMPT_BYTES = TINY_TEXT_LEN - 1  # ByT5: one token per UTF-8 byte, then EOS: the tiny encoder reads 15 bytes

_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TextEncoderConfig(Frozen):
    """Which text encoder to build.

    ``kind="umt5_xxl"`` needs ``directory``: a local folder holding Wan's ``models_t5_umt5-xxl-enc-bf16.pth``
    and the tokenizer folder ``google/umt5-xxl/`` (e.g. a download of ``Wan-AI/Wan2.1-T2V-1.3B``).
    ``kind="tiny"`` is a seeded random CPU encoder for tests (no files).
    """

    kind: Literal["umt5_xxl", "tiny"] = "umt5_xxl"
    directory: Path | None = None
    text_len: int = Field(512, ge=1, le=4096, description="tokens per prompt; must equal the DiT's text_len")
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    cache_size: int = Field(0, ge=0, description="LRU cache of per-prompt encodings (0 = off)")

    @model_validator(mode="after")
    def _check_kind(self) -> TextEncoderConfig:
        if self.kind == "tiny" and self.directory is not None:
            raise ValueError("kind='tiny' takes no directory (it needs no files); remove `directory`")
        return self

    @property
    def torch_dtype(self) -> torch.dtype:
        return _DTYPES[self.dtype]


def tiny_visible_text(prompt: str) -> str:
    """What the tiny encoder sees of ``prompt``: the first :data:`TINY_PROMPT_BYTES` UTF-8 bytes once cleaned."""
    return clean_prompt(prompt).encode("utf-8")[:TINY_PROMPT_BYTES].decode("utf-8", errors="ignore")


def tiny_text_encoder_config() -> TextEncoderConfig:
    """Config of the tiny CPU encoder matching the tiny DiT (dim 32, text_len 16, fp32)."""
    return TextEncoderConfig(kind="tiny", text_len=TINY_TEXT_LEN, dtype="float32")


# ----------------------------------------------------------------------------------------------- HF configs


def _umt5_encoder_config(vocab_size: int, d_model: int, d_kv: int, d_ff: int, num_layers: int, num_heads: int) -> UMT5Config:
    """UMT5 encoder config with Wan's fixed choices: 32 relative-position buckets up to distance 128,
    gated GELU FFN, layer-norm eps 1e-6, no dropout, encoder only, no KV cache."""
    return UMT5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_kv,
        d_ff=d_ff,
        num_layers=num_layers,
        num_heads=num_heads,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu",
        layer_norm_epsilon=1e-6,
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
    )


def umt5_xxl_config() -> UMT5Config:
    """HF config equivalent to Wan's ``umt5_xxl(encoder_only=True)`` (models-reference 3.2)."""
    return _umt5_encoder_config(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


def tiny_umt5_config() -> UMT5Config:
    """A 2-layer UMT5 with the ByT5 byte vocabulary (384 ids) and d_model = tiny DiT text_dim (32)."""
    return _umt5_encoder_config(vocab_size=384, d_model=TINY_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4)


# ------------------------------------------------------------------------------------------ key mapping

# Per-block suffixes: Wan `blocks.{i}.<wan>` <-> HF `encoder.block.{i}.<hf>`.
WAN_TO_HF_BLOCK_KEYS: dict[str, str] = {
    "norm1.weight": "layer.0.layer_norm.weight",
    "attn.q.weight": "layer.0.SelfAttention.q.weight",
    "attn.k.weight": "layer.0.SelfAttention.k.weight",
    "attn.v.weight": "layer.0.SelfAttention.v.weight",
    "attn.o.weight": "layer.0.SelfAttention.o.weight",
    "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
    "norm2.weight": "layer.1.layer_norm.weight",
    "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",  # activated (GELU) branch
    "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight",  # linear branch
    "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight",
}
HF_TO_WAN_BLOCK_KEYS: dict[str, str] = {hf: wan for wan, hf in WAN_TO_HF_BLOCK_KEYS.items()}
# Top-level keys. The Wan token embedding feeds both HF names (one tied tensor).
WAN_TO_HF_TOP_KEYS: dict[str, tuple[str, ...]] = {
    "token_embedding.weight": ("shared.weight", "encoder.embed_tokens.weight"),
    "norm.weight": ("encoder.final_layer_norm.weight",),
}
HF_TO_WAN_TOP_KEYS: dict[str, str] = {hf: wan for wan, hfs in WAN_TO_HF_TOP_KEYS.items() for hf in hfs}

_WAN_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.(.+)$")
_HF_BLOCK_RE = re.compile(r"^encoder\.block\.(\d+)\.(.+)$")


class T5KeyError(KeyError):
    """A key has no entry in the Wan <-> HF T5 table."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


def _wan_key_to_hf(key: str) -> tuple[str, ...]:
    if key in WAN_TO_HF_TOP_KEYS:
        return WAN_TO_HF_TOP_KEYS[key]
    m = _WAN_BLOCK_RE.match(key)
    if m and m.group(2) in WAN_TO_HF_BLOCK_KEYS:
        return (f"encoder.block.{m.group(1)}.{WAN_TO_HF_BLOCK_KEYS[m.group(2)]}",)
    raise T5KeyError(f"Wan T5 key {key!r} is not in the Wan->HF table (is this a Wan umT5 encoder file?)")


def _hf_key_to_wan(key: str) -> str:
    if key in HF_TO_WAN_TOP_KEYS:
        return HF_TO_WAN_TOP_KEYS[key]
    m = _HF_BLOCK_RE.match(key)
    if m and m.group(2) in HF_TO_WAN_BLOCK_KEYS:
        return f"blocks.{m.group(1)}.{HF_TO_WAN_BLOCK_KEYS[m.group(2)]}"
    raise T5KeyError(f"HF UMT5 key {key!r} is not in the HF->Wan table")


def wan_to_hf_t5_keys(sd: StateDict) -> StateDict:
    """Rename a Wan-layout umT5 encoder state dict to ``UMT5EncoderModel`` names (pure rename, no reshape).

    ``token_embedding.weight`` becomes both ``shared.weight`` and ``encoder.embed_tokens.weight``
    (the same tensor object). Unknown keys raise :class:`T5KeyError`.
    """
    out: StateDict = {}
    for key, tensor in sd.items():
        for hf_key in _wan_key_to_hf(key):
            out[hf_key] = tensor
    return out


def hf_to_wan_t5_keys(sd: StateDict) -> StateDict:
    """Inverse of :func:`wan_to_hf_t5_keys`. ``shared.weight`` and ``encoder.embed_tokens.weight`` must be equal."""
    out: StateDict = {}
    for key, tensor in sd.items():
        wan_key = _hf_key_to_wan(key)
        if wan_key in out:
            if out[wan_key].shape != tensor.shape or not torch.equal(out[wan_key], tensor):
                raise ValueError(f"{key!r} differs from the tied embedding already mapped to {wan_key!r}")
            continue
        out[wan_key] = tensor
    return out


def load_wan_t5_state(model: UMT5EncoderModel, wan_sd: StateDict, *, assign: bool = False) -> None:
    """Load a Wan-layout state dict into ``model`` with strict semantics.

    Raises ``ValueError`` naming the first missing / unexpected / mis-shaped keys (in HF names) before
    touching the model, then calls ``load_state_dict(strict=True)``.
    """
    hf_sd = wan_to_hf_t5_keys(wan_sd)
    expected = model.state_dict()
    missing = [k for k in expected if k not in hf_sd]
    unexpected = [k for k in hf_sd if k not in expected]
    shaped = [
        f"{k}: file {tuple(hf_sd[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in hf_sd and hf_sd[k].shape != v.shape
    ]
    if missing or unexpected or shaped:
        raise ValueError(
            "umT5 weights do not match the encoder "
            f"(missing {len(missing)}: {missing[:5]}; unexpected {len(unexpected)}: {unexpected[:5]}; "
            f"mis-shaped {len(shaped)}: {shaped[:5]}). Use Wan's {WAN_T5_WEIGHTS_FILE} from {WAN_T5_SOURCE}."
        )
    model.load_state_dict(hf_sd, strict=True, assign=assign)
    if assign:
        model.tie_weights()


# ---------------------------------------------------------------------------------------- preprocessing

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Wan's 'whitespace' cleaning: ftfy.fix_text, html.unescape twice, strip, collapse whitespace runs."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return _WHITESPACE.sub(" ", text).strip()


def _missing_files_error(directory: Path | None, problem: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{problem}. The umT5-XXL text encoder needs a local directory holding `{WAN_T5_WEIGHTS_FILE}` and the "
        f"tokenizer folder `{WAN_T5_TOKENIZER_DIR}/` (got directory={directory}). Download both from "
        f"{WAN_T5_SOURCE}, e.g. `huggingface-cli download Wan-AI/Wan2.1-T2V-1.3B {WAN_T5_WEIGHTS_FILE} "
        f"--include '{WAN_T5_TOKENIZER_DIR}/*' --local-dir <dir>`, and set text_encoder.directory=<dir>; "
        "or use kind='tiny' for CPU tests."
    )


def check_umt5_directory(directory: Path | None) -> tuple[Path, Path]:
    """Return (weights file, tokenizer dir) inside ``directory`` or raise naming what is missing."""
    if directory is None:
        raise _missing_files_error(directory, "text_encoder.directory is not set")
    directory = Path(directory)
    if not directory.is_dir():
        raise _missing_files_error(directory, f"directory {directory} does not exist")
    weights, tok_dir = directory / WAN_T5_WEIGHTS_FILE, directory / WAN_T5_TOKENIZER_DIR
    if not weights.is_file():
        raise _missing_files_error(directory, f"weights file {weights} is missing")
    if not (tok_dir / "tokenizer_config.json").is_file():
        raise _missing_files_error(directory, f"tokenizer folder {tok_dir} (tokenizer_config.json) is missing")
    return weights, tok_dir


# ----------------------------------------------------------------------------------------------- module


class WanTextEncoder(nn.Module):
    """Tokenizer + UMT5 encoder; ``encode(prompts)`` gives zero-padded embeddings ``(B, text_len, dim)``."""

    def __init__(self, model: UMT5EncoderModel, tokenizer, text_len: int, cache_size: int = 0) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.text_len = text_len
        self.cache_size = cache_size
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @property
    def dim(self) -> int:
        return self.model.config.d_model

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Clean and tokenize: ids and mask, both ``(B, text_len)`` int64 (pad id 0, EOS appended)."""
        out = self.tokenizer(
            [clean_prompt(p) for p in prompts],
            add_special_tokens=True,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            return_attention_mask=True,
            return_tensors="pt",
        )
        return out["input_ids"], out["attention_mask"]

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``(B, L)`` ids and mask -> ``(B, L, dim)``; rows where mask == 0 are exactly zero."""
        device = next(self.model.parameters()).device
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, L, D)
        return hidden.masked_fill(attention_mask[..., None] == 0, 0.0)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> torch.Tensor:
        """Encode prompts -> ``(B, text_len, dim)`` on the model's device and dtype (no grad)."""
        if isinstance(prompts, str):
            raise TypeError("encode() takes a list of prompts, not a single string")
        if self.cache_size == 0:
            return self(*self.tokenize(list(prompts)))
        todo = list(dict.fromkeys(p for p in prompts if p not in self._cache))
        if todo:
            for prompt, emb in zip(todo, self(*self.tokenize(todo)), strict=True):
                self._cache[prompt] = emb
        rows = []
        for prompt in prompts:
            self._cache.move_to_end(prompt)
            rows.append(self._cache[prompt])
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return torch.stack(rows)  # (B, text_len, D)


# ---------------------------------------------------------------------------------------------- builders


def init_tiny_weights(model: UMT5EncoderModel, generator: torch.Generator) -> None:
    """Deterministic init from ``generator``: norms 1, embeddings N(0, 1), linears N(0, 1/fan_in)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                param.fill_(1.0)
            elif param.ndim == 2 and ("shared" in name or "embed_tokens" in name or "relative_attention" in name):
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) * param.shape[1] ** -0.5)


def build_tiny_text_encoder(cfg: TextEncoderConfig, seed: int) -> WanTextEncoder:
    """Tiny encoder: ``ByT5Tokenizer()`` (byte ids < 384, pad 0, EOS 1) + seeded 2-layer UMT5 (width 32)."""
    model = UMT5EncoderModel(tiny_umt5_config())
    init_tiny_weights(model, torch.Generator().manual_seed(seed))
    return WanTextEncoder(model.to(cfg.torch_dtype), ByT5Tokenizer(), cfg.text_len, cfg.cache_size)


def umt5_from_wan_state(config: UMT5Config, wan_sd: StateDict) -> UMT5EncoderModel:
    """Build ``UMT5EncoderModel(config)`` on the meta device and assign the Wan-layout weights (strict)."""
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    load_wan_t5_state(model, wan_sd, assign=True)
    return model.eval()


def build_umt5_xxl_text_encoder(cfg: TextEncoderConfig, device: torch.device | str = "cpu") -> WanTextEncoder:
    """umT5-XXL from Wan's ``.pth`` (``torch.load(weights_only=True, mmap=True)``), built on meta then assigned."""
    weights, tok_dir = check_umt5_directory(cfg.directory)
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    logger.info("loading umT5-XXL weights from %s", weights)
    try:
        wan_sd = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # truncated download, not a torch file, ...
        raise RuntimeError(f"could not read {weights} ({err}); re-download it from {WAN_T5_SOURCE}") from err
    model = umt5_from_wan_state(umt5_xxl_config(), wan_sd).to(device=device, dtype=cfg.torch_dtype)
    return WanTextEncoder(model, tokenizer, cfg.text_len, cfg.cache_size)


def build_text_encoder(cfg: TextEncoderConfig, seed: int = 0, device: torch.device | str = "cpu") -> WanTextEncoder:
    """Build the encoder named by ``cfg.kind``; ``seed`` only matters for ``tiny`` (random weights)."""
    if cfg.kind == "tiny":
        return build_tiny_text_encoder(cfg, seed).to(device)
    return build_umt5_xxl_text_encoder(cfg, device)
