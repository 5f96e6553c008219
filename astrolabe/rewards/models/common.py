"""Shared pieces of the model-based rewards: options, checkpoint checks and fingerprints, frame math.

Everything here is loaded **offline** from local directories named in the options; nothing is ever
downloaded. :class:`ModelReward` is the base class of every model reward (identity without the
execution-only options, checkpoint fingerprint computed once, process-wide model cache). The Qwen2-VL
pieces shared by HPSv3 and VideoReward live in :mod:`astrolabe.rewards.models.qwen2vl`.

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
import logging
import threading
from collections.abc import Callable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import torch
from pydantic import Field, field_validator

from astrolabe.rewards.contract import Reward, RewardOptions

logger = logging.getLogger(__name__)

__all__ = [
    "DTypeName",
    "EXECUTION_ONLY_OPTIONS",
    "MissingCheckpointError",
    "ModelReward",
    "ModelRewardOptions",
    "OPENAI_CLIP_MEAN",
    "OPENAI_CLIP_STD",
    "clear_model_cache",
    "fingerprint_files",
    "linspace_frame_indices",
    "load_cached",
    "normalize_pixels",
    "require_files",
    "resize_frames",
    "resolve_device",
    "resolve_dtype",
    "resolved_dir",
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
# Base class of the model rewards
# --------------------------------------------------------------------------------------------------


class ModelReward(Reward):
    """A reward computed by a model loaded from local checkpoint files.

    Subclasses implement :meth:`fingerprint` (the :func:`fingerprint_files` of every file the model
    is made of) and load their model through :meth:`load_model`. Shared here:

    - :meth:`checkpoint_hash` is :meth:`fingerprint`, computed once per instance;
    - :meth:`identity` leaves out :data:`EXECUTION_ONLY_OPTIONS` (where/how fast, never what);
    - :meth:`load_model` resolves ``device`` / ``dtype`` and returns the process-wide cached model of
      ``(*key, device, dtype)``.
    """

    options: ModelRewardOptions

    def fingerprint(self) -> str:
        """Fingerprint of the checkpoint files (see :func:`fingerprint_files`). Override this."""
        raise NotImplementedError(f"{type(self).__name__} must implement fingerprint")

    @cached_property
    def _fingerprint(self) -> str:
        return self.fingerprint()

    def checkpoint_hash(self) -> str:
        return self._fingerprint

    def identity(self) -> dict[str, Any]:
        ident = super().identity()
        ident["options"] = {k: v for k, v in ident["options"].items() if k not in EXECUTION_ONLY_OPTIONS}
        return ident

    def load_model(self, key: tuple[Any, ...], loader: Callable[[Any, torch.device, torch.dtype], _T]) -> _T:
        """``loader(options, device, dtype)`` once per process for ``(*key, device, dtype)``, then cached."""
        device = resolve_device(self.options.device)
        dtype = resolve_dtype(self.options.dtype, device)
        return load_cached((*key, str(device), str(dtype)), lambda: loader(self.options, device, dtype))


def resolved_dir(directory: str) -> str:
    """Absolute, symlink-free form of a checkpoint directory (the model cache key)."""
    return str(Path(directory).resolve())


# --------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------


def normalize_pixels(frames: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., C, H, W) in [0, 255] -> (x / 255 - mean) / std per channel."""
    m = torch.as_tensor(mean, dtype=frames.dtype, device=frames.device).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=frames.dtype, device=frames.device).view(-1, 1, 1)
    return (frames / 255.0 - m) / s


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
