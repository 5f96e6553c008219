"""Shared pieces of the model-based rewards: options, checkpoint checks and fingerprints, frame math.

Everything here is loaded **offline** from local directories named in the options; nothing is ever
downloaded. The second half holds the Qwen2-VL pieces shared by HPSv3 and VideoReward: smart resize,
patchify, chat rendering/tokenization, the reward network and checkpoint key conversion + LoRA merge.

Checkpoint fingerprint (the ``checkpoint_sha256`` of a reward's identity), :func:`fingerprint_files`:

    per file:  "<relative path>:<size in bytes>:<digest>"
    digest  =  sha256(whole file)                                 if size <= 2 MiB
               sha256(first 1 MiB) + sha256(last 1 MiB)           otherwise
    result  =  sha256("\\n".join(sorted per-file lines))

Reading 2 MiB of a 16 GB checkpoint takes milliseconds where a full SHA-256 takes minutes; any
re-save, re-quantization or truncation changes the size or the first/last MiB (safetensors and
torch-zip headers live at the start; the last tensors at the end). A change confined to the middle of
a large file with identical size is not detected: rename the directory's files or bump the version if
you edit checkpoints in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from pydantic import Field, field_validator

from astrolabe.rewards.base import RewardOptions

logger = logging.getLogger(__name__)

__all__ = [
    "DTypeName",
    "MissingCheckpointError",
    "ModelRewardOptions",
    "fingerprint_files",
    "linspace_frame_indices",
    "load_cached",
    "require_files",
    "resize_frames",
    "resolve_device",
    "resolve_dtype",
    "top_fraction_mean",
]

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
_MIB = 1 << 20
_SMALL_FILE_BYTES = 2 * _MIB
# Options that only say *where/how fast* a model runs, never *what* it computes: left out of identity.
EXECUTION_ONLY_OPTIONS = frozenset({"device", "batch_size", "checkpoint_dir", "backbone_dir"})


class MissingCheckpointError(FileNotFoundError):
    """A reward checkpoint directory lacks required files (the message lists them and their source)."""


class ModelRewardOptions(RewardOptions):
    """Options shared by every model reward (checkpoint directory, device, dtype, batch size)."""

    checkpoint_dir: str = Field(
        min_length=1, description="Local directory with the reward checkpoint (required; never downloaded)."
    )
    device: str = Field("auto", description="'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    dtype: DTypeName = Field("auto", description="Model dtype; 'auto' = bfloat16 on CUDA, float32 on CPU.")
    batch_size: int = Field(8, ge=1, description="Items (frames or videos, see the reward) per model forward.")

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value != "auto":
            try:
                torch.device(value)
            except RuntimeError as exc:
                raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}") from exc
        return value


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available else cpu; otherwise ``torch.device(name)``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available: set device: cpu (or auto)")
    return device


def resolve_dtype(name: DTypeName, device: torch.device) -> torch.dtype:
    """'auto' -> bfloat16 on CUDA, float32 elsewhere; otherwise the named dtype."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def require_files(directory: str | Path, names: Sequence[str], what: str, source: str) -> Path:
    """Return ``directory`` as a Path if it holds every file in ``names``.

    Raises:
        MissingCheckpointError: naming the directory, every missing file, and where to get them.
    """
    root = Path(directory).expanduser()
    if not root.is_dir():
        raise MissingCheckpointError(
            f"{what}: checkpoint directory {str(root)!r} does not exist. It must contain {list(names)}; {source}"
        )
    missing = [name for name in names if not (root / name).is_file()]
    if missing:
        raise MissingCheckpointError(f"{what}: {str(root)!r} is missing {missing} (needs {list(names)}); {source}")
    return root


def _file_digest(path: Path) -> str:
    size = path.stat().st_size
    with open(path, "rb") as handle:
        if size <= _SMALL_FILE_BYTES:
            return hashlib.sha256(handle.read()).hexdigest()
        head = hashlib.sha256(handle.read(_MIB)).hexdigest()
        handle.seek(size - _MIB)
        tail = hashlib.sha256(handle.read(_MIB)).hexdigest()
    return f"{head}+{tail}"


def fingerprint_files(root: str | Path, relative_paths: Sequence[str]) -> str:
    """Hex SHA-256 fingerprint of files under ``root`` (size + content digests, see module docstring)."""
    base = Path(root)
    lines = []
    for rel in sorted(set(relative_paths)):
        path = base / rel
        lines.append(f"{rel}:{path.stat().st_size}:{_file_digest(path)}")
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def linspace_frame_indices(num_frames: int, count: int) -> np.ndarray:
    """``round(linspace(0, T - 1, count))`` (round half to even, as ``torch.round``); repeats if T < count.

    For T = 81, count = 10: [0, 9, 18, 27, 36, 44, 53, 62, 71, 80] (the VideoReward sampling).
    """
    if num_frames < 1 or count < 1:
        raise ValueError(f"need num_frames >= 1 and count >= 1, got {num_frames}, {count}")
    return np.round(np.linspace(0.0, num_frames - 1, count)).astype(np.int64)


def top_fraction_mean(scores: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean of the ``k = max(1, int(fraction * F))`` largest scores per row: (B, F) -> (B,).

    With F = 81 and fraction 0.3, k = int(24.3) = 24 (the reference's top-30% frame average).
    """
    if scores.ndim != 2:
        raise ValueError(f"scores must have shape (B, F), got {tuple(scores.shape)}")
    k = max(1, int(fraction * scores.shape[1]))
    top = torch.topk(scores, k, dim=1).values  # (B, k)
    return top.mean(dim=1)


def resize_frames(frames: torch.Tensor, size: tuple[int, int], clamp: tuple[float, float] | None) -> torch.Tensor:
    """Bicubic, antialiased resize of (N, C, H, W) float frames to ``size = (h, w)`` (no-op if equal).

    ``clamp`` clips the bicubic overshoot (what a uint8 PIL resize does); None leaves it (torchvision
    on float tensors).
    """
    if tuple(frames.shape[-2:]) == tuple(size):
        return frames
    out = torch.nn.functional.interpolate(frames, size=size, mode="bicubic", antialias=True, align_corners=False)
    return out if clamp is None else out.clamp(*clamp)


# --------------------------------------------------------------------------------------------------
# Process-wide model cache: one loaded model per (kind, checkpoint, device, dtype)
# --------------------------------------------------------------------------------------------------

_T = TypeVar("_T")
_CACHE: dict[tuple[Any, ...], Any] = {}
_CACHE_LOCK = threading.Lock()


def load_cached(key: tuple[Any, ...], loader: Callable[[], _T]) -> _T:
    """Return the object cached under ``key`` or build it with ``loader()`` once (thread-safe)."""
    with _CACHE_LOCK:
        if key not in _CACHE:
            logger.info("loading reward model %s", key)
            _CACHE[key] = loader()
        return _CACHE[key]


def clear_model_cache() -> None:
    """Drop every cached reward model (frees memory; the next score reloads)."""
    with _CACHE_LOCK:
        _CACHE.clear()


# --------------------------------------------------------------------------------------------------
# Qwen2-VL: resize, patchify, prompt tokens
# --------------------------------------------------------------------------------------------------

QWEN2VL_SYSTEM_TURN = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
_VISUAL_PAD = {"image": "<|image_pad|>", "video": "<|video_pad|>"}


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL ``smart_resize``: sides multiples of ``factor``, area in [min_pixels, max_pixels], aspect kept.

        h, w = round(H/f)*f, round(W/f)*f                       (at least f)
        if h*w > max:  beta = sqrt(H*W/max);  h, w = floor(H/beta/f)*f, floor(W/beta/f)*f
        if h*w < min:  beta = sqrt(min/(H*W)); h, w = ceil(H*beta/f)*f,  ceil(W*beta/f)*f

    480x832 with max_pixels = 256*28*28 gives 336x588 (the reference's HPSv3/VideoReward input).
    """
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds 200, Qwen2-VL cannot take it")
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patchify_qwen2vl(
    frames: torch.Tensor, patch_size: int, temporal_patch_size: int, merge_size: int
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Qwen2-VL patch layout of N equally sized clips: (N, T, C, H, W) -> (N, t*h*w, C*tp*p*p), (t, h, w).

    As ``Qwen2VLImageProcessor``: pad T to a multiple of tp by repeating the last frame (an image is
    one frame, so it is doubled), then with grid t = T/tp, h = H/p, w = W/p and m = merge_size::

        (t, tp, C, h/m, m, p, w/m, m, p) -> permute (t, h/m, w/m, m, m, C, tp, p, p) -> (t*h*w, C*tp*p*p)

    so that each group of m*m consecutive rows is one merged (2x2) visual token.
    """
    n, t_frames, channels, height, width = frames.shape
    if height % (patch_size * merge_size) or width % (patch_size * merge_size):
        raise ValueError(f"frame size {height}x{width} must be a multiple of patch*merge = {patch_size * merge_size}")
    remainder = t_frames % temporal_patch_size
    if remainder:
        pad = frames[:, -1:].expand(n, temporal_patch_size - remainder, channels, height, width)
        frames = torch.cat([frames, pad], dim=1)
    grid_t = frames.shape[1] // temporal_patch_size
    grid_h, grid_w = height // patch_size, width // patch_size
    x = frames.reshape(
        n, grid_t, temporal_patch_size, channels,
        grid_h // merge_size, merge_size, patch_size, grid_w // merge_size, merge_size, patch_size,
    )
    x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)  # (N, t, h/m, w/m, m, m, C, tp, p, p)
    x = x.reshape(n, grid_t * grid_h * grid_w, channels * temporal_patch_size * patch_size * patch_size)
    return x, (grid_t, grid_h, grid_w)


def render_qwen2vl_chat(text: str, visual: Literal["image", "video"]) -> str:
    """The Qwen2-VL-Instruct chat template for one user turn ``[visual, text]`` + generation prompt::

        <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
        <|im_start|>user\\n<|vision_start|><|image_pad|><|vision_end|>{text}<|im_end|>\\n<|im_start|>assistant\\n
    """
    return (
        f"{QWEN2VL_SYSTEM_TURN}<|im_start|>user\n<|vision_start|>{_VISUAL_PAD[visual]}<|vision_end|>"
        f"{text}<|im_end|>\n<|im_start|>assistant\n"
    )


class Qwen2VLPromptEncoder:
    """Tokenizes reward prompts for a Qwen2-VL reward model (local tokenizer + added reward tokens).

    The reward tokens are appended as special tokens exactly as the reference does
    (``add_special_tokens`` on the base tokenizer: ids ``len(tokenizer), len(tokenizer)+1, ...``).
    """

    def __init__(self, tokenizer: Any, config: Any, reward_tokens: Sequence[str]) -> None:
        from transformers import AddedToken

        tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in reward_tokens], special_tokens=True)
        self.tokenizer = tokenizer
        self.reward_token_ids = [int(tokenizer.convert_tokens_to_ids(t)) for t in reward_tokens]
        self.pad_id = tokenizer.pad_token_id
        if self.pad_id is None:
            raise ValueError("the Qwen2-VL tokenizer has no pad token; tokenizer_config.json must set pad_token")
        expected = {
            "<|image_pad|>": config.image_token_id,
            "<|video_pad|>": config.video_token_id,
            "<|vision_start|>": config.vision_start_token_id,
        }
        for token, token_id in expected.items():
            got = tokenizer.convert_tokens_to_ids(token)
            if got != token_id:
                raise ValueError(f"tokenizer maps {token} to {got} but config.json says {token_id}: mismatched files")
        self.visual_ids = {"image": config.image_token_id, "video": config.video_token_id}

    def encode(self, text: str, visual: Literal["image", "video"], num_visual_tokens: int) -> list[int]:
        """Token ids of the rendered chat with the visual pad expanded to ``num_visual_tokens`` copies.

        Raises:
            ValueError: the prompt itself contains a reward/visual special token (unscorable sample).
        """
        ids = self.tokenizer(render_qwen2vl_chat(text, visual), add_special_tokens=False)["input_ids"]
        pad = self.visual_ids[visual]
        if sum(i == pad for i in ids) != 1 or any(sum(i == r for i in ids) != 1 for r in self.reward_token_ids):
            raise ValueError("prompt text contains Qwen2-VL visual or reward special tokens; cannot score it")
        at = ids.index(pad)
        return ids[:at] + [pad] * num_visual_tokens + ids[at + 1 :]

    def collate(self, sequences: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-pad to (B, L) ids + mask; ``positions`` (B, K) of the K reward tokens in each row."""
        length = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), length), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, : len(seq)] = torch.as_tensor(seq)
            mask[row, : len(seq)] = 1
        positions = torch.tensor([[list(seq).index(r) for r in self.reward_token_ids] for seq in sequences])
        return ids.to(device), mask.to(device), positions.to(device)


# --------------------------------------------------------------------------------------------------
# Qwen2-VL reward network
# --------------------------------------------------------------------------------------------------


class Qwen2VLRewardNet(torch.nn.Module):
    """Qwen2-VL vision tower + language model + a reward head read at the reward-token positions.

    Forward (as the reference ``Qwen2VLRewardModelBT`` of HPSv3 / VideoReward under transformers 4.45):

        e = embed(ids);  e[ids == visual_pad] = merger(vision_tower(pixels, grid_thw))
        h = language_model(e, mask, positions = 0..L-1 on all three M-RoPE axes)   # (B, L, D)
        logits[b, k] = head(h[b, pos[b, k]])                                         # (B, K, N) float32

    The reference calls the *text* model directly with ``position_ids=None``, so visual tokens get
    plain sequential positions (not the spatial M-RoPE ids of ``Qwen2VLModel.get_rope_index``); the
    checkpoints were trained that way and we reproduce it. The head runs in float32.
    """

    def __init__(self, config: Any, head: torch.nn.Module) -> None:
        super().__init__()
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel,
            Qwen2VLTextModel,
        )

        self.config = config
        self.visual = Qwen2VisionTransformerPretrainedModel(config.vision_config)
        self.language_model = Qwen2VLTextModel(config.text_config)
        self.rm_head = head

    def forward(
        self,
        input_ids: torch.Tensor,  # (B, L)
        attention_mask: torch.Tensor,  # (B, L)
        pixel_values: torch.Tensor,  # (sum of patches, C*tp*p*p)
        grid_thw: torch.Tensor,  # (items, 3)
        visual_token_id: int,
        reward_positions: torch.Tensor,  # (B, K)
    ) -> torch.Tensor:
        embeds = self.language_model.embed_tokens(input_ids)  # (B, L, D)
        visual = self.visual(pixel_values.to(embeds.dtype), grid_thw=grid_thw).pooler_output  # (V, D)
        slots = (input_ids == visual_token_id).unsqueeze(-1).expand_as(embeds)
        if int(slots[..., 0].sum()) != visual.shape[0]:
            raise ValueError(f"{int(slots[..., 0].sum())} visual pad tokens for {visual.shape[0]} visual features")
        embeds = embeds.masked_scatter(slots, visual.to(embeds.dtype))
        b, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).view(1, 1, length).expand(3, b, length)
        hidden = self.language_model(
            inputs_embeds=embeds, attention_mask=attention_mask, position_ids=positions, use_cache=False
        ).last_hidden_state  # (B, L, D)
        picked = hidden[torch.arange(b, device=hidden.device)[:, None], reward_positions]  # (B, K, D)
        return self.rm_head(picked.float())  # (B, K, N)


def load_qwen2vl_config(backbone_dir: Path, vocab_size: int, attn_implementation: str) -> Any:
    """Qwen2VLConfig from ``backbone_dir/config.json`` (legacy flat or nested), vocab resized to the checkpoint."""
    from transformers import Qwen2VLConfig

    config = Qwen2VLConfig.from_pretrained(str(backbone_dir), local_files_only=True)
    config.text_config.vocab_size = vocab_size
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = attn_implementation
    return config


# Checkpoint key conversion: first matching prefix wins; None = dropped (unused by a reward).
QWEN2VL_KEY_TABLE: tuple[tuple[str, str | None], ...] = (
    ("model.visual.", "visual."),  # transformers >= 4.52 layout
    ("model.language_model.", "language_model."),
    ("visual.", "visual."),  # transformers 4.45 layout (the reference checkpoints)
    ("model.", "language_model."),
    ("rm_head.", "rm_head."),
    ("lm_head.", None),  # the language-model head is never used for scoring
)
_PEFT_PREFIX = "base_model.model."


def convert_qwen2vl_key(key: str) -> str | None:
    """Map a checkpoint key (legacy, new or PEFT-wrapped) to :class:`Qwen2VLRewardNet`; None = dropped.

    PEFT wrappers are unwrapped first: ``base_model.model.`` prefix removed, ``.base_layer`` and
    ``.modules_to_save.default`` removed; ``.original_module.`` keys are dropped.
    """
    if ".original_module." in key:
        return None
    if key.startswith(_PEFT_PREFIX):
        key = key[len(_PEFT_PREFIX) :]
    key = key.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
    for source, target in QWEN2VL_KEY_TABLE:
        if key.startswith(source):
            return None if target is None else target + key[len(source) :]
    raise KeyError(f"unexpected Qwen2-VL checkpoint key {key!r}: not covered by QWEN2VL_KEY_TABLE")


_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def split_lora_key(key: str) -> tuple[str, str] | None:
    """``<module>.lora_A[.default].weight`` -> (module, 'lora_A'); ``<module>.lora_embedding_A[.default]`` too."""
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _LORA_PARTS:
            return ".".join(parts[:i]), part
    return None


def merge_lora_into(state: dict[str, torch.Tensor], lora: dict[str, torch.Tensor], scaling: float) -> None:
    """Merge LoRA pairs into ``state`` in place (float32 math, then the weight's dtype).

        Linear:    W (out, in)  += scaling * B (out, r) @ A (r, in)
        Embedding: E (V, D)     += scaling * (B (D, r) @ A (r, V))^T      (PEFT lora_embedding_A/B)
    """
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in lora.items():
        split = split_lora_key(key)
        if split is None:
            raise KeyError(f"{key!r} is not a LoRA key")
        modules.setdefault(split[0], {})[split[1]] = value
    for module, parts in modules.items():
        target = convert_qwen2vl_key(module + ".weight")
        if target is None:
            continue
        if target not in state:
            raise KeyError(f"LoRA targets {module!r} -> {target!r}, which the model does not have")
        weight = state[target]
        if {"lora_A", "lora_B"} <= parts.keys():
            delta = parts["lora_B"].float() @ parts["lora_A"].float()  # (out, in)
        elif {"lora_embedding_A", "lora_embedding_B"} <= parts.keys():
            delta = (parts["lora_embedding_B"].float() @ parts["lora_embedding_A"].float()).T  # (V, D)
        else:
            raise KeyError(f"incomplete LoRA pair for {module!r}: has {sorted(parts)}")
        if delta.shape != weight.shape:
            raise ValueError(f"LoRA delta {tuple(delta.shape)} does not match {target} {tuple(weight.shape)}")
        state[target] = (weight.float() + scaling * delta.to(weight.device)).to(weight.dtype)


def materialize_reward_net(
    build: Callable[[], Qwen2VLRewardNet], state: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype
) -> Qwen2VLRewardNet:
    """Build the net on the meta device, load ``state`` strictly (assign), rebuild rotary buffers, move.

    No random initialisation of billions of parameters happens; every parameter must come from
    ``state`` (strict). The backbone is cast to ``dtype``; the reward head stays float32.
    """
    from transformers.models.qwen2_vl.modeling_qwen2_vl import (
        Qwen2VLRotaryEmbedding,
        Qwen2VLVisionRotaryEmbedding,
    )

    with torch.device("meta"):
        net = build()
    state = {k: (v.float() if k.startswith("rm_head.") else v.to(dtype)) for k, v in state.items()}
    net.load_state_dict(state, strict=True, assign=True)
    net.language_model.rotary_emb = Qwen2VLRotaryEmbedding(config=net.config.text_config)
    net.visual.rotary_pos_emb = Qwen2VLVisionRotaryEmbedding(net.config.vision_config)
    leftover = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"reward net has uninitialised tensors after loading: {leftover[:5]}")
    return net.to(device).eval().requires_grad_(False)


def load_safetensors_converted(paths: Sequence[Path]) -> dict[str, torch.Tensor]:
    """Read safetensors files on CPU and convert keys with :func:`convert_qwen2vl_key` (dropping None)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    for path in paths:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for key in handle.keys():
                target = convert_qwen2vl_key(key)
                if target is not None:
                    out[target] = handle.get_tensor(key)
    return out


def normalize_pixels(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., C, H, W) in [0, 255] -> (x / 255 - mean) / std per channel."""
    m = torch.as_tensor(mean, dtype=frames.dtype, device=frames.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=frames.dtype, device=frames.device).view(-1, 1, 1)
    return (frames / 255.0 - m) / s


# --------------------------------------------------------------------------------------------------
# Random-weight Qwen2-VL checkpoints in the real on-disk layout (tests, benchmarks)
# --------------------------------------------------------------------------------------------------

QWEN2VL_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>",
)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def qwen2vl_test_config(
    hidden: int = 32, layers: int = 2, heads: int = 4, kv_heads: int = 2, intermediate: int = 64,
    vision_depth: int = 2, vision_dim: int = 32, vision_heads: int = 2, vocab: int = 272,
) -> Any:
    """A Qwen2VLConfig whose special-token ids match :func:`write_test_tokenizer` (byte-level, 263 ids).

    Real sizes: 7B = (3584, 28, 28, 4, 18944, 32, 1280, 16, 152064); 2B = (1536, 28, 12, 2, 8960, 32, 1280, 16, 151936).
    """
    from transformers import Qwen2VLConfig

    head_dim = hidden // heads
    section = [head_dim // 8, head_dim * 3 // 16, head_dim * 3 // 16]
    section[0] += head_dim // 2 - sum(section)
    return Qwen2VLConfig(
        text_config={
            "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "intermediate_size": intermediate, "vocab_size": vocab,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": section},
            "bos_token_id": 256, "eos_token_id": 258, "pad_token_id": None,
        },
        vision_config={"depth": vision_depth, "embed_dim": vision_dim, "num_heads": vision_heads, "hidden_size": hidden},
        image_token_id=261, video_token_id=262, vision_start_token_id=259, vision_end_token_id=260,
    )


def write_test_tokenizer(directory: Path) -> None:
    """Byte-level BPE tokenizer (256 byte tokens, no merges) + the Qwen2-VL special tokens (ids 256..262).

    Needs no download: any text tokenizes to its UTF-8 bytes. Saved as tokenizer.json + tokenizer_config.json.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(QWEN2VL_SPECIAL_TOKENS))
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<|endoftext|>", eos_token="<|im_end|>").save_pretrained(
        str(directory)
    )


def write_qwen2vl_backbone_files(directory: Path, config: Any) -> None:
    """config.json (legacy-compatible), tokenizer files and preprocessor_config.json of a Qwen2-VL snapshot."""
    directory.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(str(directory))
    write_test_tokenizer(directory)
    pre = {"image_mean": list(OPENAI_CLIP_MEAN), "image_std": list(OPENAI_CLIP_STD), "patch_size": 14,
           "temporal_patch_size": 2, "merge_size": 2, "image_processor_type": "Qwen2VLImageProcessor"}
    (directory / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))


def legacy_state_dict(net: Qwen2VLRewardNet) -> dict[str, torch.Tensor]:
    """``net``'s weights under the transformers-4.45 keys of the reference checkpoints (inverse table)."""
    out = {}
    for key, value in net.state_dict().items():
        if key.startswith("language_model."):
            key = "model." + key[len("language_model.") :]
        out[key] = value.detach().clone().contiguous()
    return out


def benchmark_model_rewards(
    work_dir: Path, num_videos: int = 4, frames: int = 9, height: int = 60, width: int = 104,
    device: str = "cpu", repeats: int = 2, seed: int = 0,
) -> dict[str, float]:
    """Videos/s of each model reward on random-weight *tiny* checkpoints written to ``work_dir``.

    Measures the real code path (file loading once, then ``repeats`` timed scoring calls after one
    warm-up). Returns reward name -> videos per second.
    """
    import time

    from astrolabe.rewards.base import RewardSpec, build_reward
    from astrolabe.rewards.models import hpsv2, hpsv3, videoalign

    hpsv2.write_random_checkpoint(work_dir / "hpsv2")
    hpsv3.write_random_checkpoint(work_dir / "hpsv3", work_dir / "qwen7", qwen2vl_test_config())
    videoalign.write_random_checkpoint(work_dir / "videoalign", work_dir / "qwen2", qwen2vl_test_config())
    specs = {
        "hpsv2": {"checkpoint_dir": str(work_dir / "hpsv2"), "architecture": "tiny-hps-test", "image_size": 32},
        "hpsv3": {"checkpoint_dir": str(work_dir / "hpsv3"), "backbone_dir": str(work_dir / "qwen7"),
                  "min_pixels": 28 * 28, "max_pixels": 56 * 112},
        "videoalign_mq": {"checkpoint_dir": str(work_dir / "videoalign"), "backbone_dir": str(work_dir / "qwen2")},
    }
    rng = np.random.default_rng(seed)
    videos = rng.integers(0, 256, (num_videos, frames, height, width, 3), dtype=np.uint8)
    prompts = [f"prompt {i}" for i in range(num_videos)]
    results = {}
    for name, options in specs.items():
        reward = build_reward(RewardSpec(name=name, options={**options, "device": device}))
        reward(videos, prompts)  # warm-up + model load
        start = time.perf_counter()
        for _ in range(repeats):
            reward(videos, prompts)
        results[name] = repeats * num_videos / (time.perf_counter() - start)
    return results
