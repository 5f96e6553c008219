"""Rendering the world: one anti-aliased object moving at constant velocity on a flat background.

Geometry (pixels, origin top-left, pixel centres at ``(i + 0.5, j + 0.5)``): ``side = min(H, W)``,
the object's bounding box is a square of side ``s = object_size * side`` centred at ``c(t)``, with
``c(t_k) = c_0 + v * k / fps`` for frame k and ``v = speed * side`` pixels per second along the
caption's direction (``slow_speed`` or ``fast_speed``; 0 when still). The shapes, by signed distance
``d(p)`` (negative inside) with ``(dx, dy) = p - c`` and ``r = s / 2``:

    circle    d = |(dx, dy)| - r                                   fill of the box pi/4
    square    d = max(|dx|, |dy|) - r                              fill 1
    triangle  d = max(dy - r, (2 dx - dy - r) / sqrt 5, (-2 dx - dy - r) / sqrt 5)    apex up, fill 1/2

and each pixel is ``(1 - a) * background + a * colour`` with coverage ``a = clip(1/2 - d, 0, 1)``
(one-pixel anti-aliasing). The start ``c_0`` is uniform over the positions that keep the whole box at
least ``MARGIN_PX`` inside the frame for the whole clip (an error when no position does).

Randomness: the start position and every attribute the caption does not name come from one explicit
generator, a ``numpy.random.Generator`` or a ``torch.Generator``, so a seed fixes the video.

Scene prompts (``a red circle moving left[1s] | a blue square moving up``, parsed by
:func:`astrolabe.sampling.scenes.parse_scene_prompt`) render as consecutive clips: a scene with a
duration gets ``round(seconds * fps)`` frames, the others share the rest. Attributes a scene does not
name carry over from the previous scene (when still valid) and the object starts where it was, moved
the least needed to stay in frame for the new scene.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import torch
from pydantic import Field, model_validator

from astrolabe.configbase import Frozen
from astrolabe.sampling.scenes import Scene, parse_scene_prompt, plan_scenes
from astrolabe.world.grammar import (
    COLORS,
    MOVING_DIRECTIONS,
    PALETTE,
    SPEEDS,
    WorldCaption,
    parse_caption,
)

__all__ = [
    "Generator",
    "SceneVideo",
    "WorldConfig",
    "WorldVideo",
    "render",
    "render_caption",
    "render_scene_prompt",
    "resolve_caption",
    "scene_frame_ranges",
    "shape_coverage",
]

Generator = Union[np.random.Generator, torch.Generator]
MARGIN_PX = 1.0
UNIT_VECTORS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0), "down": (0.0, 1.0), "still": (0.0, 0.0)}  # fmt: skip


class WorldConfig(Frozen):
    """Size, timing and object geometry of the world's videos."""

    height: int = Field(64, ge=16, description="Frame height in pixels.")
    width: int = Field(64, ge=16, description="Frame width in pixels.")
    fps: float = Field(16.0, gt=0, description="Frames per second (speeds are per second).")
    num_frames: int = Field(17, ge=2, description="Frames of one clip (17 = 1 + 4 * 4: the Wan VAE's 1 + 4k).")
    object_size: float = Field(0.28, gt=0.05, lt=0.6, description="Object bounding box side / min(H, W).")
    slow_speed: float = Field(0.2, gt=0, description="'slowly': min(H, W) fractions per second.")
    fast_speed: float = Field(0.4, gt=0, description="'quickly': min(H, W) fractions per second.")

    @model_validator(mode="after")
    def _check(self) -> WorldConfig:
        if self.fast_speed <= 1.5 * self.slow_speed:
            raise ValueError(f"fast_speed ({self.fast_speed}) must exceed 1.5 x slow_speed ({self.slow_speed})")
        if self.max_frames("fast") < self.num_frames:
            raise ValueError(
                f"a fast object leaves the frame within {self.num_frames} frames; lower fast_speed, object_size "
                f"or num_frames (at most {self.max_frames('fast')} frames)"
            )
        return self

    @property
    def side(self) -> int:
        return min(self.height, self.width)

    @property
    def object_px(self) -> float:
        """Side of the object's bounding box in pixels."""
        return self.object_size * self.side

    def speed_px(self, speed: str | None) -> float:
        """Pixels per frame of ``speed`` (None = still)."""
        if speed is None:
            return 0.0
        return (self.slow_speed if speed == "slow" else self.fast_speed) * self.side / self.fps

    def max_frames(self, speed: str) -> int:
        """Most frames a clip at ``speed`` can last with the object in frame along the shorter side."""
        room = self.side - self.object_px - 2 * MARGIN_PX
        return int(math.floor(room / self.speed_px(speed) + 1e-9)) + 1


@dataclass(frozen=True)
class WorldVideo:
    """One rendered clip.

    Attributes:
        frames: (T, 3, H, W) float32 in [0, 1].
        caption: the text it was rendered from.
        attributes: the complete attributes rendered (unnamed ones drawn).
        centers: (T, 2) float64 bounding-box centres ``(x, y)`` in pixels (ground truth of the track).
    """

    frames: torch.Tensor
    caption: str
    attributes: WorldCaption
    centers: np.ndarray


@dataclass(frozen=True)
class SceneVideo:
    """A scene prompt rendered as consecutive clips; ``frames`` (T, 3, H, W) is their concatenation."""

    frames: torch.Tensor
    caption: str
    scenes: tuple[WorldVideo, ...]
    starts: tuple[int, ...]  # first frame of each scene


# --------------------------------------------------------------------------------------------------
# Randomness
# --------------------------------------------------------------------------------------------------


def _uniform(generator: Generator) -> float:
    """One draw from U[0, 1) of a numpy or torch generator."""
    if isinstance(generator, torch.Generator):
        return float(torch.rand((), generator=generator, dtype=torch.float64))
    if isinstance(generator, np.random.Generator):
        return float(generator.random())
    raise TypeError(f"need a numpy.random.Generator or torch.Generator, got {type(generator).__name__}")


def _choice(generator: Generator, options: Sequence[str]) -> str:
    return options[min(int(_uniform(generator) * len(options)), len(options) - 1)]


def resolve_caption(caption: WorldCaption, generator: Generator, previous: WorldCaption | None = None) -> WorldCaption:
    """Complete ``caption``: each unnamed attribute keeps ``previous``'s value when that stays valid,
    else is drawn uniformly (the background among colours other than the object's)."""

    def keep_or_draw(name: str, options: Sequence[str]) -> str:
        value = getattr(previous, name, None) if previous is not None else None
        return value if value in options else _choice(generator, options)

    color = caption.color or keep_or_draw("color", tuple(c for c in COLORS if c != caption.background))
    background = caption.background or keep_or_draw("background", tuple(c for c in COLORS if c != color))
    direction = caption.direction or keep_or_draw("direction", (*MOVING_DIRECTIONS, "still"))
    speed = caption.speed
    if direction != "still" and speed is None:
        speed = keep_or_draw("speed", SPEEDS)
    return WorldCaption(caption.shape, color, direction, speed if direction != "still" else None, background)


# --------------------------------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------------------------------


def shape_coverage(shape: str, centers: np.ndarray, half: float, height: int, width: int) -> np.ndarray:
    """Coverage ``a = clip(1/2 - d, 0, 1)`` of ``shape`` at every pixel centre: (T, H, W) float32.

    ``centers`` (T, 2) are bounding-box centres (x, y) in pixels, ``half`` = r the half side; d is the
    signed distance of the module docstring.
    """
    xs = np.arange(width, dtype=np.float64) + 0.5
    ys = np.arange(height, dtype=np.float64) + 0.5
    dx = xs[None, None, :] - centers[:, 0, None, None]  # (T, 1, W)
    dy = ys[None, :, None] - centers[:, 1, None, None]  # (T, H, 1)
    if shape == "circle":
        dist = np.hypot(dx, dy) - half
    elif shape == "square":
        dist = np.maximum(np.abs(dx), np.abs(dy)) - half
    elif shape == "triangle":
        root5 = math.sqrt(5.0)
        dist = np.maximum(dy - half, np.maximum((2 * dx - dy - half) / root5, (-2 * dx - dy - half) / root5))
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return np.clip(0.5 - dist, 0.0, 1.0).astype(np.float32)  # (T, H, W)


def _start_range(length: float, half: float, displacement: float) -> tuple[float, float]:
    """Centres c_0 along one axis keeping [c - half, c + half] inside [MARGIN, length - MARGIN] for
    c in {c_0, c_0 + displacement}."""
    low = half + MARGIN_PX - min(0.0, displacement)
    high = length - half - MARGIN_PX - max(0.0, displacement)
    return low, high


def _track(
    attributes: WorldCaption, config: WorldConfig, num_frames: int, generator: Generator, start: np.ndarray | None
) -> np.ndarray:
    """Bounding-box centres (T, 2): c_0 drawn uniformly from the feasible box (or ``start`` clamped into it)."""
    step = np.array(UNIT_VECTORS[attributes.direction]) * config.speed_px(attributes.speed)  # px / frame
    displacement = step * (num_frames - 1)
    half = config.object_px / 2
    ranges = [_start_range(config.width, half, displacement[0]), _start_range(config.height, half, displacement[1])]
    for (low, high), axis in zip(ranges, "xy"):
        if low > high:
            raise ValueError(
                f"{attributes.text!r}: a {attributes.speed} object leaves the frame within {num_frames} frames "
                f"(along {axis}); use shorter scenes (at most {config.max_frames(attributes.speed)} frames)"
            )
    draws = np.array([_uniform(generator), _uniform(generator)])
    origin = np.array([low + u * (high - low) for (low, high), u in zip(ranges, draws)])
    if start is not None:
        origin = np.array([np.clip(s, low, high) for s, (low, high) in zip(start, ranges)])
    return origin[None, :] + np.arange(num_frames)[:, None] * step[None, :]  # (T, 2)


def render(
    attributes: WorldCaption,
    generator: Generator,
    config: WorldConfig = WorldConfig(),
    num_frames: int | None = None,
    *,
    caption: str | None = None,
    start: np.ndarray | None = None,
) -> WorldVideo:
    """Render complete ``attributes`` (:func:`resolve_caption` first if some are unnamed).

    ``num_frames`` defaults to ``config.num_frames``; ``start`` (x, y) replaces the drawn start
    position (clamped to keep the object in frame); ``caption`` defaults to ``attributes.text``.
    """
    if not attributes.complete:
        raise ValueError(f"render needs complete attributes, got {attributes}; call resolve_caption first")
    frames_n = config.num_frames if num_frames is None else num_frames
    centers = _track(attributes, config, frames_n, generator, start)  # (T, 2)
    alpha = shape_coverage(attributes.shape, centers, config.object_px / 2, config.height, config.width)[..., None]
    background = np.asarray(PALETTE[attributes.background], dtype=np.float32)
    color = np.asarray(PALETTE[attributes.color], dtype=np.float32)
    video = (1.0 - alpha) * background + alpha * color  # (T, H, W, 3)
    frames = torch.from_numpy(np.ascontiguousarray(video.transpose(0, 3, 1, 2)))  # (T, 3, H, W)
    return WorldVideo(frames, caption or attributes.text, attributes, centers)


def render_caption(
    caption: str | WorldCaption, generator: Generator, config: WorldConfig = WorldConfig(), num_frames: int | None = None
) -> WorldVideo:
    """Render one caption (text or :class:`WorldCaption`); unnamed attributes are drawn from ``generator``."""
    parsed = parse_caption(caption) if isinstance(caption, str) else caption
    text = caption if isinstance(caption, str) else caption.text
    return render(resolve_caption(parsed, generator), generator, config, num_frames, caption=text)


def scene_frame_ranges(scenes: Sequence[Scene], num_frames: int, fps: float) -> list[tuple[int, int]]:
    """``[start, end)`` frames of each scene: ``round(seconds * fps)`` frames (at least 1) for a scene with
    a duration, the rest shared equally by the others (earlier scenes get the remainder); when every
    scene has a duration the last runs to the end.

    This is :func:`~astrolabe.sampling.scenes.plan_scenes` with one frame per block: plan_scenes counts
    ``seconds * fps' / 4`` latent frames, so it is called with ``fps' = 4 * fps``.
    """
    segments = plan_scenes(list(scenes), num_blocks=num_frames, fps=4 * fps, block_frames=1)
    return [(s.start_block, s.end_block) for s in segments]


def render_scene_prompt(
    text: str, generator: Generator, config: WorldConfig = WorldConfig(), num_frames: int | None = None
) -> SceneVideo:
    """Render ``p1[1s] | p2`` as consecutive clips (module docstring); a plain caption is one scene."""
    scenes = parse_scene_prompt(text)
    total = config.num_frames * len(scenes) if num_frames is None else num_frames
    clips: list[WorldVideo] = []
    previous, start = None, None
    for scene, (first, end) in zip(scenes, scene_frame_ranges(scenes, total, config.fps)):
        attributes = resolve_caption(parse_caption(scene.prompt), generator, previous)
        clip = render(attributes, generator, config, end - first, caption=scene.prompt, start=start)
        clips.append(clip)
        previous, start = attributes, clip.centers[-1]
    frames = torch.cat([clip.frames for clip in clips])  # (T, 3, H, W)
    starts = tuple(int(s) for s in np.cumsum([0] + [len(c.frames) for c in clips[:-1]]))
    return SceneVideo(frames, text, tuple(clips), starts)
