"""HPSv2.1 video reward: open_clip ViT-H-14 with the HPS v2.1 weights, per-frame score, top-30% mean.

Reference (``video_hpsv2_local``, reference doc 6.4; the ``hpsv2`` package's ``score``): each frame is
letterboxed to 224 (longest side -> 224 bicubic, centred zero padding: pad left/top = pad // 2), CLIP
normalised, and scored as

    s = <f_img / |f_img|, f_txt / |f_txt|>       (diagonal of image_features @ text_features.T, no logit scale)

The video score is the mean of the top ``int(0.3 * F)`` frame scores (all frames scored by default).
Scale: cosine similarity, ~0.2-0.35 on real data.

Files (offline): ``checkpoint_dir/HPS_v2.1_compressed.pt`` (HF ``xswu/HPSv2``): a dict with the
state dict under ``"state_dict"`` (or a flat state dict), loaded **strictly** into
``open_clip.create_model(architecture, pretrained=None)``. Because the load is strict and complete,
``open_clip_pytorch_model.bin`` (the LAION ViT-H-14 weights hpsv2 loads first) is fully overwritten and
is not needed. If ``checkpoint_dir/<architecture>.json`` exists it is registered as the open_clip model
config (used by tests for a tiny architecture; hashed into the identity).

Precision: the model runs in float32 by default (``dtype: float32``), as the Astrolabe release runs it; bf16
moves the score by about its own spread across a group, so pick it only knowingly. The file is read with
``torch.load(weights_only=True)`` (:func:`astrolabe.models.checkpoints.safe_torch_load`): the released
``HPS_v2.1_compressed.pt`` is a dict whose ``state_dict`` holds tensors (tgxs002/HPSv2 ``hpsv2/img_score.py``
loads ``checkpoint['state_dict']``); open_clip training extras (``epoch``, ``name``, ``optimizer``) load too.

Deviation: torch antialiased bicubic resize instead of PIL's; float32 scores.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from pydantic import Field

from astrolabe._compat import install_torchvision_guard
from astrolabe.models.checkpoints import safe_torch_load
from astrolabe.rewards.contract import RewardOutput
from astrolabe.rewards.video import VideoBatch, sample_frame_indices
from astrolabe.rewards.models.common import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    DTypeName,
    ModelReward,
    ModelRewardOptions,
    fingerprint_files,
    require_files,
    resize_frames,
    resolved_dir,
    top_fraction_mean,
)

logger = logging.getLogger(__name__)

__all__ = ["HPSv2Options", "HPSv2Reward", "build", "letterbox"]

CHECKPOINT_FILE = "HPS_v2.1_compressed.pt"
_SOURCE = "download HPS_v2.1_compressed.pt from the Hugging Face repo xswu/HPSv2 (`huggingface-cli download xswu/HPSv2 HPS_v2.1_compressed.pt`)"


class HPSv2Options(ModelRewardOptions):
    """HPSv2.1 options. ``batch_size`` counts frames per forward (the reference uses 8)."""

    architecture: str = Field("ViT-H-14", min_length=1, description="open_clip model config name.")
    dtype: DTypeName = Field("float32", description="Model dtype; float32 as the release runs HPSv2.1 ('auto' = bf16 on CUDA).")
    image_size: int = Field(224, ge=16, description="Letterbox size (the architecture's input size).")
    max_frames: int | None = Field(None, ge=1, description="Frames scored per video (evenly spread); None = all.")
    top_fraction: float = Field(0.3, gt=0.0, le=1.0, description="Video score = mean of the top int(f*F) frames.")
    batch_size: int = Field(8, ge=1, description="Frames per model forward.")


def letterbox(frames: torch.Tensor, size: int) -> torch.Tensor:
    """open_clip ``ResizeMaxSize``: (N, 3, H, W) in [0, 1] -> (N, 3, size, size).

    scale = size / max(H, W); (h, w) = round(H*scale), round(W*scale); bicubic resize; zero padding
    with (left, top) = (pad_w // 2, pad_h // 2) and the rest right/bottom.
    """
    height, width = frames.shape[-2:]
    scale = size / max(height, width)
    h, w = round(height * scale), round(width * scale)
    x = resize_frames(frames, (h, w), clamp=(0.0, 1.0))
    pad_h, pad_w = size - h, size - w
    return torch.nn.functional.pad(x, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=0.0)


class _LoadedHPSv2:
    def __init__(self, options: HPSv2Options, device: torch.device, dtype: torch.dtype) -> None:
        install_torchvision_guard()
        import open_clip

        root = Path(options.checkpoint_dir)
        arch_json = root / f"{options.architecture}.json"
        if arch_json.is_file():
            open_clip.add_model_config(arch_json)
        model = open_clip.create_model(options.architecture, pretrained=None)
        blob = safe_torch_load(root / CHECKPOINT_FILE, _SOURCE)
        state = blob["state_dict"] if isinstance(blob, dict) and "state_dict" in blob else blob
        if not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ValueError(f"{CHECKPOINT_FILE}: expected a state dict (flat or under 'state_dict')")
        model.load_state_dict(state, strict=True)
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(options.architecture)
        self.device, self.dtype = device, dtype


class HPSv2Reward(ModelReward):
    """HPSv2.1 human-preference score of a video: top-30% mean of per-frame image-text cosine similarity."""

    name: ClassVar[str] = "hpsv2"
    version: ClassVar[str] = "1"
    Options: ClassVar[type[HPSv2Options]] = HPSv2Options

    def __init__(self, options: HPSv2Options | None = None) -> None:
        super().__init__(options)
        require_files(self.options.checkpoint_dir, [CHECKPOINT_FILE], "HPSv2.1", _SOURCE)

    def fingerprint(self) -> str:
        files = [CHECKPOINT_FILE]
        if (Path(self.options.checkpoint_dir) / f"{self.options.architecture}.json").is_file():
            files.append(f"{self.options.architecture}.json")
        return fingerprint_files(self.options.checkpoint_dir, files)

    def frame_sampling(self) -> dict[str, Any]:
        return {"stride": 1, "max_frames": self.options.max_frames, "top_fraction": self.options.top_fraction}

    def resolution(self) -> Any:
        return {"letterbox": self.options.image_size}

    def _model(self) -> _LoadedHPSv2:
        return self.load_model(("hpsv2", resolved_dir(self.options.checkpoint_dir), self.options.architecture), _LoadedHPSv2)

    @torch.inference_mode()
    def score_batch(self, batch: VideoBatch, prompts: Sequence[str]) -> RewardOutput:
        m = self._model()
        idx = sample_frame_indices(batch.num_frames, 1, self.options.max_frames)
        text = m.model.encode_text(m.tokenizer(list(prompts)).to(m.device), normalize=True).float()  # (B, E)
        frames = batch.uint8[:, idx].reshape(-1, batch.height, batch.width, 3)  # (B*F, H, W, 3)
        owner = np.repeat(np.arange(batch.size), len(idx))
        mean = torch.tensor(OPENAI_CLIP_MEAN, device=m.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_CLIP_STD, device=m.device).view(1, 3, 1, 1)
        sims = []
        for start in range(0, len(frames), self.options.batch_size):
            chunk = torch.from_numpy(np.ascontiguousarray(frames[start : start + self.options.batch_size]))
            x = chunk.to(m.device).permute(0, 3, 1, 2).float() / 255.0  # (n, 3, H, W)
            x = (letterbox(x, self.options.image_size) - mean) / std
            feats = m.model.encode_image(x.to(m.dtype), normalize=True).float()  # (n, E)
            rows = torch.as_tensor(owner[start : start + len(chunk)], device=m.device)
            sims.append((feats * text[rows]).sum(dim=-1))  # (n,)
        per_frame = torch.cat(sims).view(batch.size, len(idx)).cpu()  # (B, F)
        scores = top_fraction_mean(per_frame, self.options.top_fraction).numpy()
        return RewardOutput(scores, {"all_frames_mean": per_frame.mean(dim=1).numpy()})


def build(options: dict[str, Any]) -> HPSv2Reward:
    """Registry builder: ``register_reward("hpsv2", "astrolabe.rewards.models.hpsv2:build")``."""
    return HPSv2Reward.from_options(options)
