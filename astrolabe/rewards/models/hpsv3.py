"""HPSv3 video reward: Qwen2-VL-7B + RankNet head, every frame scored, top-30% frame mean of mu.

Reference (``video_hpsv3_local``, reference doc 6.2; model class from MizzenAI/HPSv3
``Qwen2VLRewardModelBT``): each frame is an image input at ``min_pixels = max_pixels = 256*28*28``
(480x832 -> 336x588), prompt = HPSv3 ``INSTRUCTION`` + the ``<|Reward|>`` suffix in the Qwen2-VL chat
template (both byte for byte as ``INSTRUCTION`` / ``prompt_with_special_token`` of the ``hpsv3`` package's Qwen
collator, ``hpsv3/dataset/data_collator_qwen.py`` of hpsv3 1.0.0 on PyPI, which MizzenAI/HPSv3
``hpsv3/inference.py`` imports; four lines end in spaces, written ``\x20`` so no editor strips them; pinned by
a sha256 test); the head output at ``<|Reward|>`` is (mu, sigma) and mu is the frame score; the video score
is the mean of the top ``int(0.3 * F)`` frame scores (F = 81 -> 24 frames).

Files (offline, never downloaded):

- ``checkpoint_dir/HPSv3.safetensors`` (HF ``MizzenAI/HPSv3``): the **full** fine-tuned model
  (vision tower, language model, ``rm_head``), loaded strictly; its ``lm_head.weight`` is dropped.
- ``backbone_dir`` = a local ``Qwen/Qwen2-VL-7B-Instruct`` snapshot: ``config.json``, ``tokenizer.json``,
  ``tokenizer_config.json``, ``preprocessor_config.json`` (its weights are not read: HPSv3 replaces them).

Head: ``rm_head_type="ranknet"`` without kwargs, i.e. Linear(D, 1024) -> ReLU -> Dropout -> Linear(1024,
16) -> ReLU -> Linear(16, 2) (keys ``rm_head.{0,3,5}``). This is read from the upstream class and
``HPSv3_7B.yaml`` as ported by third parties; a different head fails the strict load with the key
list. Deviations from the reference: frames are resized with torch's antialiased bicubic (not PIL),
the head runs in float32 and scores are returned as float32 (no bf16 quantization of the output).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field

from astrolabe._compat import install_torchvision_guard
from astrolabe.rewards.contract import RewardOutput
from astrolabe.rewards.video import VideoBatch, sample_frame_indices
from astrolabe.rewards.models.common import (
    ModelReward,
    ModelRewardOptions,
    fingerprint_files,
    normalize_pixels,
    require_files,
    resize_frames,
    resolved_dir,
    top_fraction_mean,
)
from astrolabe.rewards.models.qwen2vl import (
    Qwen2VLPromptEncoder,
    Qwen2VLRewardNet,
    load_qwen2vl_config,
    load_safetensors_converted,
    materialize_reward_net,
    patchify_qwen2vl,
    smart_resize,
)

logger = logging.getLogger(__name__)

__all__ = ["HPSv3Options", "HPSv3Reward", "build", "build_hpsv3_head", "hpsv3_prompt"]

CHECKPOINT_FILE = "HPSv3.safetensors"
BACKBONE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
REWARD_TOKEN = "<|Reward|>"
_SOURCE = (
    "get HPSv3.safetensors from the Hugging Face repo MizzenAI/HPSv3 and a Qwen/Qwen2-VL-7B-Instruct snapshot "
    "(config + tokenizer + preprocessor files) with `huggingface-cli download`, then point checkpoint_dir / "
    "backbone_dir at them"
)

INSTRUCTION = """
You are tasked with evaluating a generated image based on Visual Quality and Text Alignment and give a overall score to estimate the human preference. Please provide a rating from 0 to 10, with 0 being the worst and 10 being the best.\x20

**Visual Quality:**\x20\x20
Evaluate the overall visual quality of the image. The following sub-dimensions should be considered:
- **Reasonableness:** The image should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the image. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the image, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The image should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible.\x20

**Text Alignment:**\x20\x20
Assess how well the image matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the image (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the image adheres to this style.
- **Contextual Consistency**: Assess whether the background, setting, and surrounding elements in the image logically fit the scenario described in the prompt. The environment should support and enhance the subject without contradictions.
- **Attribute Fidelity**: Check if specific attributes mentioned in the prompt (e.g., colors, clothing, accessories, expressions, actions) are faithfully represented in the image. Minor deviations may be acceptable, but critical attributes should be preserved.
- **Semantic Coherence**: Evaluate whether the overall meaning and intent of the prompt are captured in the image. The generated content should not introduce elements that conflict with or distort the original description.
Textual prompt - {text_prompt}


"""
PROMPT_WITH_SPECIAL_TOKEN = """
Please provide the overall ratings of this image: <|Reward|>

END
"""


def hpsv3_prompt(prompt: str) -> str:
    """The user text HPSv3 scores a frame with: ``INSTRUCTION.format(prompt) + PROMPT_WITH_SPECIAL_TOKEN``."""
    return INSTRUCTION.format(text_prompt=prompt) + PROMPT_WITH_SPECIAL_TOKEN


class HPSv3Options(ModelRewardOptions):
    """HPSv3 options. ``batch_size`` counts *frames* per forward (the reference uses 4)."""

    backbone_dir: str = Field(min_length=1, description="Local Qwen2-VL-7B-Instruct snapshot (config + tokenizer).")
    max_frames: int | None = Field(None, ge=1, description="Frames scored per video (evenly spread); None = all.")
    top_fraction: float = Field(0.3, gt=0.0, le=1.0, description="Video score = mean of the top int(f*F) frames.")
    min_pixels: int = Field(256 * 28 * 28, ge=28 * 28, description="Qwen2-VL smart-resize lower area bound.")
    max_pixels: int = Field(256 * 28 * 28, ge=28 * 28, description="Qwen2-VL smart-resize upper area bound.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    batch_size: int = Field(4, ge=1, description="Frames per model forward.")


def build_hpsv3_head(hidden_size: int) -> torch.nn.Sequential:
    """HPSv3 ``ranknet`` head (no kwargs): Linear(D,1024)-ReLU-Dropout-Linear(1024,16)-ReLU-Linear(16,2)."""
    return torch.nn.Sequential(
        torch.nn.Linear(hidden_size, 1024),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.05),
        torch.nn.Linear(1024, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 2),
    )


class _LoadedHPSv3:
    """The loaded network, prompt encoder and pixel statistics (shared per process)."""

    def __init__(self, options: HPSv3Options, device: torch.device, dtype: torch.dtype) -> None:
        install_torchvision_guard()
        from transformers import AutoTokenizer

        backbone = Path(options.backbone_dir)
        state = load_safetensors_converted([Path(options.checkpoint_dir) / CHECKPOINT_FILE])
        if "language_model.embed_tokens.weight" not in state:
            raise ValueError(f"{CHECKPOINT_FILE} lacks the language model (embed_tokens): it must be the full model")
        vocab = state["language_model.embed_tokens.weight"].shape[0]
        config = load_qwen2vl_config(backbone, vocab, options.attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(str(backbone), local_files_only=True)
        self.encoder = Qwen2VLPromptEncoder(tokenizer, config, [REWARD_TOKEN])
        if self.encoder.reward_token_ids[0] >= vocab:
            raise ValueError(f"{REWARD_TOKEN} id {self.encoder.reward_token_ids[0]} >= checkpoint vocab {vocab}")
        hidden = config.text_config.hidden_size
        self.net = materialize_reward_net(lambda: Qwen2VLRewardNet(config, build_hpsv3_head(hidden)), state, device, dtype)
        pre = json.loads((backbone / "preprocessor_config.json").read_text())
        self.mean, self.std = pre["image_mean"], pre["image_std"]
        vision = config.vision_config
        self.patch, self.temporal, self.merge = vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size
        self.device, self.dtype = device, dtype


class HPSv3Reward(ModelReward):
    """HPSv3 preference score of a video (unbounded; ~ -5..15 on real data): top-30% mean of frame mu."""

    name: ClassVar[str] = "hpsv3"
    version: ClassVar[str] = "1"
    Options: ClassVar[type[HPSv3Options]] = HPSv3Options

    def __init__(self, options: HPSv3Options | None = None) -> None:
        super().__init__(options)
        require_files(self.options.checkpoint_dir, [CHECKPOINT_FILE], "HPSv3 checkpoint", _SOURCE)
        require_files(self.options.backbone_dir, BACKBONE_FILES, "HPSv3 Qwen2-VL backbone", _SOURCE)
        if self.options.min_pixels > self.options.max_pixels:
            raise ValueError("HPSv3 options: min_pixels must be <= max_pixels")

    # ---- identity ---------------------------------------------------------------------------------

    def fingerprint(self) -> str:
        a = fingerprint_files(self.options.checkpoint_dir, [CHECKPOINT_FILE])
        b = fingerprint_files(self.options.backbone_dir, BACKBONE_FILES)
        return f"{a}:{b}"

    def frame_sampling(self) -> dict[str, Any]:
        return {"stride": 1, "max_frames": self.options.max_frames, "top_fraction": self.options.top_fraction}

    def resolution(self) -> Any:
        return {"smart_resize": 28, "min_pixels": self.options.min_pixels, "max_pixels": self.options.max_pixels}

    # ---- scoring ----------------------------------------------------------------------------------

    def _model(self) -> _LoadedHPSv3:
        key = ("hpsv3", resolved_dir(self.options.checkpoint_dir), resolved_dir(self.options.backbone_dir),
               self.options.attn_implementation)
        return self.load_model(key, _LoadedHPSv3)

    def _pixels(self, model: _LoadedHPSv3, frames: np.ndarray) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(N, H, W, 3) uint8 -> patches (N, L, D) on device, per-frame grid (1->2 frames, h, w)."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(model.device).permute(0, 3, 1, 2).float()  # (N,3,H,W)
        size = smart_resize(x.shape[2], x.shape[3], model.patch * model.merge, self.options.min_pixels, self.options.max_pixels)
        x = resize_frames(x, size, clamp=(0.0, 255.0)).round()  # PIL-like uint8 result
        x = normalize_pixels(x, model.mean, model.std)
        return patchify_qwen2vl(x[:, None], model.patch, model.temporal, model.merge)  # (N, L, D)

    @torch.inference_mode()
    def _frame_scores(self, model: _LoadedHPSv3, frames: np.ndarray, ids: list[list[int]]) -> torch.Tensor:
        """mu of each (frame, token ids) item, ``batch_size`` items per forward: (N,) float32."""
        out = []
        for start in range(0, len(ids), self.options.batch_size):
            stop = min(start + self.options.batch_size, len(ids))
            patches, grid = self._pixels(model, frames[start:stop])
            input_ids, mask, positions = model.encoder.collate(ids[start:stop], model.device)
            grid_thw = torch.tensor([grid] * (stop - start), device=model.device)
            logits = model.net(input_ids, mask, patches.flatten(0, 1), grid_thw, model.encoder.visual_ids["image"], positions)
            out.append(logits[:, 0, 0].float().cpu())  # (n,) mu
        return torch.cat(out)

    def score_batch(self, batch: VideoBatch, prompts: Sequence[str]) -> RewardOutput:
        model = self._model()
        frame_idx = sample_frame_indices(batch.num_frames, 1, self.options.max_frames)
        h, w = smart_resize(batch.height, batch.width, model.patch * model.merge, self.options.min_pixels, self.options.max_pixels)
        num_tokens = (h // model.patch) * (w // model.patch) // model.merge**2
        scores = np.full(batch.size, np.nan, np.float32)
        mean_all = np.full(batch.size, np.nan, np.float32)
        errors: dict[int, str] = {}
        good, ids = [], []
        for i, prompt in enumerate(prompts):
            try:
                seq = model.encoder.encode(hpsv3_prompt(prompt), "image", num_tokens)
            except ValueError as exc:
                errors[i] = f"ValueError: {exc}"
                continue
            good.append(i)
            ids.extend([seq] * len(frame_idx))
        if good:
            frames = batch.uint8[np.asarray(good)][:, frame_idx].reshape(-1, batch.height, batch.width, 3)  # (N, H, W, 3)
            mu = self._frame_scores(model, frames, ids).view(len(good), len(frame_idx))  # (G, F)
            scores[good] = top_fraction_mean(mu, self.options.top_fraction).numpy()
            mean_all[good] = mu.mean(dim=1).numpy()
        return RewardOutput(scores, {"all_frames_mean": mean_all}, errors)


def build(options: dict[str, Any]) -> HPSv3Reward:
    """Registry builder: ``register_reward("hpsv3", "astrolabe.rewards.models.hpsv3:build")``."""
    return HPSv3Reward.from_options(options)
