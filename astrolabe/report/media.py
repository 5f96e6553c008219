"""Media embedded in the report: ``data:`` URIs of PNGs and of mp4s a browser plays.

Stage videos may be lossless H.264 (``crf 0``: the *High 4:4:4 Predictive* profile), which not every browser
decodes (Chromium does, Safari does not); :func:`browser_video` re-encodes them as yuv420p H.264 at the default quality (*High* profile) and
takes the middle frame as the poster (what a print or a screenshot shows).
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np

from astrolabe.data.video import decode_mp4, encode_mp4


def data_uri(mime: str, data: bytes) -> str:
    """``data:<mime>;base64,<data>``."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def png_bytes(image: np.ndarray) -> bytes:
    """PNG of an ``(H, W, 3)`` uint8 RGB image."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def browser_video(path: Path, fps: float) -> tuple[bytes, bytes]:
    """``(mp4 bytes, poster PNG bytes)`` of the video at ``path``, re-encoded for browsers."""
    frames = decode_mp4(path)  # (F, H, W, 3)
    return encode_mp4(frames, fps=fps), png_bytes(frames[len(frames) // 2])
