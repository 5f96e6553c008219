"""Reward inputs: validation of a video batch and the shared views every reward of a stage reads.

Inputs are validated before scoring (:func:`as_video_array`): rank 5, 3 RGB channels last, non-empty,
uint8 or float in [0, 1], ``len(prompts) == B``. A bad input is a ``ValueError`` that says what was
expected (an input error is the caller's bug, never a NaN). :class:`VideoBatch` computes each view
(``float01``, ``uint8``, ``gray``) at most once per batch; :func:`sample_frame_indices` is the frame
choice of the weight-free rewards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import cached_property
from typing import Any

import cv2
import numpy as np

__all__ = ["VideoBatch", "as_video_array", "check_prompts", "sample_frame_indices"]

_FLOAT_TOLERANCE = 1e-6  # float videos may exceed [0, 1] by this much (decoder round-off); clipped


def _to_numpy(videos: Any) -> np.ndarray:
    """numpy view of ``videos`` (numpy array or torch tensor, any device)."""
    if isinstance(videos, np.ndarray):
        return videos
    if type(videos).__module__.startswith("torch"):
        import torch

        tensor = videos.detach().cpu()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        return tensor.numpy()
    raise ValueError(
        f"videos must be a numpy array or torch tensor of shape (B, F, H, W, 3), got {type(videos).__name__}"
    )


def as_video_array(videos: Any, prompts: Sequence[str] | None = None) -> np.ndarray:
    """Validate a video batch and return it as a numpy array (B, F, H, W, 3), uint8 or float in [0, 1].

    Raises:
        ValueError: wrong type/rank/channel count, an empty dimension, a dtype other than uint8 or
            float, float values outside [0, 1] or non-finite, or ``len(prompts) != B``.
    """
    array = _to_numpy(videos)
    if array.ndim != 5 or array.shape[-1] != 3:
        hint = ""
        if array.ndim == 5 and array.shape[2] == 3:
            hint = " (looks like (B, F, 3, H, W): move the channel axis last, e.g. x.permute(0, 1, 3, 4, 2))"
        elif array.ndim == 4:
            hint = " (a single video? add the batch axis: x[None])"
        raise ValueError(f"videos must have shape (B, F, H, W, 3) with RGB channels last, got {array.shape}{hint}")
    if 0 in array.shape:
        raise ValueError(f"videos must be non-empty in every dimension (B, F, H, W, 3), got {array.shape}")
    if array.dtype == np.uint8:
        pass
    elif np.issubdtype(array.dtype, np.floating):
        low, high = float(array.min()), float(array.max())
        if not (math.isfinite(low) and math.isfinite(high)):
            raise ValueError("float videos must be finite: found NaN or inf values")
        if low < -_FLOAT_TOLERANCE or high > 1 + _FLOAT_TOLERANCE:
            raise ValueError(
                f"float videos must lie in [0, 1], got values in [{low:.4g}, {high:.4g}]; "
                "divide 0-255 data by 255 or pass uint8"
            )
    else:
        raise ValueError(
            f"videos must be uint8 (0-255) or float in [0, 1], got dtype {array.dtype}; "
            "convert with x.astype(np.uint8) for 0-255 integers"
        )
    if prompts is not None:
        check_prompts(prompts, array.shape[0])
    return array


def check_prompts(prompts: Sequence[str], batch_size: int) -> None:
    """Raise ValueError unless ``prompts`` is a sequence of ``batch_size`` strings."""
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of B strings, got a single string")
    if len(prompts) != batch_size:
        raise ValueError(f"got {len(prompts)} prompts for {batch_size} videos: need one prompt per video")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must be strings, entries {bad[:5]} are not")


class VideoBatch:
    """A validated video batch with lazily computed views shared by every reward of a stage.

    Each view is computed at most once (on first access) and then reused by all rewards:

    - ``raw``:     (B, F, H, W, 3) the validated input, uint8 or float in [0, 1].
    - ``float01``: (B, F, H, W, 3) float32 in [0, 1]  (uint8 / 255).
    - ``uint8``:   (B, F, H, W, 3) uint8              (round(255 * float), clipped).
    - ``gray``:    (B, F, H, W)    uint8 luma, OpenCV ``COLOR_RGB2GRAY``: Y = 0.299 R + 0.587 G + 0.114 B.

    Channels are RGB.
    """

    def __init__(self, videos: Any, *, _validated: bool = False) -> None:
        self.raw: np.ndarray = videos if _validated else as_video_array(videos)

    @property
    def size(self) -> int:
        return int(self.raw.shape[0])

    @property
    def num_frames(self) -> int:
        return int(self.raw.shape[1])

    @property
    def height(self) -> int:
        return int(self.raw.shape[2])

    @property
    def width(self) -> int:
        return int(self.raw.shape[3])

    @cached_property
    def float01(self) -> np.ndarray:
        if self.raw.dtype == np.uint8:
            return self.raw.astype(np.float32) / np.float32(255.0)  # (B, F, H, W, 3)
        return np.clip(self.raw, 0.0, 1.0).astype(np.float32, copy=False)

    @cached_property
    def uint8(self) -> np.ndarray:
        if self.raw.dtype == np.uint8:
            return self.raw
        return np.rint(np.clip(self.raw, 0.0, 1.0) * 255.0).astype(np.uint8)  # (B, F, H, W, 3)

    @cached_property
    def gray(self) -> np.ndarray:
        b, f, h, w, _ = self.raw.shape
        flat = np.ascontiguousarray(self.uint8).reshape(b * f * h, w, 3)  # one tall image: one cv2 call
        return cv2.cvtColor(flat, cv2.COLOR_RGB2GRAY).reshape(b, f, h, w)  # (B, F, H, W)

    def subset(self, indices: Sequence[int]) -> VideoBatch:
        """Batch of the given samples; views already computed are sliced, not recomputed."""
        index = np.asarray(indices, dtype=np.int64)
        sub = VideoBatch(self.raw[index], _validated=True)
        for view in ("float01", "uint8", "gray"):
            if view in self.__dict__:
                sub.__dict__[view] = self.__dict__[view][index]
        return sub


def sample_frame_indices(num_frames: int, stride: int = 1, max_frames: int | None = None) -> np.ndarray:
    """Indices of the frames a reward looks at.

    ``idx = [0, stride, 2*stride, ...] < num_frames``; if more than ``max_frames`` remain, keep
    ``idx[round(linspace(0, len(idx) - 1, max_frames))]`` (first and last kept, evenly spread).
    """
    if num_frames < 1 or stride < 1 or (max_frames is not None and max_frames < 1):
        raise ValueError(
            f"need num_frames >= 1, stride >= 1, max_frames >= 1 or None; got {num_frames}, {stride}, {max_frames}"
        )
    idx = np.arange(0, num_frames, stride)
    if max_frames is not None and len(idx) > max_frames:
        idx = idx[np.round(np.linspace(0, len(idx) - 1, max_frames)).astype(np.int64)]
    return idx

