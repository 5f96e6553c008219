"""An analytic detector of the world's attributes on decoded pixels (no weights).

Frames are (n, H, W, 3) float in [0, 1] with their times in seconds. Per frame k:

1. background ``b_k`` = per-channel median of the ``BORDER_PX``-wide border ring.
2. candidate pixels: ``|x(p) - b_k| > COARSE_DISTANCE`` (RGB Euclidean distance); the largest
   8-connected component is the object, the other candidates are *stray* pixels.
3. object colour ``o_k`` = per-channel median of the object component's farther half (its pixels whose
   distance to ``b_k`` is at least the component's median distance: the interior, not the edge).
4. soft mask ``a(p) = clip((x(p) - b_k) . (o_k - b_k) / |o_k - b_k|^2, 0, 1)`` (the coverage of the
   renderer's blend), kept inside the object component dilated by ``DILATE_PX``; the object is present
   when ``sum_p [a(p) > 1/2] >= MIN_AREA_FRACTION * H * W``.
5. area ``A = sum a``, centroid ``c = sum a p / A``; extents ``e_x = sum_x max_y a``, ``e_y = sum_y max_x a``
   (the widths of the column / row profiles); ``fill = A / (e_x e_y)``, ``aspect = e_x / e_y``,
   ``offset = (c_y - m_y) / e_y`` with ``m_y`` the centre of the row profile (a triangle with its apex up
   has its centroid 1/6 of its height below the box centre).
6. quality features: ``stray = #stray / (A + #stray)``; edge ``transition`` = #{0.1 < a < 0.9} / #boundary
   pixels of [a > 1/2] (about 1 for a sharp anti-aliased edge, larger when blurred); ``interior_spread`` =
   mean |x - o_k| over the eroded object; ``background_spread`` = mean |x - b_k| over non-candidate
   pixels outside the object; ``static_change`` = mean |x_k - x_{k-1}| (over pixels and channels) off
   both frames' object regions (flicker of what should be a still background).

Per clip: background = median of the ``b_k``, object colour = median of the ``o_k``, shape features =
medians over present frames; the velocity ``v`` (min(H, W) fractions per second) is the least-squares
slope of the centroid track over time. Classification: nearest named colour; nearest shape prototype in
``(fill, 2 offset, log aspect)`` (circle ``(pi/4, 0, 0)``, square ``(1, 0, 0)``, triangle ``(1/2, 1/3, 0)``);
still when ``|v| < STILL_FRACTION * slow_speed``, else the dominant axis's sign (y grows downwards), and
slow when ``|v| < sqrt(slow_speed * fast_speed)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import cv2
import numpy as np

from astrolabe.world.grammar import COLORS, PALETTE, SHAPES, WorldCaption
from astrolabe.world.render import WorldConfig

__all__ = [
    "ClipDetection",
    "FrameFeatures",
    "PALETTE_RGB",
    "SHAPE_PROTOTYPES",
    "classify",
    "detect_clip",
    "detect_frame",
    "shape_features",
]

BORDER_PX = 2
COARSE_DISTANCE = 0.15
DILATE_PX = 2
MIN_AREA_FRACTION = 0.002  # 8 pixels at 64 x 64
STILL_FRACTION = 0.5  # still below half the slow speed
PALETTE_RGB = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)  # (6, 3)
SHAPE_PROTOTYPES = np.array([[math.pi / 4, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 1.0 / 3.0, 0.0]])  # (3, 3) in SHAPES order
_KERNEL = np.ones((3, 3), np.uint8)


@dataclass(frozen=True)
class FrameFeatures:
    """What the detector measures on one frame (NaN where the object is absent)."""

    present: float
    background: np.ndarray  # (3,)
    color: np.ndarray  # (3,)
    area: float  # pixels
    cx: float
    cy: float
    extent_x: float
    extent_y: float
    fill: float
    offset: float
    stray: float
    transition: float
    interior_spread: float
    background_spread: float
    region: np.ndarray  # (H, W) bool: the object component dilated (all False when nothing was found)


def _border_median(frame: np.ndarray) -> np.ndarray:
    """Per-channel median of the BORDER_PX ring of (H, W, 3) -> (3,)."""
    b = BORDER_PX
    ring = np.concatenate(
        [frame[:b].reshape(-1, 3), frame[-b:].reshape(-1, 3), frame[b:-b, :b].reshape(-1, 3), frame[b:-b, -b:].reshape(-1, 3)]
    )
    return np.median(ring, axis=0).astype(np.float32)


def _absent(background: np.ndarray, stray: float, background_spread: float, region: np.ndarray) -> FrameFeatures:
    nan = math.nan
    color = np.full(3, np.nan, np.float32)
    return FrameFeatures(0.0, background, color, 0.0, nan, nan, nan, nan, nan, nan, stray, nan, nan, background_spread, region)


def detect_frame(frame: np.ndarray) -> FrameFeatures:
    """Measure one frame (H, W, 3) float32 in [0, 1] (module docstring, steps 1-6)."""
    height, width, _ = frame.shape
    background = _border_median(frame)
    distance = np.linalg.norm(frame - background, axis=-1)  # (H, W)
    candidates = (distance > COARSE_DISTANCE).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(candidates, connectivity=8)
    if count <= 1:
        return _absent(background, 0.0, float(distance.mean()), np.zeros((height, width), bool))
    main = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    # work on a crop around the object component (its box grown by DILATE_PX + 1): (h, w) arrays below
    x0, y0, box_w, box_h = (int(v) for v in stats[main, :4])
    pad = DILATE_PX + 1
    top, left = max(0, y0 - pad), max(0, x0 - pad)
    crop = (slice(top, min(height, y0 + box_h + pad)), slice(left, min(width, x0 + box_w + pad)))
    pixels, near = frame[crop], distance[crop]  # (h, w, 3), (h, w)
    component = labels[crop] == main
    inner = component & (near >= np.median(near[component]))
    color = np.median(pixels[inner], axis=0).astype(np.float32)
    direction = color - background
    alpha = np.clip((pixels - background) @ direction / max(float(direction @ direction), 1e-6), 0.0, 1.0)  # (h, w)
    local_region = cv2.dilate(component.astype(np.uint8), _KERNEL, iterations=DILATE_PX).astype(bool)
    alpha = np.where(local_region, alpha, 0.0)
    region = np.zeros((height, width), bool)
    region[crop] = local_region
    candidate = candidates.astype(bool)
    n_stray = float(candidate.sum() - candidate[crop][local_region].sum())
    quiet = ~region & ~candidate
    background_spread = float(distance[quiet].mean()) if quiet.any() else math.nan
    hard = alpha > 0.5
    if hard.sum() < MIN_AREA_FRACTION * height * width:
        return _absent(background, 1.0, background_spread, region)
    area = float(alpha.sum())
    ys, xs = np.arange(crop[0].start, crop[0].stop) + 0.5, np.arange(crop[1].start, crop[1].stop) + 0.5
    cx, cy = float(alpha.sum(0) @ xs / area), float(alpha.sum(1) @ ys / area)
    cols, rows = alpha.max(0), alpha.max(1)  # (w,), (h,)
    extent_x, extent_y = float(cols.sum()), float(rows.sum())
    mid_y = float(rows @ ys / extent_y)
    eroded = cv2.erode(hard.astype(np.uint8), _KERNEL).astype(bool)
    transition = float(((alpha > 0.1) & (alpha < 0.9)).sum()) / max(float((hard & ~eroded).sum()), 1.0)
    interior = eroded if eroded.any() else hard
    return FrameFeatures(
        present=1.0,
        background=background,
        color=color,
        area=area,
        cx=cx,
        cy=cy,
        extent_x=extent_x,
        extent_y=extent_y,
        fill=area / max(extent_x * extent_y, 1e-6),
        offset=(cy - mid_y) / extent_y,
        stray=n_stray / (area + n_stray),
        transition=transition,
        interior_spread=float(np.linalg.norm(pixels[interior] - color, axis=-1).mean()),
        background_spread=background_spread,
        region=region,
    )


@dataclass(frozen=True)
class ClipDetection:
    """Per-frame features of a clip, stacked: (n,) arrays, (n, 3) for colours; and clip-level summaries.

    ``velocity`` is (2,) in min(H, W) fractions per second (NaN with fewer than 2 present frames).
    """

    times: np.ndarray
    side: int
    present: np.ndarray
    background: np.ndarray
    color: np.ndarray
    area: np.ndarray
    cx: np.ndarray
    cy: np.ndarray
    extent_x: np.ndarray
    extent_y: np.ndarray
    fill: np.ndarray
    offset: np.ndarray
    stray: np.ndarray
    transition: np.ndarray
    interior_spread: np.ndarray
    background_spread: np.ndarray
    static_change: np.ndarray  # (n,) mean |x_k - x_{k-1}| off both frames' object regions; NaN at k = 0

    @property
    def any_present(self) -> bool:
        return bool(self.present.any())

    @property
    def background_color(self) -> np.ndarray:
        """(3,) median background colour over frames."""
        return np.median(self.background, axis=0)

    @property
    def object_color(self) -> np.ndarray:
        """(3,) median object colour over present frames (NaN if none)."""
        return np.nanmedian(self.color, axis=0) if self.any_present else np.full(3, np.nan)

    @property
    def velocity(self) -> np.ndarray:
        """Least-squares slope of the centroid track: (2,) min(H, W) fractions per second."""
        keep = self.present > 0
        if keep.sum() < 2:
            return np.full(2, np.nan)
        t = self.times[keep] - self.times[keep].mean()
        track = np.stack([self.cx[keep], self.cy[keep]], axis=1)  # (m, 2)
        return (t @ (track - track.mean(0))) / max(float(t @ t), 1e-12) / self.side


def detect_clip(frames: np.ndarray, times: np.ndarray) -> ClipDetection:
    """Detect every frame of (n, H, W, 3) float32 in [0, 1]; ``times`` (n,) in seconds."""
    per_frame = [detect_frame(frame) for frame in frames]
    columns = {f.name: np.stack([getattr(p, f.name) for p in per_frame]) for f in fields(FrameFeatures)}
    regions = columns.pop("region")  # (n, H, W)
    quiet = ~(regions[1:] | regions[:-1])  # (n-1, H, W)
    counts = quiet.sum(axis=(1, 2))
    total = (np.abs(np.diff(frames, axis=0)).mean(-1) * quiet).sum(axis=(1, 2))  # (n-1,)
    change = np.concatenate([[np.nan], np.where(counts > 0, total / np.maximum(counts, 1), np.nan)])
    return ClipDetection(times=np.asarray(times, np.float64), side=min(frames.shape[1:3]), static_change=change, **columns)


def shape_features(detection: ClipDetection) -> np.ndarray:
    """(3,) ``(fill, 2 offset, log aspect)`` medians over present frames (NaN if none)."""
    if not detection.any_present:
        return np.full(3, np.nan)
    keep = detection.present > 0
    aspect = np.log(detection.extent_x[keep] / detection.extent_y[keep])
    return np.array([np.median(detection.fill[keep]), 2 * np.median(detection.offset[keep]), np.median(aspect)])


def nearest_color(rgb: np.ndarray) -> str:
    """The named colour nearest to ``rgb`` (3,) in RGB distance."""
    return COLORS[int(np.argmin(np.linalg.norm(PALETTE_RGB - rgb, axis=1)))]


def classify(detection: ClipDetection, config: WorldConfig = WorldConfig()) -> WorldCaption | None:
    """The attributes read off a clip (module docstring); None if no object was found."""
    if not detection.any_present:
        return None
    features = shape_features(detection)
    shape = SHAPES[int(np.argmin(np.linalg.norm(SHAPE_PROTOTYPES - features, axis=1)))]
    velocity = detection.velocity
    speed = float(np.hypot(*velocity)) if np.isfinite(velocity).all() else 0.0
    if speed < STILL_FRACTION * config.slow_speed:
        direction, speed_class = "still", None
    else:
        axis = int(np.argmax(np.abs(velocity)))
        direction = (("left", "right"), ("up", "down"))[axis][int(velocity[axis] > 0)]
        speed_class = "slow" if speed < math.sqrt(config.slow_speed * config.fast_speed) else "fast"
    color, background = nearest_color(detection.object_color), nearest_color(detection.background_color)
    if color == background:  # a faint object: the second-nearest colour
        distances = np.linalg.norm(PALETTE_RGB - detection.object_color, axis=1)
        color = COLORS[int(np.argsort(distances)[1])]
    return WorldCaption(shape, color, direction, speed_class, background)
