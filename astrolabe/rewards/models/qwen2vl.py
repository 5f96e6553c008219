"""Qwen2-VL pieces shared by the HPSv3 and VideoReward rewards.

Smart resize, patchify, chat rendering/tokenization (:class:`Qwen2VLPromptEncoder`), the reward network
(:class:`Qwen2VLRewardNet`), checkpoint key conversion + LoRA merge. Everything loads offline from local
directories. Random-weight checkpoints in the real on-disk layout (for tests) are in ``tests/fakes``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from astrolabe._compat import install_torchvision_guard

__all__ = [
    "QWEN2VL_KEY_TABLE",
    "Qwen2VLPromptEncoder",
    "Qwen2VLRewardNet",
    "convert_qwen2vl_key",
    "load_qwen2vl_config",
    "load_safetensors_converted",
    "materialize_reward_net",
    "merge_lora_into",
    "patchify_qwen2vl",
    "render_qwen2vl_chat",
    "smart_resize",
    "split_lora_key",
]


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
        install_torchvision_guard()
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
        install_torchvision_guard()
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
    install_torchvision_guard()
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
    install_torchvision_guard()
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
