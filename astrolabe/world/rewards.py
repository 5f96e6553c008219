r"""Verifiable world rewards on decoded pixels: ``world_alignment``, ``world_quality``, ``world_motion``.

All three read the :mod:`~astrolabe.world.detector` features of each scene of a video (a scene prompt
``p1[1s] | p2`` is cut into the frame ranges :func:`~astrolabe.world.render.scene_frame_ranges` gives
for the video's length at ``world.fps``; a plain prompt is one scene) and average the scenes. The
detection of a video is computed once per batch and shared by the three rewards. Scores lie in
[0, 1] with 1 on rendered ground truth. ``ramp(x; z, o)`` is the linear ramp that is 0 at ``z`` and 1
at ``o``, clipped (either order; :func:`astrolabe.rewards.signal._ramp`), so near-misses get partial
credit.

``world_alignment``: the share of the caption's named attributes present (mean of their credits);
NaN when the prompt is not a world caption. Credits (an absent object scores 0 on all but background):

    colour, background  ramp(|rgb - palette[named]|; 0.36, 0.12)          (palette colours are >= 0.44 apart)
    shape               clip(1/2 + (min_{other} d_s - d_named) / 0.2, 0, 1)  d_s: distance of the shape features
                                                                       to prototype s (detector docstring)
    direction (moving)  ramp(cos(v, u_named); 0, cos 25deg) * ramp(|v|; s0 / 2, 3 s0 / 2)
    direction (still)   ramp(|v|; 3 s0 / 2, s0 / 2)                     s0 = STILL_FRACTION * slow_speed
    speed               ramp(|log(|v| / speed_named)|; log(fast / slow), log 1.25)

Details: each credit (NaN where the caption does not name it), ``num_attributes``, and ``exact``: the
share of named attributes the detector's hard classification gets right.

``world_quality`` and ``world_motion`` are gated by ``presence * size``: presence = share of frames
with an object, size = ramp(|log(e / object_size)|; log 3, log 1.5) with e the object's larger extent
over min(H, W) (a frame-filling blob is no object). Terms that cannot be measured count 0.

``world_quality`` = presence * size * intact * mean(sharp, object_uniform, background_uniform,
shape_integrity, area_stability):

    intact              ramp(mean stray; 0.2, 0.01)      stray: share of non-background pixels off the object
    sharp               ramp(median edge transition; 5, 2)
    object_uniform      ramp(mean interior spread; 0.3, 0.08)
    background_uniform  ramp(mean background spread; 0.3, 0.08)
    shape_integrity     ramp(distance of the shape features to the nearest prototype; 0.3, 0.12)
    area_stability      ramp(std / mean of the area; 0.4, 0.05)

``world_motion`` = presence * size * mean(straight, no_jumps, area_steady, color_steady,
background_steady, background_still):

    straight            ramp(rms residual of a constant-velocity fit of the track / object size; 0.2, 0.03)
    no_jumps            ramp(max_k |step_k - median step| / object size; 0.5, 0.08)
    area_steady         ramp(mean |dA| / mean A; 0.3, 0.05)
    color_steady        ramp(mean |d object colour|; 0.2, 0.04)
    background_steady   ramp(mean |d background colour|; 0.15, 0.02)
    background_still    ramp(mean static_change; 0.15, 0.04)   pixels off the object changing: flicker, noise

Fewer than 2 frames with an object score 0. Motion judges steadiness, not direction (alignment does):
a still object scores 1.

``world_alignment_late``: ``world_alignment`` on the last ``ceil(late_fraction * F)`` of the video's F frames
only (default the last third): each scene is judged on its frames inside that tail, scenes without any are
skipped, so for ``p1[3s] | p2`` with the tail inside the second scene it is the alignment of ``p2`` alone.
An evaluation metric for long videos (alignment late in the stream, after the window has rolled); log it
with weight 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import ClassVar

import numpy as np
from pydantic import Field

from astrolabe.rewards.signal import SignalReward, SignalRewardOptions
from astrolabe.rewards.signal import _downscale
from astrolabe.rewards.signal import _ramp as ramp
from astrolabe.rewards.video import VideoBatch
from astrolabe.sampling.scenes import ScenePromptError, parse_scene_prompt
from astrolabe.world.detector import (
    PALETTE_RGB,
    SHAPE_PROTOTYPES,
    STILL_FRACTION,
    ClipDetection,
    classify,
    detect_clip,
    shape_features,
)
from astrolabe.world.grammar import COLORS, SHAPES, WorldCaption, try_parse_caption
from astrolabe.world.render import UNIT_VECTORS, WorldConfig, scene_frame_ranges

__all__ = [
    "WorldAlignmentLateReward",
    "WorldAlignmentReward",
    "WorldLateOptions",
    "WorldMotionReward",
    "WorldQualityReward",
    "WorldRewardOptions",
    "alignment_terms",
    "motion_terms",
    "quality_terms",
    "scene_segments",
    "validity_terms",
]

ATTRIBUTES = ("color", "shape", "direction", "speed", "background")


class WorldRewardOptions(SignalRewardOptions):
    world: WorldConfig = Field(default_factory=WorldConfig, description="The world the videos come from (fps, speeds).")


class WorldLateOptions(WorldRewardOptions):
    late_fraction: float = Field(
        1.0 / 3.0, gt=0.0, le=1.0, description="Share of the video's last frames scored (1 = the whole video)."
    )


def _scalar(x: float | np.ndarray) -> float:
    return float(np.asarray(x))


# --------------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------------


def color_credit(rgb: np.ndarray, name: str) -> float:
    """ramp(|rgb - palette[name]|; 0.36, 0.12); 0 for a NaN colour."""
    if not np.isfinite(rgb).all():
        return 0.0
    return _scalar(ramp(np.linalg.norm(rgb - PALETTE_RGB[COLORS.index(name)]), 0.36, 0.12))


def shape_credit(features: np.ndarray, name: str) -> float:
    """clip(1/2 + (min_{other} d - d_named) / 0.2, 0, 1): 1/2 on the boundary of the nearest-prototype cells."""
    if not np.isfinite(features).all():
        return 0.0
    distances = np.linalg.norm(SHAPE_PROTOTYPES - features, axis=1)
    target = SHAPES.index(name)
    other = float(np.min(np.delete(distances, target)))
    return float(np.clip(0.5 + (other - distances[target]) / 0.2, 0.0, 1.0))


def direction_credit(velocity: np.ndarray, name: str, config: WorldConfig) -> float:
    """Moving: ramp(cos(v, u); 0, cos 25deg) * ramp(|v|; s0 / 2, 3 s0 / 2); still: ramp(|v|; 3 s0 / 2, s0 / 2)."""
    if not np.isfinite(velocity).all():
        return 0.0
    s0 = STILL_FRACTION * config.slow_speed
    speed = float(np.hypot(*velocity))
    moving = _scalar(ramp(speed, 0.5 * s0, 1.5 * s0))
    if name == "still":
        return 1.0 - moving
    cosine = float(np.dot(velocity, UNIT_VECTORS[name])) / max(speed, 1e-12)
    return _scalar(ramp(cosine, 0.0, math.cos(math.radians(25.0)))) * moving


def speed_credit(velocity: np.ndarray, name: str, config: WorldConfig) -> float:
    """ramp(|log(|v| / v_named)|; log(fast / slow), log 1.25)."""
    speed = float(np.hypot(*velocity)) if np.isfinite(velocity).all() else 0.0
    if speed <= 0.0:
        return 0.0
    target = config.slow_speed if name == "slow" else config.fast_speed
    return _scalar(ramp(abs(math.log(speed / target)), math.log(config.fast_speed / config.slow_speed), math.log(1.25)))


def alignment_terms(detection: ClipDetection, caption: WorldCaption, config: WorldConfig) -> dict[str, float]:
    """Credits of the named attributes, their mean (``score``), ``exact`` and ``num_attributes`` (module docstring)."""
    named = caption.named
    present = detection.any_present
    velocity = detection.velocity
    credit_of: dict[str, Callable[[str], float]] = {
        "color": lambda v: color_credit(detection.object_color, v) if present else 0.0,
        "shape": lambda v: shape_credit(shape_features(detection), v) if present else 0.0,
        "direction": lambda v: direction_credit(velocity, v, config) if present else 0.0,
        "speed": lambda v: speed_credit(velocity, v, config) if present else 0.0,
        "background": lambda v: color_credit(detection.background_color, v),
    }
    credits = {name: credit_of[name](value) for name, value in named.items()}
    predicted = classify(detection, config)
    hits = [predicted is not None and getattr(predicted, name) == value for name, value in named.items()]
    if not present and "background" in named:
        hits[list(named).index("background")] = credits["background"] >= 0.5
    out = {"score": float(np.mean(list(credits.values()))), "exact": float(np.mean(hits)), "num_attributes": float(len(named))}
    out.update({name: credits.get(name, math.nan) for name in ATTRIBUTES})
    return out


# --------------------------------------------------------------------------------------------------
# Quality and motion
# --------------------------------------------------------------------------------------------------


def _credit(x: float, zero_at: float, one_at: float) -> float:
    """ramp(x; zero_at, one_at) as a float; 0 for NaN (nothing to measure counts as failing)."""
    return _scalar(ramp(x, zero_at, one_at)) if math.isfinite(x) else 0.0


def validity_terms(detection: ClipDetection, config: WorldConfig) -> dict[str, float]:
    """``presence`` = share of frames with an object; ``size`` = ramp(|log(e / e0)|; log 3, log 1.5) with e the
    median larger extent over min(H, W) and e0 = ``object_size``. Their product gates quality and motion."""
    keep = detection.present > 0
    if not keep.any():
        return {"presence": 0.0, "size": 0.0}
    extent = float(np.median(np.maximum(detection.extent_x[keep], detection.extent_y[keep]))) / detection.side
    return {"presence": float(keep.mean()), "size": _credit(abs(math.log(extent / config.object_size)), math.log(3.0), math.log(1.5))}


def _gated(validity: dict[str, float], terms: dict[str, float]) -> dict[str, float]:
    """``score = prod(validity) * mean(terms)`` with every term reported."""
    score = math.prod(validity.values()) * float(np.mean(list(terms.values())))
    return {"score": score, **validity, **terms}


def quality_terms(detection: ClipDetection, config: WorldConfig) -> dict[str, float]:
    """``score`` = presence * size * intact * mean of the five quality terms (module docstring), and the terms."""
    validity = validity_terms(detection, config)
    validity["intact"] = _credit(float(detection.stray.mean()), 0.2, 0.01)
    keep = detection.present > 0
    names = ("sharp", "object_uniform", "background_uniform", "shape_integrity", "area_stability")
    if not keep.any():
        return _gated(validity, dict.fromkeys(names, 0.0))
    features = shape_features(detection)
    areas = detection.area[keep]
    spread = detection.background_spread
    terms = {
        "sharp": _credit(float(np.median(detection.transition[keep])), 5.0, 2.0),
        "object_uniform": _credit(float(detection.interior_spread[keep].mean()), 0.3, 0.08),
        "background_uniform": _credit(float(np.nanmean(spread)) if np.isfinite(spread).any() else math.nan, 0.3, 0.08),
        "shape_integrity": _credit(float(np.min(np.linalg.norm(SHAPE_PROTOTYPES - features, axis=1))), 0.3, 0.12),
        "area_stability": _credit(float(areas.std() / max(areas.mean(), 1e-6)), 0.4, 0.05),
    }
    return _gated(validity, terms)


def _mean_step(values: np.ndarray) -> float:
    """Mean norm of consecutive differences of (m,) or (m, C) values; 0 for fewer than 2."""
    if len(values) < 2:
        return 0.0
    steps = np.diff(values, axis=0)
    return float(np.mean(np.abs(steps) if steps.ndim == 1 else np.linalg.norm(steps, axis=1)))


def motion_terms(detection: ClipDetection, config: WorldConfig) -> dict[str, float]:
    """``score`` = presence * size * mean of the six steadiness terms (module docstring), and the terms."""
    validity = validity_terms(detection, config)
    keep = detection.present > 0
    names = ("straight", "no_jumps", "area_steady", "color_steady", "background_steady", "background_still")
    if keep.sum() < 2:
        return {**_gated(validity, dict.fromkeys(names, 0.0)), "score": 0.0}
    t = detection.times[keep]
    track = np.stack([detection.cx[keep], detection.cy[keep]], axis=1)  # (m, 2) pixels
    size = float(np.mean(np.maximum(detection.extent_x[keep], detection.extent_y[keep])))
    design = np.stack([np.ones_like(t), t - t.mean()], axis=1)  # (m, 2)
    fit, *_ = np.linalg.lstsq(design, track, rcond=None)
    rms = float(np.sqrt(np.mean(np.sum((track - design @ fit) ** 2, axis=1))))
    steps = np.diff(track, axis=0)  # (m-1, 2)
    jump = float(np.max(np.linalg.norm(steps - np.median(steps, axis=0), axis=1)))
    areas = detection.area[keep]
    change = detection.static_change[1:]
    terms = {
        "straight": _credit(rms / size, 0.2, 0.03),
        "no_jumps": _credit(jump / size, 0.5, 0.08),
        "area_steady": _credit(_mean_step(areas) / max(float(areas.mean()), 1e-6), 0.3, 0.05),
        "color_steady": _credit(_mean_step(detection.color[keep]), 0.2, 0.04),
        "background_steady": _credit(_mean_step(detection.background), 0.15, 0.02),
        "background_still": _credit(float(np.nanmean(change)) if np.isfinite(change).any() else math.nan, 0.15, 0.04),
    }
    return _gated(validity, terms)


# --------------------------------------------------------------------------------------------------
# The rewards
# --------------------------------------------------------------------------------------------------


def scene_segments(prompt: str, num_frames: int, fps: float) -> list[tuple[str, int, int]]:
    """``(scene prompt, start, end)`` frame ranges of ``prompt``; one range if it is not a multi-scene prompt."""
    try:
        scenes = parse_scene_prompt(prompt)
    except ScenePromptError:
        return [(prompt, 0, num_frames)]
    if len(scenes) == 1 or num_frames < len(scenes):
        return [(scenes[0].prompt if len(scenes) == 1 else prompt, 0, num_frames)]
    try:
        ranges = scene_frame_ranges(scenes, num_frames, fps)
    except ValueError:  # durations longer than the video: judge it as one clip
        return [(prompt, 0, num_frames)]
    return [(scene.prompt, start, end) for scene, (start, end) in zip(scenes, ranges)]


class WorldReward(SignalReward):
    """Shared scoring: detect each scene's sampled frames, score it with :meth:`score_scene`, average."""

    Options: ClassVar[type[WorldRewardOptions]] = WorldRewardOptions
    options: WorldRewardOptions

    @property
    def min_frames(self) -> int:
        return 2

    def score_scene(self, detection: ClipDetection, prompt: str) -> dict[str, float]:
        raise NotImplementedError

    def first_frame(self, num_frames: int) -> int:
        """First frame scored (earlier frames are ignored): 0, the whole video."""
        return 0

    def score_video(self, batch: VideoBatch, index: int, prompt: str) -> dict[str, float]:
        fps = self.options.world.fps
        indices = self.frame_indices(batch.num_frames)
        indices = indices[indices >= self.first_frame(batch.num_frames)]
        rows = []
        for scene_prompt, start, end in scene_segments(prompt, batch.num_frames, fps):
            chosen = indices[(indices >= start) & (indices < end)]
            if len(chosen) == 0:
                continue
            rows.append(self.score_scene(self.detection(batch, index, chosen), scene_prompt))
        return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}

    def detection(self, batch: VideoBatch, index: int, chosen: np.ndarray) -> ClipDetection:
        """:func:`detect_clip` of frames ``chosen`` of sample ``index``, computed once per batch and shared by
        every world reward scoring that batch (cached on the batch, like its views)."""
        cache = batch.__dict__.setdefault("_world_detections", {})
        key = (index, chosen.tobytes(), self.options.max_side, self.options.world.fps)
        if key not in cache:
            frames = _downscale(batch.float01[index][chosen], self.options.max_side)  # (n, h, w, 3)
            cache[key] = detect_clip(frames, chosen / self.options.world.fps)
        return cache[key]


class WorldAlignmentReward(WorldReward):
    """Share of the caption's attributes present in the video (module docstring); NaN for other prompts."""

    name: ClassVar[str] = "world_alignment"
    version: ClassVar[str] = "1"

    def score_scene(self, detection: ClipDetection, prompt: str) -> dict[str, float]:
        caption = try_parse_caption(prompt)
        if caption is None:
            return {"score": math.nan, "exact": math.nan, "num_attributes": 0.0, **dict.fromkeys(ATTRIBUTES, math.nan)}
        return alignment_terms(detection, caption, self.options.world)


class WorldQualityReward(WorldReward):
    """One sharp, intact object on a clean background (module docstring). Prompt-independent."""

    name: ClassVar[str] = "world_quality"
    version: ClassVar[str] = "1"

    @property
    def min_frames(self) -> int:
        return 1

    def score_scene(self, detection: ClipDetection, prompt: str) -> dict[str, float]:
        return quality_terms(detection, self.options.world)


class WorldMotionReward(WorldReward):
    """Steady motion: a smooth track without jumps, no flicker of size or colours (module docstring)."""

    name: ClassVar[str] = "world_motion"
    version: ClassVar[str] = "1"

    def score_scene(self, detection: ClipDetection, prompt: str) -> dict[str, float]:
        return motion_terms(detection, self.options.world)


class WorldAlignmentLateReward(WorldAlignmentReward):
    """``world_alignment`` on the last ``late_fraction`` of the frames (module docstring): alignment late in a
    long video. NaN for prompts that are not world (scene) captions."""

    Options: ClassVar[type[WorldLateOptions]] = WorldLateOptions
    options: WorldLateOptions
    name: ClassVar[str] = "world_alignment_late"
    version: ClassVar[str] = "1"

    def first_frame(self, num_frames: int) -> int:
        """``F - ceil(late_fraction * F)`` (at least one frame is scored)."""
        return num_frames - max(1, math.ceil(self.options.late_fraction * num_frames))
