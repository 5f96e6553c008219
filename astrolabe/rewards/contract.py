"""The reward contract: the :class:`Reward` protocol, its output type and NaN semantics, scoring a stage.

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

Inputs are validated before scoring (:func:`~astrolabe.rewards.video.as_video_array`) and frame counts
are checked against :meth:`Reward.min_frames`.

Inputs and their shared views live in :mod:`astrolabe.rewards.video`, the registry in
:mod:`astrolabe.rewards.registry`, the run's reward set in :mod:`astrolabe.rewards.spec` and the
normalisation / weighted combination in :mod:`astrolabe.rewards.combine`; :mod:`astrolabe.rewards`
re-exports them all.

NaN semantics: a score of NaN means "this sample could not be scored" (its scorer raised, or the
reward declares it unscorable); it is logged, counted (:attr:`RewardOutput.num_nan`, ``errors``) and
excluded downstream (a NaN in any weighted column makes the combined reward NaN). Input errors are
never NaN: they raise ``ValueError``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from pydantic import ValidationError

from astrolabe.configbase import Frozen
from astrolabe.rewards.video import VideoBatch, as_video_array, check_prompts, sample_frame_indices

logger = logging.getLogger(__name__)

__all__ = ["Reward", "RewardOptions", "RewardOutput", "score_all"]


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
