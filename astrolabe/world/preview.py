"""A captioned contact sheet of world videos, for a person to look at (PNG).

Each video is one row: its caption in white on a black strip, then ``frames_per_row`` frames evenly
spread over the clip (first and last included), ``gap`` pixels of mid-gray between frames and rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from astrolabe.artifacts.atomic import write_bytes
from astrolabe.data.video import _label_strip, as_uint8_hwc

__all__ = ["contact_sheet", "save_contact_sheet"]

GAP_VALUE = 128


def _hwc(video: Any) -> np.ndarray:
    """(T, 3, H, W) torch/numpy in [0, 1] or (T, H, W, 3) -> (T, H, W, 3) uint8."""
    array = video.detach().cpu().numpy() if hasattr(video, "detach") else np.asarray(video)
    if array.ndim == 4 and array.shape[1] == 3 and array.shape[-1] != 3:
        array = array.transpose(0, 2, 3, 1)
    return as_uint8_hwc(array)


def contact_sheet(videos: Sequence[Any], captions: Sequence[str], frames_per_row: int = 5, gap: int = 2) -> np.ndarray:
    """Rows of ``frames_per_row`` frames under each caption -> (H_sheet, W_sheet, 3) uint8 RGB.

    ``videos``: (T, 3, H, W) float in [0, 1] (as rendered) or (T, H, W, 3) uint8 / float, one size.
    """
    if len(videos) != len(captions) or not videos:
        raise ValueError(f"need one caption per video and at least one video, got {len(videos)} and {len(captions)}")
    clips = [_hwc(v) for v in videos]
    height, width = clips[0].shape[1:3]
    row_width = frames_per_row * width + (frames_per_row - 1) * gap
    strip = max(12, height // 4)
    rows = []
    for clip, caption in zip(clips, captions):
        if clip.shape[1:3] != (height, width):
            raise ValueError(f"videos must share one size, got {clip.shape[1:3]} and {(height, width)}")
        picks = np.round(np.linspace(0, len(clip) - 1, frames_per_row)).astype(int)
        row = np.full((height, row_width, 3), GAP_VALUE, np.uint8)
        for j, k in enumerate(picks):
            row[:, j * (width + gap) : j * (width + gap) + width] = clip[k]
        rows.append(np.concatenate([_label_strip(caption, row_width, strip), row]))
    separator = np.full((gap, row_width, 3), GAP_VALUE, np.uint8)
    out = [rows[0]]
    for row in rows[1:]:
        out += [separator, row]
    return np.concatenate(out)


def save_contact_sheet(path: str | Path, videos: Sequence[Any], captions: Sequence[str], frames_per_row: int = 5) -> Path:
    """Write :func:`contact_sheet` as a PNG (atomically) and return the path."""
    path = Path(path)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(contact_sheet(videos, captions, frames_per_row), cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError(f"could not encode the contact sheet for {path}")
    return write_bytes(path, encoded.tobytes())
