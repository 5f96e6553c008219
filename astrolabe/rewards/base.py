"""Reward contract, registry, shared video views and reward combination.

A *reward* is a named, versioned judge built once per scoring stage and called on batches of videos:

    reward = build_reward(RewardSpec(name="motion", options={"frame_stride": 2}))
    out = reward(videos, prompts)          # videos: (B, F, H, W, 3) uint8, or float in [0, 1]
    out.scores                             # (B,) float32, NaN = "could not score"
    out.details["dynamic_fraction"]        # (B,) float32 per-sample diagnostics

Writing a reward (e.g. a model reward in ``astrolabe/rewards/models/``):

1. Subclass :class:`Reward`; set the class attributes ``name`` (the registry key), ``version`` (bump it
   whenever the scoring code changes the numbers) and ``Options`` (a :class:`RewardOptions` subclass:
   frozen pydantic, unknown keys are errors). Override :meth:`Reward.checkpoint_hash` (use
   :func:`astrolabe.artifacts.manifest.sha256_file` on the weights), :meth:`Reward.frame_sampling` and
   :meth:`Reward.resolution` so that :meth:`Reward.identity_hash` changes whenever the judge changes.
2. Implement :meth:`Reward.score_batch` ``(batch: VideoBatch, prompts) -> RewardOutput`` on the shared
   views of :class:`VideoBatch` (``float01``, ``uint8``, ``gray``; each is computed at most once per
   batch and shared by every reward of the stage). It may raise: :meth:`Reward.score` then rescores
   the samples one by one and turns each sample that still raises into NaN (logged, counted in
   :attr:`RewardOutput.errors`), so one bad video never crashes the batch.
3. Register it. A light module decorates the class with ``@register_reward("name")``. A heavy module
   (torch models, open_clip, transformers) registers *lazily* by dotted path so nothing is imported
   until the reward is built: ``register_reward("hpsv2", "astrolabe.rewards.models.hpsv2:build")``,
   where the target is a :class:`Reward` subclass or a callable ``build(options: Mapping) -> Reward``.
   ``astrolabe.rewards`` imports ``astrolabe.rewards.models`` (if that package exists) at import time,
   so lazy registrations belong in that package's light ``__init__.py``.

Inputs are validated before scoring (:func:`as_video_array`): rank 5, 3 RGB channels last, non-empty,
uint8 or float in [0, 1], ``len(prompts) == B`` and enough frames for temporal rewards. A bad input is a
``ValueError`` that says what was expected (an input error is the caller's bug, never a NaN).

The registry lives in :mod:`astrolabe.rewards.registry` and the normalisation / weighted combination
in :mod:`astrolabe.rewards.combine`; both are re-exported here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, ClassVar

import cv2
import numpy as np
from pydantic import Field, ValidationError, field_validator, model_validator

from astrolabe.configbase import Frozen
from astrolabe.rewards.combine import Normalization, combine_rewards, normalize_column
from astrolabe.rewards.registry import build_reward, build_rewards, register_reward, registered_rewards

logger = logging.getLogger(__name__)

__all__ = [
    "Normalization",
    "Reward",
    "RewardOptions",
    "RewardOutput",
    "RewardSpec",
    "RewardsConfig",
    "VideoBatch",
    "as_video_array",
    "build_reward",
    "build_rewards",
    "check_prompts",
    "combine_rewards",
    "normalize_column",
    "register_reward",
    "registered_rewards",
    "sample_frame_indices",
    "score_all",
]

_FLOAT_TOLERANCE = 1e-6  # float videos may exceed [0, 1] by this much (decoder round-off); clipped


# --------------------------------------------------------------------------------------------------
# Configs
# --------------------------------------------------------------------------------------------------


class RewardSpec(Frozen):
    """One reward of a reward set: registry ``name``, ``weight`` in the combined reward, ``options``.

    ``options`` is validated by the reward's own ``Options`` class when the reward is built
    (:func:`build_reward`); an unknown option is an error there.
    """

    name: str = Field(min_length=1, description="Registered reward name, e.g. 'motion' or 'hpsv2'.")
    weight: float = Field(1.0, description="Weight in the combined reward; 0 = computed and logged only.")
    options: dict[str, Any] = Field(default_factory=dict, description="Reward-specific options.")

    @field_validator("weight")
    @classmethod
    def _finite_weight(cls, value: float) -> float:
        if not math.isfinite(value):
            raise ValueError(f"reward weight must be a finite number, got {value}")
        return value


class RewardsConfig(Frozen):
    """The reward set of a run: which rewards, their weights/options, normalization and batch size."""

    rewards: tuple[RewardSpec, ...] = Field(
        default=(
            RewardSpec(name="motion", weight=1.0),
            RewardSpec(name="smoothness", weight=1.0),
            RewardSpec(name="text_color_match", weight=1.0),
        ),
        description="Rewards to compute; the combined reward is sum(weight * normalized score), normalized as "
        "rl.advantage.normalize_rewards says.",
    )
    batch_size: int = Field(8, ge=1, description="Videos per scoring call.")

    @model_validator(mode="after")
    def _check_set(self) -> RewardsConfig:
        if not self.rewards:
            raise ValueError("rewards must list at least one RewardSpec, e.g. [{name: motion, weight: 1.0}]")
        names = [spec.name for spec in self.rewards]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"reward names must be unique, duplicated: {duplicates}")
        if all(spec.weight == 0 for spec in self.rewards):
            raise ValueError("at least one reward needs a non-zero weight, all weights are 0")
        return self


class RewardOptions(Frozen):
    """Base class of every reward's options (frozen, unknown keys are errors). Empty by default."""


# --------------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RewardOutput:
    """Scores of one reward on B samples.

    Attributes:
        scores: (B,) float32; NaN where the sample could not be scored.
        details: name -> (B,) float32 per-sample diagnostics (NaN where not available).
        errors: sample index -> ``"ExceptionType: message"`` for samples whose scorer raised.
    """

    scores: np.ndarray
    details: Mapping[str, np.ndarray] = field(default_factory=dict)
    errors: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float32)
        if scores.ndim != 1:
            raise ValueError(f"RewardOutput.scores must have shape (B,), got {scores.shape}")
        details = {}
        for key, column in self.details.items():
            column = np.asarray(column, dtype=np.float32)
            if column.shape != scores.shape:
                raise ValueError(
                    f"RewardOutput.details[{key!r}] must have shape {scores.shape} like the scores, "
                    f"got {column.shape}"
                )
            details[key] = column
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "details", details)
        object.__setattr__(self, "errors", dict(self.errors))

    @property
    def num_nan(self) -> int:
        """Number of samples without a score (failed or unscorable)."""
        return int(np.isnan(self.scores).sum())

    @classmethod
    def nan(cls, size: int, detail_names: Sequence[str] = (), errors: Mapping[int, str] | None = None) -> RewardOutput:
        """All-NaN output of ``size`` samples (used for samples whose scorer raised)."""
        empty = np.full(size, np.nan, dtype=np.float32)
        return cls(empty, {k: empty for k in detail_names}, errors or {})

    @classmethod
    def concat(cls, outputs: Sequence[RewardOutput]) -> RewardOutput:
        """Concatenate outputs along the batch; a detail missing in one part is NaN there."""
        if not outputs:
            raise ValueError("RewardOutput.concat needs at least one output")
        keys = sorted({k for out in outputs for k in out.details})
        scores = np.concatenate([out.scores for out in outputs])
        details = {
            k: np.concatenate([out.details.get(k, np.full(len(out.scores), np.nan, np.float32)) for out in outputs])
            for k in keys
        }
        errors: dict[int, str] = {}
        offset = 0
        for out in outputs:
            errors.update({offset + i: msg for i, msg in out.errors.items()})
            offset += len(out.scores)
        return cls(scores, details, errors)


# --------------------------------------------------------------------------------------------------
# Input validation and shared views
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------------------


class Reward:
    """Base class of every reward. See the module docstring for how to write one.

    Class attributes to set: ``name`` (registry key), ``version`` (bump when numbers change),
    ``Options`` (a :class:`RewardOptions` subclass). ``min_frames`` (default 1) is the number of
    frames, after the reward's frame sampling, that the reward needs (2 for temporal rewards).
    """

    name: ClassVar[str]
    version: ClassVar[str]
    Options: ClassVar[type[RewardOptions]] = RewardOptions

    def __init__(self, options: RewardOptions | None = None) -> None:
        options = self.Options() if options is None else options
        if not isinstance(options, self.Options):
            raise TypeError(f"reward {self.name!r} takes {self.Options.__name__}, got {type(options).__name__}")
        self.options = options

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None) -> Reward:
        """Build from a plain options mapping (``RewardSpec.options``); unknown keys are errors."""
        try:
            parsed = cls.Options(**dict(options or {}))
        except ValidationError as exc:
            allowed = sorted(cls.Options.model_fields)
            raise ValueError(f"invalid options for reward {cls.name!r} (allowed options: {allowed}):\n{exc}") from exc
        return cls(parsed)

    # ---- identity ---------------------------------------------------------------------------------

    @property
    def min_frames(self) -> int:
        return 1

    def checkpoint_hash(self) -> str | None:
        """SHA-256 of the judge's weights (:func:`astrolabe.artifacts.manifest.sha256_file`); None if weight-free."""
        return None

    def frame_sampling(self) -> dict[str, Any]:
        """How frames are chosen (JSON-able). Default: every frame."""
        return {"stride": 1, "max_frames": None}

    def resolution(self) -> Any:
        """The resolution the judge sees (JSON-able), e.g. ``[336, 588]``; ``"native"`` = the input's."""
        return "native"

    def identity(self) -> dict[str, Any]:
        """Everything that determines the numbers: name, version, weights hash, sampling, resolution, options."""
        return {
            "name": self.name,
            "version": self.version,
            "checkpoint_sha256": self.checkpoint_hash(),
            "frame_sampling": self.frame_sampling(),
            "resolution": self.resolution(),
            "options": self.options.model_dump(mode="json"),
        }

    def identity_hash(self) -> str:
        """Stable hex SHA-256 of :meth:`identity` (canonical JSON): use it in cache keys."""
        text = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    # ---- scoring ----------------------------------------------------------------------------------

    def score_batch(self, batch: VideoBatch, prompts: Sequence[str]) -> RewardOutput:
        """Score a validated batch. Override this. May raise; may return NaN for unscorable samples."""
        raise NotImplementedError(f"{type(self).__name__} must implement score_batch")

    def check_frames(self, num_frames: int) -> None:
        """Raise ValueError if videos of ``num_frames`` frames leave fewer than ``min_frames`` after sampling.

        Reads ``stride`` / ``max_frames`` from :meth:`frame_sampling`; override it if a reward samples
        frames differently and needs more than one frame.
        """
        sampling = self.frame_sampling()
        kept = len(sample_frame_indices(num_frames, sampling.get("stride", 1), sampling.get("max_frames")))
        if kept < self.min_frames:
            raise ValueError(
                f"reward {self.name!r} needs at least {self.min_frames} frames per video after frame sampling "
                f"{sampling}, but videos with {num_frames} frames give {kept}: pass longer videos or lower the stride"
            )

    def score(self, batch: VideoBatch, prompts: Sequence[str]) -> RewardOutput:
        """Score ``batch``; a sample whose scorer raises becomes NaN (logged), never the whole batch.

        The batch is scored in one :meth:`score_batch` call. If that raises, every sample is rescored
        alone; samples that still raise get NaN scores/details and an entry in ``errors``. Input
        errors (prompts, too few frames) are raised as ValueError before scoring.
        """
        check_prompts(prompts, batch.size)
        self.check_frames(batch.num_frames)
        if batch.size == 1:
            out = self._score_single(batch, prompts[0])
        else:
            try:
                out = self._checked(self.score_batch(batch, prompts), batch.size)
            except Exception as exc:  # noqa: BLE001 - fall back to one sample at a time
                logger.warning("reward %s: batch of %d failed (%s); rescoring one by one", self.name, batch.size, exc)
                out = None
            if out is None:
                singles = [self._score_single(batch.subset([i]), prompts[i]) for i in range(batch.size)]
                out = RewardOutput.concat(singles)
        if out.num_nan:
            logger.warning(
                "reward %s: %d/%d samples could not be scored (NaN), %d raised",
                self.name,
                out.num_nan,
                batch.size,
                len(out.errors),
            )
        return out

    def _score_single(self, sample: VideoBatch, prompt: str) -> RewardOutput:
        """Score a batch of one; if the scorer raises, log it and return NaN with the error."""
        try:
            return self._checked(self.score_batch(sample, [prompt]), 1)
        except Exception as exc:  # noqa: BLE001 - any scorer failure becomes NaN, never a crash
            logger.warning("reward %s: sample failed, scored NaN: %r", self.name, exc, exc_info=True)
            return RewardOutput.nan(1, errors={0: f"{type(exc).__name__}: {exc}"})

    def _checked(self, out: RewardOutput, size: int) -> RewardOutput:
        if not isinstance(out, RewardOutput):
            raise TypeError(f"reward {self.name!r}: score_batch must return RewardOutput, got {type(out).__name__}")
        if out.scores.shape != (size,):
            raise ValueError(f"reward {self.name!r}: score_batch returned {out.scores.shape} scores for {size} videos")
        return out

    def __call__(self, videos: Any, prompts: Sequence[str]) -> RewardOutput:
        """Validate ``videos`` (B, F, H, W, 3) and ``prompts`` (B strings), then :meth:`score`."""
        return self.score(VideoBatch(as_video_array(videos, prompts), _validated=True), prompts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, version={self.version!r}, options={self.options!r})"




# --------------------------------------------------------------------------------------------------
# Scoring a stage: shared views, batching
# --------------------------------------------------------------------------------------------------


def score_all(
    rewards: Sequence[Reward], videos: Any, prompts: Sequence[str], batch_size: int = 8
) -> dict[str, RewardOutput]:
    """Score ``videos`` (B, F, H, W, 3) with every reward, ``batch_size`` videos at a time.

    The input is validated once; each chunk's views (float32 [0, 1], uint8, gray) are computed once
    and shared by all rewards. Returns reward name -> :class:`RewardOutput` over all B videos.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    names = [reward.name for reward in rewards]
    if len(set(names)) != len(names):
        raise ValueError(f"rewards must have distinct names, got {names}")
    array = as_video_array(videos, prompts)
    for reward in rewards:
        reward.check_frames(array.shape[1])
    parts: dict[str, list[RewardOutput]] = {name: [] for name in names}
    for start in range(0, array.shape[0], batch_size):
        stop = min(start + batch_size, array.shape[0])
        batch = VideoBatch(array[start:stop], _validated=True)  # views computed once, shared below
        for reward in rewards:
            parts[reward.name].append(reward.score(batch, list(prompts[start:stop])))
    return {name: RewardOutput.concat(outs) for name, outs in parts.items()}
