"""mp4 encode / decode with PyAV (bundled libx264, no system ffmpeg needed).

Frames are ``uint8`` arrays ``(F, H, W, 3)`` in RGB order. Encoding uses libx264 with ``yuv420p``
pixels, which needs even height and width: odd sizes are **padded** by replicating the last row
and/or column (never cropped), so a decoded video of an odd-sized input is one pixel larger in that
dimension. The tiny test videos are 64x64 and are not affected.

Model tensors are converted with :func:`to_uint8_frames`:
``u8 = round(clip((x - lo) / (hi - lo), 0, 1) * 255)`` for a value range ``(lo, hi)``, usually
``(-1, 1)`` (VAE decoder output) or ``(0, 1)``.

Writing to a path is atomic: frames go to a hidden temporary file next to the target, which is
fsynced and renamed onto the final name on success, so a crash never leaves a half-written mp4
under the final name (:class:`StreamingMp4Writer`).
"""

from __future__ import annotations

import io
import logging
import os
from fractions import Fraction
from pathlib import Path
from typing import Any, BinaryIO, Literal, Sequence

import numpy as np
from pydantic import Field

from astrolabe.configbase import Frozen
from astrolabe.artifacts.atomic import AtomicWriter, close_quietly, publish_file, tmp_sibling

log = logging.getLogger(__name__)

DEFAULT_FPS = 16  # Wan2.1 family output rate
DEFAULT_CRF = 18  # visually lossless for libx264; 0 = lossless luma
DEFAULT_PRESET = "medium"

X264Preset = Literal[
    "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
]


class Mp4Config(Frozen):
    """How videos are encoded (libx264, yuv420p)."""

    fps: float = Field(DEFAULT_FPS, gt=0, le=240, description="frames per second written in the mp4")
    crf: int = Field(
        DEFAULT_CRF, ge=0, le=51, description="libx264 constant rate factor: 0 best, 51 worst; 18 ~ visually lossless"
    )
    preset: X264Preset = Field(DEFAULT_PRESET, description="libx264 speed/size trade-off")

    def encode_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`encode_mp4` / :func:`write_mp4` / :class:`StreamingMp4Writer`."""
        return {"fps": self.fps, "crf": self.crf, "preset": self.preset}


# ----------------------------------------------------------------------------------------------
# conversions


def _to_numpy(x: Any) -> np.ndarray:
    """torch.Tensor (any device / dtype) or array-like -> numpy, without importing torch."""
    if type(x).__module__.startswith("torch"):
        return x.detach().float().cpu().numpy()
    return np.asarray(x)


def to_uint8_frames(video: Any, value_range: tuple[float, float] = (-1.0, 1.0)) -> np.ndarray:
    """Channel-first float video -> channel-last ``uint8``.

    ``u8 = round(clip((x - lo) / (hi - lo), 0, 1) * 255)``.

    Args:
        video: ``(F, 3, H, W)`` or ``(B, F, 3, H, W)`` float tensor / array (torch or numpy).
        value_range: ``(lo, hi)`` of the input, ``(-1, 1)`` for VAE output or ``(0, 1)``.

    Returns:
        ``(F, H, W, 3)`` or ``(B, F, H, W, 3)`` uint8 array.
    """
    lo, hi = float(value_range[0]), float(value_range[1])
    if not hi > lo:
        raise ValueError(f"value_range must be (lo, hi) with hi > lo, got {value_range}")
    x = _to_numpy(video)
    if x.ndim not in (4, 5) or x.shape[-3] != 3:
        raise ValueError(
            f"expected a channel-first video (F, 3, H, W) or (B, F, 3, H, W), got shape {tuple(x.shape)}; "
            "permute channels to dimension -3 first"
        )
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"expected a float video in {value_range}, got dtype {x.dtype}")
    unit = np.clip((x.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)
    u8 = np.rint(unit * 255.0).astype(np.uint8)
    return np.moveaxis(u8, -3, -1)  # (..., F, H, W, 3)


def as_uint8_hwc(frames: Any) -> np.ndarray:
    """Channel-last frames ``(F, H, W, 3)`` as uint8: uint8 passes through, float in [0, 1] is scaled.

    Floats are mapped by ``round(clip(x, 0, 1) * 255)``; values outside ``[-1e-3, 1 + 1e-3]`` are an
    error (they usually mean a ``[-1, 1]`` tensor: use :func:`to_uint8_frames` with ``(-1, 1)``).
    """
    x = _to_numpy(frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(
            f"expected channel-last frames (F, H, W, 3), got shape {tuple(x.shape)}; "
            "use to_uint8_frames() for channel-first (F, 3, H, W) tensors"
        )
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if x.size and (np.nanmin(x) < -1e-3 or np.nanmax(x) > 1.0 + 1e-3):
            raise ValueError(
                f"float frames must be in [0, 1], got range [{np.nanmin(x):.3f}, {np.nanmax(x):.3f}]; "
                "for [-1, 1] tensors use to_uint8_frames(video, value_range=(-1, 1))"
            )
        return np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    raise ValueError(f"frames must be uint8 or float in [0, 1], got dtype {x.dtype}")


def pad_to_even(frames: np.ndarray) -> np.ndarray:
    """Pad ``(F, H, W, 3)`` to even H and W by replicating the last row / column (yuv420p needs it)."""
    _, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph == 0 and pw == 0:
        return frames
    return np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")


# ----------------------------------------------------------------------------------------------
# encoder core


class _Mp4Encoder:
    """libx264 / yuv420p encoder bound to an open output (path or binary file object)."""

    def __init__(self, dst: str | BinaryIO, fps: float, crf: int, preset: str) -> None:
        import av  # lazy: PyAV import costs ~0.1 s

        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        if not 0 <= int(crf) <= 51:
            raise ValueError(f"crf must be in [0, 51], got {crf}")
        self._av = av
        self._container = av.open(dst, mode="w", format="mp4")
        rate = Fraction(fps).limit_denominator(1001)
        # One thread, explicit pts: multi-threaded x264 (frame/slice threads, lookahead) is not bit-reproducible,
        # and stored rollouts must be (scores, labels and the update read these mp4s).
        options = {"crf": str(int(crf)), "preset": preset, "threads": "1"}
        self._stream = self._container.add_stream("libx264", rate=rate, options=options)
        self._stream.pix_fmt = "yuv420p"
        self._stream.codec_context.thread_count = 1
        self._stream.codec_context.thread_type = "NONE"
        self._size: tuple[int, int] | None = None  # (H, W) after padding
        self.n_frames = 0

    def encode(self, frames: np.ndarray) -> None:
        frames = pad_to_even(as_uint8_hwc(frames))  # (F, H', W', 3)
        if frames.shape[0] == 0:
            return
        size = (frames.shape[1], frames.shape[2])
        if self._size is None:
            self._size = size
            self._stream.height, self._stream.width = size
        elif size != self._size:
            raise ValueError(f"frame size changed mid-video: {size} after {self._size}; all frames must share (H, W)")
        for i, frame in enumerate(frames):
            vf = self._av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            vf.pts = self.n_frames + i
            for packet in self._stream.encode(vf):
                self._container.mux(packet)
        self.n_frames += frames.shape[0]

    def finish(self) -> None:
        if self.n_frames == 0:
            self._container.close()
            raise ValueError("no frames were written; an mp4 needs at least one frame")
        for packet in self._stream.encode(None):  # flush the encoder's lookahead
            self._container.mux(packet)
        self._container.close()

    def close_quietly(self) -> None:
        close_quietly(self._container, "an aborted mp4 container")


class StreamingMp4Writer(AtomicWriter):
    """Write an mp4 chunk by chunk; the file appears under its final name only on success.

    Only the encoder's lookahead is held in memory, never the whole video::

        with StreamingMp4Writer("out.mp4", fps=16) as w:
            for block in sampler:          # (F_i, H, W, 3) uint8 or float in [0, 1]
                w.write(block)
        # out.mp4 now exists; on an exception inside the block it does not.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        fps: float = DEFAULT_FPS,
        crf: int = DEFAULT_CRF,
        preset: str = DEFAULT_PRESET,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp_path = tmp_sibling(self.path)
        self._encoder = _Mp4Encoder(str(self.tmp_path), fps=fps, crf=crf, preset=preset)
        self._closed = False

    @property
    def n_frames(self) -> int:
        return self._encoder.n_frames

    def write(self, frames: Any) -> None:
        """Append frames ``(F_i, H, W, 3)`` (uint8, or float in [0, 1]); a single ``(H, W, 3)`` frame is allowed."""
        if self._closed:
            raise RuntimeError(f"writer for {self.path} is already closed")
        x = _to_numpy(frames)
        if x.ndim == 3:
            x = x[None]
        self._encoder.encode(x)

    def close(self) -> Path:
        """Flush, fsync and atomically rename onto the final path; returns it."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            self._encoder.finish()
            publish_file(self.tmp_path, self.path)
        except BaseException:
            self.tmp_path.unlink(missing_ok=True)
            raise
        return self.path

    def abort(self) -> None:
        """Drop everything written so far; the final path is untouched."""
        if self._closed:
            return
        self._closed = True
        self._encoder.close_quietly()
        self.tmp_path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# one-shot API


def encode_mp4(frames: Any, fps: float = DEFAULT_FPS, crf: int = DEFAULT_CRF, preset: str = DEFAULT_PRESET) -> bytes:
    """Encode ``(F, H, W, 3)`` frames (uint8 or float in [0, 1]) to mp4 bytes, in memory."""
    buf = io.BytesIO()
    enc = _Mp4Encoder(buf, fps=fps, crf=crf, preset=preset)
    try:
        enc.encode(_to_numpy(frames))
        enc.finish()
    except BaseException:
        enc.close_quietly()
        raise
    return buf.getvalue()


def write_mp4(
    dst: str | os.PathLike[str] | BinaryIO,
    frames: Any,
    fps: float = DEFAULT_FPS,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
) -> None:
    """Write ``(F, H, W, 3)`` frames to a path (atomically) or to a writable binary buffer."""
    if isinstance(dst, (str, os.PathLike)):
        with StreamingMp4Writer(dst, fps=fps, crf=crf, preset=preset) as w:
            w.write(frames)
    else:
        dst.write(encode_mp4(frames, fps=fps, crf=crf, preset=preset))


def decode_mp4(src: bytes | bytearray | str | os.PathLike[str] | BinaryIO) -> np.ndarray:
    """Decode an mp4 (bytes, path or binary file object) to ``(F, H, W, 3)`` uint8 RGB frames."""
    import av

    if isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(bytes(src))
    elif isinstance(src, os.PathLike):
        src = os.fspath(src)
    try:
        container = av.open(src, mode="r")
    except av.FFmpegError as e:
        raise ValueError(f"cannot open mp4 ({e}); the data is not a readable video") from e
    with container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError("the mp4 contains no decodable video frames")
    return np.stack(frames)  # (F, H, W, 3)


# ----------------------------------------------------------------------------------------------
# evaluation grid


def _label_strip(text: str, width: int, height: int) -> np.ndarray:
    """Black ``(height, width, 3)`` strip with ``text`` in white, shrunk to fit the width."""
    import cv2

    strip = np.zeros((height, width, 3), np.uint8)
    font = cv2.FONT_HERSHEY_SIMPLEX
    scale = height / 30.0
    (tw, _), _ = cv2.getTextSize(text, font, scale, 1)
    if tw > width - 4 and tw > 0:
        scale *= (width - 4) / tw
    cv2.putText(strip, text, (2, height - max(2, height // 4)), font, scale, (255, 255, 255), 1, cv2.LINE_AA)
    return strip


def grid_frames(
    videos: Sequence[np.ndarray], labels: Sequence[str] | None = None, ncols: int | None = None, gap: int = 2
) -> np.ndarray:
    """Tile videos side by side into one ``(F_max, H_grid, W_grid, 3)`` uint8 video.

    Every video must share (H, W). Shorter videos hold their last frame. With ``labels`` a black
    strip of height ``max(12, H // 6)`` carrying the label is placed above each tile. ``ncols``
    defaults to all videos on one row.
    """
    if not videos:
        raise ValueError("save_grid_mp4 needs at least one video")
    vids = [as_uint8_hwc(v) for v in videos]
    h, w = vids[0].shape[1:3]
    for i, v in enumerate(vids):
        if v.shape[1:3] != (h, w):
            raise ValueError(f"video {i} has size {v.shape[1:3]}, video 0 has {(h, w)}; resize them to one size first")
    if labels is not None and len(labels) != len(vids):
        raise ValueError(f"got {len(labels)} labels for {len(vids)} videos")
    n = len(vids)
    ncols = n if ncols is None else max(1, min(int(ncols), n))
    nrows = -(-n // ncols)
    strip_h = max(12, h // 6) if labels is not None else 0
    cell_h, cell_w = strip_h + h, w
    f_max = max(v.shape[0] for v in vids)
    out = np.zeros((f_max, nrows * cell_h + (nrows - 1) * gap, ncols * cell_w + (ncols - 1) * gap, 3), np.uint8)
    for i, v in enumerate(vids):
        r, c = divmod(i, ncols)
        y0, x0 = r * (cell_h + gap), c * (cell_w + gap)
        if labels is not None:
            out[:, y0 : y0 + strip_h, x0 : x0 + w] = _label_strip(str(labels[i]), w, strip_h)[None]
        idx = np.minimum(np.arange(f_max), v.shape[0] - 1)  # hold the last frame
        out[:, y0 + strip_h : y0 + cell_h, x0 : x0 + w] = v[idx]
    return out


def save_grid_mp4(
    path: str | os.PathLike[str],
    videos: Sequence[np.ndarray],
    labels: Sequence[str] | None = None,
    fps: float = DEFAULT_FPS,
    ncols: int | None = None,
    gap: int = 2,
    crf: int = DEFAULT_CRF,
    preset: str = DEFAULT_PRESET,
) -> Path:
    """Write a labelled side-by-side grid of ``(F, H, W, 3)`` videos to ``path`` (atomic); see :func:`grid_frames`."""
    frames = grid_frames(videos, labels=labels, ncols=ncols, gap=gap)
    with StreamingMp4Writer(path, fps=fps, crf=crf, preset=preset) as w:
        w.write(frames)
    return Path(path)
