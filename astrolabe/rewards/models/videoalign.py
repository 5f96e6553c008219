"""VideoReward (VideoAlign) rewards ``videoalign_vq`` / ``videoalign_mq`` / ``videoalign_ta``: one shared model.

Reference (reference doc 6.3; KwaiVGI/VideoAlign ``inference.py`` + ``prompt_template.py``): Qwen2-VL-2B
with three reward tokens ``<|VQ_reward|> <|MQ_reward|> <|TA_reward|>`` and a linear head
(``Linear(D, output_dim, bias=False)``); per video n frames at ``round(linspace(0, T-1, n))``, resized
(bicubic, antialiased) by Qwen2-VL smart resize with ``max_pixels = data_config.max_frame_pixels``
(480x832 -> 336x588 at 256*28*28), normalised with the stored mean/std, fed as a *video*
(temporal patch 2 -> grid t = n / 2). MQ sees the frames converted to 3-channel grayscale
(torchvision ``rgb_to_grayscale`` on uint8: floor(0.2989 R + 0.587 G + 0.114 B)). The head output at the
k-th reward token gives dimension k (diagonal when ``output_dim == 3``); with ``normalize`` the score is
``(x - mean_k) / std_k`` from ``inference_config``.

Frame sampling (options ``num_frames`` / ``fps``, exactly one set):

- ``num_frames: 10`` (default): n = 10 whatever the length, as the Astrolabe release's scorer does;
- ``num_frames: null, fps: 2.0``: VideoAlign's own inference (``data_config.fps = 2``; KwaiVGI/VideoAlign
  ``vision_process.py`` ``smart_nframes``), so a long video is not judged from 10 frames::

      n = T / video_fps * fps,  clamped to [4, floor_2(min(768, T))],  rounded to a multiple of 2 (half to even)

  with ``video_fps`` the frame rate of the scored videos (16 for every Wan2.1 model).

Files (offline): ``checkpoint_dir/model_config.json`` + the highest ``checkpoint_dir/checkpoint-<step>/``
holding either ``model.pth`` (full state dict) or ``adapter_model.safetensors`` + ``non_lora_state_dict.pth``
(LoRA deltas merged into the base weights: ``W += lora_alpha / r * B @ A``, ``/ sqrt(r)`` with rslora;
non-LoRA trained tensors replace base ones). ``backbone_dir`` = local Qwen2-VL-2B-Instruct snapshot
(config, tokenizer, preprocessor; plus, for the LoRA layout, its weights: the release's shards
``model-0000k-of-00002.safetensors`` listed by ``model.safetensors.index.json``, read through the index
with :func:`astrolabe.models.checkpoints.read_sharded_safetensors`, or a single ``model.safetensors``).
Pickles (``model.pth``, ``non_lora_state_dict.pth``: dicts of tensors as the VideoAlign trainer saves
them) are read with ``weights_only=True`` (:func:`astrolabe.models.checkpoints.safe_torch_load`).

Deviations: the head runs in float32 and the score is float32 (the reference casts to bf16); frames are
not re-quantized to integers between the resize and the normalisation; only the
``detailed_special`` prompt template (the one with reward tokens) is supported.
"""

from __future__ import annotations

import json
import logging
import math
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from pydantic import Field, field_validator, model_validator

from astrolabe._compat import install_torchvision_guard
from astrolabe.models.checkpoints import read_sharded_safetensors, safe_torch_load
from astrolabe.rewards.contract import RewardOutput
from astrolabe.rewards.video import VideoBatch
from astrolabe.rewards.models.common import (
    MissingCheckpointError,
    ModelReward,
    ModelRewardOptions,
    fingerprint_files,
    linspace_frame_indices,
    normalize_pixels,
    require_files,
    resize_frames,
    resolved_dir,
)
from astrolabe.rewards.models.qwen2vl import (
    Qwen2VLPromptEncoder,
    Qwen2VLRewardNet,
    convert_qwen2vl_key,
    load_qwen2vl_config,
    load_safetensors_converted,
    materialize_reward_net,
    merge_lora_into,
    patchify_qwen2vl,
    smart_resize,
    split_lora_key,
)

logger = logging.getLogger(__name__)

__all__ = ["VideoAlignOptions", "VideoAlignReward", "build_mq", "build_ta", "build_vq", "build_prompt"]

DIMENSIONS = ("VQ", "MQ", "TA")
REWARD_TOKENS = ("<|VQ_reward|>", "<|MQ_reward|>", "<|TA_reward|>")
BACKBONE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json")
BACKBONE_INDEX = "model.safetensors.index.json"  # the Qwen2-VL-2B-Instruct release: 2 shards + this index
BACKBONE_SINGLE = "model.safetensors"
FPS_MIN_FRAMES, FPS_MAX_FRAMES, FRAME_FACTOR = 4, 768, 2  # VideoAlign vision_process.py
VIDEO_MIN_PIXELS = 128 * 28 * 28  # qwen_vl_utils default for videos
_SOURCE = (
    "download the VideoReward checkpoint (Hugging Face KwaiVGI/VideoReward: model_config.json + checkpoint-*/) and a "
    "Qwen/Qwen2-VL-2B-Instruct snapshot with `huggingface-cli download`, then set checkpoint_dir / backbone_dir"
)

DETAILED_PROMPT_WITH_SPECIAL_TOKEN = """
You are tasked with evaluating a generated video based on three distinct criteria: Visual Quality, Motion Quality, and Text Alignment. Please provide a rating from 0 to 10 for each of the three categories, with 0 being the worst and 10 being the best. Each evaluation should be independent of the others.

**Visual Quality:**  
Evaluate the overall visual quality of the video, with a focus on static factors. The following sub-dimensions should be considered:
- **Reasonableness:** The video should not contain any significant biological or logical errors, such as abnormal body structures or nonsensical environmental setups.
- **Clarity:** Evaluate the sharpness and visibility of the video. The image should be clear and easy to interpret, with no blurring or indistinct areas.
- **Detail Richness:** Consider the level of detail in textures, materials, lighting, and other visual elements (e.g., hair, clothing, shadows).
- **Aesthetic and Creativity:** Assess the artistic aspects of the video, including the color scheme, composition, atmosphere, depth of field, and the overall creative appeal. The scene should convey a sense of harmony and balance.
- **Safety:** The video should not contain harmful or inappropriate content, such as political, violent, or adult material. If such content is present, the image quality and satisfaction score should be the lowest possible. 

Please provide the ratings of Visual Quality: <|VQ_reward|>
END

**Motion Quality:**  
Assess the dynamic aspects of the video, with a focus on dynamic factors. Consider the following sub-dimensions:
- **Stability:** Evaluate the continuity and stability between frames. There should be no sudden, unnatural jumps, and the video should maintain stable attributes (e.g., no fluctuating colors, textures, or missing body parts).
- **Naturalness:** The movement should align with physical laws and be realistic. For example, clothing should flow naturally with motion, and facial expressions should change appropriately (e.g., blinking, mouth movements).
- **Aesthetic Quality:** The movement should be smooth and fluid. The transitions between different motions or camera angles should be seamless, and the overall dynamic feel should be visually pleasing.
- **Fusion:** Ensure that elements in motion (e.g., edges of the subject, hair, clothing) blend naturally with the background, without obvious artifacts or the feeling of cut-and-paste effects.
- **Clarity of Motion:** The video should be clear and smooth in motion. Pay attention to any areas where the video might have blurry or unsteady sections that hinder visual continuity.
- **Amplitude:** If the video is largely static or has little movement, assign a low score for motion quality.

Please provide the ratings of Motion Quality: <|MQ_reward|>
END

**Text Alignment:**  
Assess how well the video matches the textual prompt across the following sub-dimensions:
- **Subject Relevance** Evaluate how accurately the subject(s) in the video (e.g., person, animal, object) align with the textual description. The subject should match the description in terms of number, appearance, and behavior.
- **Motion Relevance:** Evaluate if the dynamic actions (e.g., gestures, posture, facial expressions like talking or blinking) align with the described prompt. The motion should match the prompt in terms of type, scale, and direction.
- **Environment Relevance:** Assess whether the background and scene fit the prompt. This includes checking if real-world locations or scenes are accurately represented, though some stylistic adaptation is acceptable.  
- **Style Relevance:** If the prompt specifies a particular artistic or stylistic style, evaluate how well the video adheres to this style.
- **Camera Movement Relevance:** Check if the camera movements (e.g., following the subject, focus shifts) are consistent with the expected behavior from the prompt.

Textual prompt - {text_prompt}
Please provide the ratings of Text Alignment: <|TA_reward|>
END
"""


def build_prompt(prompt: str, template_type: str) -> str:
    """VideoAlign ``build_prompt`` for the supported template (``detailed_special``)."""
    if template_type != "detailed_special":
        raise ValueError(f"VideoReward prompt_template_type {template_type!r} unsupported: need 'detailed_special'")
    return DETAILED_PROMPT_WITH_SPECIAL_TOKEN.format(text_prompt=prompt)


class VideoAlignOptions(ModelRewardOptions):
    """VideoReward options. ``batch_size`` counts *videos* per forward."""

    backbone_dir: str = Field(min_length=1, description="Local Qwen2-VL-2B-Instruct snapshot.")
    num_frames: int | None = Field(
        10, ge=2, description="Frames per video, round(linspace(0, T-1, n)); must be even. null = sample by fps."
    )
    fps: float | None = Field(
        None, gt=0, description="Sample by time instead (VideoAlign's own inference: 2.0); needs num_frames: null."
    )
    video_fps: float = Field(16.0, gt=0, description="Frame rate of the scored videos (fps sampling only).")
    normalize: bool = Field(True, description="Return (x - mean) / std with the checkpoint's inference_config.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = "sdpa"
    batch_size: int = Field(2, ge=1, description="Videos per model forward.")

    @field_validator("num_frames")
    @classmethod
    def _even(cls, value: int | None) -> int | None:
        if value is not None and value % 2:
            raise ValueError(f"num_frames must be even (Qwen2-VL temporal patch 2), got {value}")
        return value

    @model_validator(mode="after")
    def _one_sampling(self) -> VideoAlignOptions:
        if (self.num_frames is None) == (self.fps is None):
            raise ValueError(
                "set exactly one of num_frames (fixed count, default 10) and fps (e.g. num_frames: null, fps: 2.0)"
            )
        return self


def fps_frame_count(total_frames: int, video_fps: float, fps: float) -> int:
    """VideoAlign ``smart_nframes`` with ``fps``: frames to sample from a ``total_frames`` video at ``video_fps``.

        n = total_frames / video_fps * fps;  n = min(max(n, 4), floor_2(min(768, total_frames)));  n = round_2(n)

    (``round_2`` = Python ``round(n / 2) * 2``, half to even). 81 frames at 16 fps, fps 2 -> 10.125 -> 10;
    240 frames -> 30. Raises ValueError for videos shorter than 2 frames.
    """
    min_frames = math.ceil(FPS_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(min(FPS_MAX_FRAMES, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    n = min(max(total_frames / video_fps * fps, min_frames), max_frames)
    n = min(round(n / FRAME_FACTOR) * FRAME_FACTOR, total_frames)
    if not FRAME_FACTOR <= n <= total_frames:
        raise ValueError(f"fps sampling needs at least {FRAME_FACTOR} frames, got a {total_frames}-frame video")
    return n


def _latest_checkpoint(root: Path) -> Path:
    steps = sorted((p for p in root.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
                   key=lambda p: int(p.name.split("-")[-1]))
    if not steps:
        raise MissingCheckpointError(f"VideoReward: no checkpoint-<step>/ directory in {str(root)!r}; {_SOURCE}")
    return steps[-1]


def _checkpoint_files(options: VideoAlignOptions) -> tuple[Path, list[str], list[str]]:
    """(checkpoint dir, files under checkpoint_dir, files under backbone_dir) the model is made of."""
    root = require_files(options.checkpoint_dir, ["model_config.json"], "VideoReward", _SOURCE)
    step = _latest_checkpoint(root)
    if (step / "model.pth").is_file():
        ckpt, base = [f"{step.name}/model.pth"], list(BACKBONE_FILES)
    else:
        need = ["adapter_model.safetensors", "non_lora_state_dict.pth"]
        require_files(step, need, "VideoReward LoRA checkpoint (or model.pth)", _SOURCE)
        ckpt, base = [f"{step.name}/{n}" for n in need], [*BACKBONE_FILES, *_backbone_weight_files(options)]
    require_files(options.backbone_dir, base, "VideoReward Qwen2-VL backbone", _SOURCE)
    return step, ["model_config.json", *ckpt], base


def _backbone_weight_files(options: VideoAlignOptions) -> list[str]:
    """The base weights of the LoRA layout: the index + every shard it lists, else ``model.safetensors``."""
    index = Path(options.backbone_dir) / BACKBONE_INDEX
    if not index.is_file():
        return [BACKBONE_SINGLE]
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{index} is not an index json with a 'weight_map': {exc}") from exc
    return [BACKBONE_INDEX, *shards]


def _read_backbone_weights(options: VideoAlignOptions) -> dict[str, torch.Tensor]:
    """Qwen2-VL base weights (sharded through the index, or one file), keys converted for the reward net."""
    root = Path(options.backbone_dir)
    if (root / BACKBONE_INDEX).is_file():
        raw = read_sharded_safetensors(root / BACKBONE_INDEX, _SOURCE)
        return {t: v for k, v in raw.items() if (t := convert_qwen2vl_key(k)) is not None}
    return load_safetensors_converted([root / BACKBONE_SINGLE])


def _lora_scaling(peft: dict[str, Any]) -> float:
    r, alpha = peft["lora_r"], peft["lora_alpha"]
    return alpha / math.sqrt(r) if peft.get("use_rslora", False) else alpha / r


class _LoadedVideoAlign:
    """Shared VideoReward network + prompt encoder + configs (one per checkpoint per process)."""

    def __init__(self, options: VideoAlignOptions, device: torch.device, dtype: torch.dtype) -> None:
        install_torchvision_guard()
        from transformers import AutoTokenizer

        step, _, _ = _checkpoint_files(options)
        cfg = json.loads((Path(options.checkpoint_dir) / "model_config.json").read_text())
        data, model_cfg = cfg["data_config"], cfg["model_config"]
        if not model_cfg.get("use_special_tokens", False):
            raise ValueError("VideoReward model_config.use_special_tokens must be true (reward-token pooling)")
        self.template = data["prompt_template_type"]
        build_prompt("", self.template)
        self.max_pixels = int(data["max_frame_pixels"])
        self.stats = cfg.get("inference_config")
        state = self._state(step, cfg, options)
        vocab = state["language_model.embed_tokens.weight"].shape[0]
        backbone = Path(options.backbone_dir)
        config = load_qwen2vl_config(backbone, vocab, options.attn_implementation)
        self.encoder = Qwen2VLPromptEncoder(AutoTokenizer.from_pretrained(str(backbone), local_files_only=True),
                                            config, REWARD_TOKENS)
        if max(self.encoder.reward_token_ids) >= vocab:
            raise ValueError(f"reward token ids {self.encoder.reward_token_ids} exceed the checkpoint vocab {vocab}")
        head_dim = int(model_cfg["output_dim"])
        head = torch.nn.Linear(config.text_config.hidden_size, head_dim, bias=False)
        self.net = materialize_reward_net(lambda: Qwen2VLRewardNet(config, head), state, device, dtype)
        pre = json.loads((backbone / "preprocessor_config.json").read_text())
        self.mean, self.std = pre["image_mean"], pre["image_std"]
        v = config.vision_config
        self.patch, self.temporal, self.merge = v.patch_size, v.temporal_patch_size, v.spatial_merge_size
        self.device, self.dtype = device, dtype
        self.memo: tuple[Any, ...] | None = None  # (weakref(batch), (prompts, gray, sampling), logits, errors)

    @staticmethod
    def _state(step: Path, cfg: dict[str, Any], options: VideoAlignOptions) -> dict[str, torch.Tensor]:
        """Full layout: model.pth. LoRA layout: base weights, + non-LoRA tensors, + merged LoRA deltas."""
        if (step / "model.pth").is_file():
            raw = safe_torch_load(step / "model.pth", _SOURCE)
            state, lora = {}, {}
        else:
            raw = safe_torch_load(step / "non_lora_state_dict.pth", _SOURCE)
            from safetensors.torch import load_file

            lora = load_file(str(step / "adapter_model.safetensors"))
            state = _read_backbone_weights(options)
        for key, value in raw.items():
            if split_lora_key(key) is not None:
                lora[key] = value
            elif (target := convert_qwen2vl_key(key)) is not None:
                state[target] = value
        if "language_model.embed_tokens.weight" not in {convert_qwen2vl_key(k) for k in raw}:
            raise ValueError("VideoReward checkpoint lacks the trained token embeddings (reward tokens); cannot load")
        if lora:
            peft = cfg["peft_lora_config"]
            merge_lora_into(state, lora, _lora_scaling(peft))
        return state

    def logits(self, reward: VideoAlignReward, batch: VideoBatch, prompts: Sequence[str], gray: bool) -> tuple[np.ndarray, dict[int, str]]:
        """(B, 3) raw (VQ, MQ, TA) logits, NaN rows + errors for unscorable prompts; memoised per batch."""
        memo = self.memo
        key = (tuple(prompts), gray, json.dumps(reward.frame_sampling(), sort_keys=True))
        if memo is not None and memo[0]() is batch and memo[1] == key:
            return memo[2], memo[3]
        out, errors = reward._compute(self, batch, prompts, gray)
        self.memo = (weakref.ref(batch), key, out, errors)
        return out, errors


def _gray_uint8(frames: torch.Tensor) -> torch.Tensor:
    """torchvision ``rgb_to_grayscale(num_output_channels=3)`` on uint8 values: (..., 3, H, W) float 0-255."""
    r, g, b = frames.unbind(dim=-3)
    luma = torch.floor(0.2989 * r + 0.587 * g + 0.114 * b)
    return luma.unsqueeze(-3).expand_as(frames)


class VideoAlignReward(ModelReward):
    """One VideoReward dimension (``dimension`` class attribute); z-scored with the checkpoint stats."""

    name: ClassVar[str] = "videoalign"
    version: ClassVar[str] = "1"
    dimension: ClassVar[str] = "VQ"
    Options: ClassVar[type[VideoAlignOptions]] = VideoAlignOptions

    def __init__(self, options: VideoAlignOptions | None = None) -> None:
        super().__init__(options)
        _checkpoint_files(self.options)  # fail fast, naming missing files

    def fingerprint(self) -> str:
        _, ckpt, base = _checkpoint_files(self.options)
        return fingerprint_files(self.options.checkpoint_dir, ckpt) + ":" + fingerprint_files(self.options.backbone_dir, base)

    def frame_sampling(self) -> dict[str, Any]:
        if self.options.fps is not None:
            return {"stride": 1, "max_frames": None, "fps": self.options.fps, "video_fps": self.options.video_fps,
                    "method": "VideoAlign smart_nframes, then round(linspace(0,T-1,n))"}
        return {"stride": 1, "max_frames": self.options.num_frames, "method": "round(linspace(0,T-1,n)), repeats if T<n"}

    def frame_indices(self, num_frames: int) -> np.ndarray:
        """Indices of the frames scored from a ``num_frames`` video (see the module docstring)."""
        count = self.options.num_frames
        if count is None:
            count = fps_frame_count(num_frames, self.options.video_fps, self.options.fps)
        return linspace_frame_indices(num_frames, count)

    def resolution(self) -> Any:
        return {"smart_resize": 28, "min_pixels": VIDEO_MIN_PIXELS, "max_pixels": "model_config.data_config.max_frame_pixels"}

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["dimension"] = self.dimension
        return ident

    def _model(self) -> _LoadedVideoAlign:
        key = ("videoalign", resolved_dir(self.options.checkpoint_dir), resolved_dir(self.options.backbone_dir),
               self.options.attn_implementation)
        return self.load_model(key, _LoadedVideoAlign)

    def _pixels(self, model: _LoadedVideoAlign, clips: np.ndarray, gray: bool) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """(N, T, H, W, 3) uint8 -> patches (N, L, D), grid (T/2, h, w)."""
        n, t, height, width, _ = clips.shape
        x = torch.from_numpy(np.ascontiguousarray(clips)).to(model.device).permute(0, 1, 4, 2, 3).float()  # (N,T,3,H,W)
        if gray:
            x = _gray_uint8(x)
        size = smart_resize(height, width, model.patch * model.merge, VIDEO_MIN_PIXELS, model.max_pixels)
        x = resize_frames(x.flatten(0, 1), size, clamp=None).view(n, t, 3, *size)
        return patchify_qwen2vl(normalize_pixels(x, model.mean, model.std), model.patch, model.temporal, model.merge)

    @torch.inference_mode()
    def _compute(self, model: _LoadedVideoAlign, batch: VideoBatch, prompts: Sequence[str], gray: bool) -> tuple[np.ndarray, dict[int, str]]:
        frame_idx = self.frame_indices(batch.num_frames)
        h, w = smart_resize(batch.height, batch.width, model.patch * model.merge, VIDEO_MIN_PIXELS, model.max_pixels)
        grid = (-(-len(frame_idx) // model.temporal), h // model.patch, w // model.patch)
        num_tokens = grid[0] * grid[1] * grid[2] // model.merge**2
        out = np.full((batch.size, 3), np.nan, np.float32)
        errors: dict[int, str] = {}
        good, ids = [], []
        for i, prompt in enumerate(prompts):
            try:
                ids.append(model.encoder.encode(build_prompt(prompt, model.template), "video", num_tokens))
                good.append(i)
            except ValueError as exc:
                errors[i] = f"ValueError: {exc}"
        for start in range(0, len(good), self.options.batch_size):
            rows = good[start : start + self.options.batch_size]
            patches, _ = self._pixels(model, batch.uint8[np.asarray(rows)][:, frame_idx], gray)
            input_ids, mask, pos = model.encoder.collate(ids[start : start + len(rows)], model.device)
            grid_thw = torch.tensor([grid] * len(rows), device=model.device)
            logits = model.net(input_ids, mask, patches.flatten(0, 1), grid_thw, model.encoder.visual_ids["video"], pos)
            per_dim = torch.diagonal(logits, dim1=1, dim2=2) if logits.shape[-1] == 3 else logits[..., 0]  # (n, 3)
            out[rows] = per_dim.float().cpu().numpy()
        return out, errors

    def score_batch(self, batch: VideoBatch, prompts: Sequence[str]) -> RewardOutput:
        model = self._model()
        k = DIMENSIONS.index(self.dimension)
        raw, errors = model.logits(self, batch, prompts, gray=self.dimension == "MQ")
        x = raw[:, k].copy()
        if self.options.normalize:
            if model.stats is None:
                raise ValueError("normalize=True but model_config.json has no inference_config means/stds")
            x = (x - model.stats[f"{self.dimension}_mean"]) / model.stats[f"{self.dimension}_std"]
        return RewardOutput(x.astype(np.float32), {"raw": raw[:, k]}, errors)


class VideoAlignVQ(VideoAlignReward):
    """VideoReward visual quality (z-score)."""

    name: ClassVar[str] = "videoalign_vq"
    dimension: ClassVar[str] = "VQ"


class VideoAlignMQ(VideoAlignReward):
    """VideoReward motion quality (z-score), computed on grayscale frames as the reference does."""

    name: ClassVar[str] = "videoalign_mq"
    dimension: ClassVar[str] = "MQ"


class VideoAlignTA(VideoAlignReward):
    """VideoReward text alignment (z-score)."""

    name: ClassVar[str] = "videoalign_ta"
    dimension: ClassVar[str] = "TA"


def build_vq(options: dict[str, Any]) -> VideoAlignVQ:
    return VideoAlignVQ.from_options(options)


def build_mq(options: dict[str, Any]) -> VideoAlignMQ:
    return VideoAlignMQ.from_options(options)


def build_ta(options: dict[str, Any]) -> VideoAlignTA:
    return VideoAlignTA.from_options(options)
