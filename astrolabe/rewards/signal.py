"""Weight-free video rewards: deterministic, CPU-only, formulas in the docstrings.

=====================  =========================================================  =====================
name                   score                                                      scale
=====================  =========================================================  =====================
``motion``             mean Farneback flow magnitude per frame / image diagonal   >= 0, ~0.001 - 0.05
``smoothness``         1 - mean |frame change| (flicker) and/or interpolation      [0, 1], 1 = static
``sharpness``          log(1 + variance of the Laplacian of the gray frames)      >= 0, ~3 - 9
``colorfulness``       Hasler-Suesstrunk M / 100                                   >= 0, ~0 - 1.5
``text_color_match``   coverage of the colours named in the prompt                 [0, 1], 0.5 neutral
=====================  =========================================================  =====================

``motion`` and ``smoothness`` conflict on purpose (any pixel change lowers smoothness), which makes
the tiny CPU default a genuine multi-reward problem. Every reward reads the shared views of
:class:`~astrolabe.rewards.video.VideoBatch`, chooses frames with ``frame_stride`` / ``max_frames``
(:func:`~astrolabe.rewards.video.sample_frame_indices`) and can downscale frames so that the longer
side is at most ``max_side`` (``cv2.INTER_AREA``) before scoring.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import cv2
import numpy as np
from pydantic import Field

from astrolabe.rewards.contract import Reward, RewardOptions, RewardOutput
from astrolabe.rewards.registry import register_reward
from astrolabe.rewards.video import VideoBatch, sample_frame_indices

__all__ = [
    "COLOR_WORDS",
    "ColorfulnessReward",
    "MotionReward",
    "SharpnessReward",
    "SignalReward",
    "SignalRewardOptions",
    "SmoothnessReward",
    "TextColorMatchReward",
    "color_membership",
    "hasler_susstrunk_colorfulness",
    "laplacian_variance",
    "parse_prompt_colors",
    "rgb_to_hue_chroma_value",
]


# --------------------------------------------------------------------------------------------------
# Shared base
# --------------------------------------------------------------------------------------------------


class SignalRewardOptions(RewardOptions):
    """Frame sampling and resolution shared by every weight-free reward."""

    frame_stride: int = Field(1, ge=1, description="Use every k-th frame.")
    max_frames: int | None = Field(None, ge=1, description="At most this many frames (evenly spread); None = all.")
    max_side: int | None = Field(
        None, ge=8, description="Downscale (INTER_AREA) so the longer side is <= max_side; None = native."
    )


class SignalReward(Reward):
    """A weight-free reward scored video by video with :meth:`score_video`."""

    Options: ClassVar[type[SignalRewardOptions]] = SignalRewardOptions
    options: SignalRewardOptions

    def frame_sampling(self) -> dict[str, Any]:
        return {"stride": self.options.frame_stride, "max_frames": self.options.max_frames}

    def resolution(self) -> Any:
        return "native" if self.options.max_side is None else {"max_side": self.options.max_side}

    def frame_indices(self, num_frames: int) -> np.ndarray:
        return sample_frame_indices(num_frames, self.options.frame_stride, self.options.max_frames)

    def select(self, frames: np.ndarray) -> np.ndarray:
        """Sampled (and possibly downscaled) frames of one video: (F, H, W[, 3]) -> (n, h, w[, 3])."""
        frames = frames[self.frame_indices(frames.shape[0])]
        return _downscale(frames, self.options.max_side)

    def score_video(self, batch: VideoBatch, index: int, prompt: str) -> dict[str, float]:
        """Score sample ``index`` of ``batch``: ``{"score": ..., <detail>: ...}``. Override this."""
        raise NotImplementedError

    def score_batch(self, batch: VideoBatch, prompts: Sequence[str]) -> RewardOutput:
        rows = [self.score_video(batch, i, prompts[i]) for i in range(batch.size)]
        keys = [k for k in rows[0] if k != "score"]
        return RewardOutput(
            scores=np.array([row["score"] for row in rows], dtype=np.float32),
            details={k: np.array([row[k] for row in rows], dtype=np.float32) for k in keys},
        )


def _downscale(frames: np.ndarray, max_side: int | None) -> np.ndarray:
    """Resize (n, H, W[, C]) frames with INTER_AREA so that max(H, W) <= max_side (aspect kept)."""
    height, width = frames.shape[1:3]
    if max_side is None or max(height, width) <= max_side:
        return frames
    scale = max_side / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))  # cv2 wants (w, h)
    return np.stack([cv2.resize(frame, size, interpolation=cv2.INTER_AREA) for frame in frames])


# --------------------------------------------------------------------------------------------------
# motion
# --------------------------------------------------------------------------------------------------


class MotionOptions(SignalRewardOptions):
    dynamic_threshold: float = Field(
        6.0 / 256.0,
        gt=0,
        description="A frame pair is dynamic if its top-flow mean exceeds this fraction of min(H, W) per frame "
        "(VBench dynamic degree: 6 px at a 256-px short side).",
    )
    top_fraction: float = Field(0.05, gt=0, le=1, description="Fraction of largest flow magnitudes averaged.")
    levels: int = Field(3, ge=1, le=8, description="Farneback pyramid levels.")
    winsize: int = Field(15, ge=3, le=63, description="Farneback averaging window (pixels).")


def farneback_magnitude(prev: np.ndarray, nxt: np.ndarray, levels: int, winsize: int) -> np.ndarray:
    """|flow| in pixels between two gray uint8 frames (H, W) -> (H, W) float32.

    ``cv2.calcOpticalFlowFarneback(prev, nxt, pyr_scale=0.5, levels, winsize, iterations=3,
    poly_n=5, poly_sigma=1.2, flags=0)``.
    """
    flow = cv2.calcOpticalFlowFarneback(prev, nxt, None, 0.5, levels, winsize, 3, 5, 1.2, 0)  # (H, W, 2)
    return np.hypot(flow[..., 0], flow[..., 1])


def _top_mean(values: np.ndarray, fraction: float) -> float:
    """Mean of the largest ceil(fraction * N) entries."""
    flat = values.ravel()
    k = max(1, math.ceil(fraction * flat.size))
    return float(np.partition(flat, flat.size - k)[flat.size - k :].mean())


@register_reward("motion")
class MotionReward(SignalReward):
    r"""Amount of motion from dense Farneback optical flow on the gray frames.

    For consecutive sampled frames (t_k, t_{k+1}) with gap g_k = t_{k+1} - t_k, flow magnitudes
    m_k(p) in pixels, D = sqrt(H^2 + W^2) the image diagonal and S = min(H, W):

        mean_k = mean_p m_k(p) / g_k / D            (fraction of the diagonal moved per frame)
        top_k  = mean of the top ``top_fraction`` of m_k / g_k / D
        dyn_k  = [mean of the top ``top_fraction`` of m_k / g_k  >  dynamic_threshold * S]

        score            = mean_k mean_k
        top_magnitude    = mean_k top_k
        dynamic_fraction = mean_k dyn_k              (VBench-style dynamic degree, per pair, in [0, 1])

    Unlike the release's dynamic-degree scorer (SEA-RAFT fed [0, 1] frames where it expects 0-255,
    and an import path that never resolved) the flow here runs on 0-255 gray frames as Farneback
    expects. Static videos score 0.
    """

    name: ClassVar[str] = "motion"
    version: ClassVar[str] = "1"
    Options: ClassVar[type[MotionOptions]] = MotionOptions
    options: MotionOptions

    @property
    def min_frames(self) -> int:
        return 2

    def score_video(self, batch: VideoBatch, index: int, prompt: str) -> dict[str, float]:
        times = self.frame_indices(batch.num_frames)
        gray = self.select(batch.gray[index])  # (n, h, w) uint8
        height, width = gray.shape[1:]
        diagonal = math.hypot(height, width)
        threshold_px = self.options.dynamic_threshold * min(height, width)
        means, tops, dynamic = [], [], []
        for k in range(len(gray) - 1):
            gap = float(times[k + 1] - times[k])
            magnitude = farneback_magnitude(gray[k], gray[k + 1], self.options.levels, self.options.winsize) / gap
            top = _top_mean(magnitude, self.options.top_fraction)
            means.append(float(magnitude.mean()) / diagonal)
            tops.append(top / diagonal)
            dynamic.append(float(top > threshold_px))
        return {
            "score": float(np.mean(means)),
            "top_magnitude": float(np.mean(tops)),
            "dynamic_fraction": float(np.mean(dynamic)),
        }


# --------------------------------------------------------------------------------------------------
# smoothness
# --------------------------------------------------------------------------------------------------


class SmoothnessOptions(SignalRewardOptions):
    mode: Literal["flicker", "interpolation", "both"] = Field(
        "both",
        description="flicker: 1 - mean |x_{k+1} - x_k|; interpolation: 1 - linear-interpolation error; both: mean.",
    )


def temporal_flicker(frames: np.ndarray) -> float:
    """``1 - mean_k mean_pixels |x_{k+1} - x_k|`` for frames (n, H, W, 3) in [0, 1]; n >= 2. In [0, 1]."""
    return 1.0 - float(np.abs(np.diff(frames, axis=0)).mean())


def interpolation_smoothness(frames: np.ndarray, times: np.ndarray) -> float:
    """``1 - mean_k mean_pixels |x_k - xhat_k|`` for k = 1..n-2, frames (n, H, W, 3) in [0, 1]; n >= 3.

    ``xhat_k = (b x_{k-1} + a x_{k+1}) / (a + b)`` with a = t_k - t_{k-1}, b = t_{k+1} - t_k: the
    pixel-wise linear interpolation of the neighbours (their average for evenly spaced frames).
    In [0, 1]. It is a pixel-space proxy (no motion compensation), so moving content lowers it.
    """
    t = times.astype(np.float32)
    a = (t[1:-1] - t[:-2])[:, None, None, None]
    b = (t[2:] - t[1:-1])[:, None, None, None]
    predicted = (b * frames[:-2] + a * frames[2:]) / (a + b)  # (n-2, H, W, 3)
    return 1.0 - float(np.abs(frames[1:-1] - predicted).mean())


@register_reward("smoothness")
class SmoothnessReward(SignalReward):
    r"""Temporal steadiness, in the spirit of VBench temporal flickering, on float RGB frames in [0, 1].

        temporal_flicker = 1 - mean_k mean_p |x_{k+1}(p) - x_k(p)|
        interpolation    = 1 - mean_k mean_p |x_k(p) - lerp(x_{k-1}, x_{k+1})(p)|

    ``score`` is ``temporal_flicker``, ``interpolation`` or their mean (``mode``, default both).
    Static videos score 1, smooth fades score high, frames alternating black/white score 0.
    Needs 2 sampled frames for ``flicker`` and 3 otherwise.
    """

    name: ClassVar[str] = "smoothness"
    version: ClassVar[str] = "1"
    Options: ClassVar[type[SmoothnessOptions]] = SmoothnessOptions
    options: SmoothnessOptions

    @property
    def min_frames(self) -> int:
        return 2 if self.options.mode == "flicker" else 3

    def score_video(self, batch: VideoBatch, index: int, prompt: str) -> dict[str, float]:
        times = self.frame_indices(batch.num_frames)
        frames = self.select(batch.float01[index])  # (n, h, w, 3) float32 in [0, 1]
        flicker = temporal_flicker(frames)
        interp = interpolation_smoothness(frames, times) if len(frames) >= 3 else math.nan
        score = {"flicker": flicker, "interpolation": interp, "both": 0.5 * (flicker + interp)}[self.options.mode]
        return {"score": score, "temporal_flicker": flicker, "interpolation": interp}


# --------------------------------------------------------------------------------------------------
# sharpness
# --------------------------------------------------------------------------------------------------


class SharpnessOptions(SignalRewardOptions):
    log_scale: bool = Field(True, description="score = log(1 + var) instead of the raw variance.")
    ksize: Literal[1, 3, 5] = Field(1, description="cv2.Laplacian aperture; 1 = kernel [[0,1,0],[1,-4,1],[0,1,0]].")


def laplacian_variance(gray: np.ndarray, ksize: int = 1) -> float:
    """Variance over pixels of ``cv2.Laplacian(gray, CV_64F, ksize)`` of one gray uint8 frame (H, W).

    With ksize = 1 the kernel is [[0, 1, 0], [1, -4, 1], [0, 1, 0]] on 0-255 values, border
    BORDER_REFLECT_101.
    """
    return float(cv2.Laplacian(gray, cv2.CV_64F, ksize=ksize).var())


@register_reward("sharpness")
class SharpnessReward(SignalReward):
    r"""Sharpness: variance of the Laplacian of the gray frames, averaged over the sampled frames.

        laplacian_variance = mean_k Var_p[ (Laplacian * gray_k)(p) ]     (gray in 0-255)
        score = log(1 + laplacian_variance)   (``log_scale``, default) or laplacian_variance

    Blurred frames score lower than sharp ones; a constant frame scores 0.
    """

    name: ClassVar[str] = "sharpness"
    version: ClassVar[str] = "1"
    Options: ClassVar[type[SharpnessOptions]] = SharpnessOptions
    options: SharpnessOptions

    def score_video(self, batch: VideoBatch, index: int, prompt: str) -> dict[str, float]:
        gray = self.select(batch.gray[index])  # (n, h, w) uint8
        variance = float(np.mean([laplacian_variance(frame, self.options.ksize) for frame in gray]))
        score = math.log1p(variance) if self.options.log_scale else variance
        return {"score": score, "laplacian_variance": variance}


# --------------------------------------------------------------------------------------------------
# colorfulness
# --------------------------------------------------------------------------------------------------


def hasler_susstrunk_colorfulness(frame: np.ndarray) -> float:
    """Hasler & Suesstrunk (2003) colourfulness M of one RGB frame (H, W, 3) on the 0-255 scale.

        rg = R - G,  yb = (R + G) / 2 - B
        M  = sqrt(std(rg)^2 + std(yb)^2) + 0.3 * sqrt(mean(rg)^2 + mean(yb)^2)

    Grey images give 0; the paper calls M > 59 "quite", > 82 "highly", > 109 "extremely" colourful.
    """
    rgb = frame.astype(np.float64)
    rg = rgb[..., 0] - rgb[..., 1]
    yb = 0.5 * (rgb[..., 0] + rgb[..., 1]) - rgb[..., 2]
    return float(math.hypot(rg.std(), yb.std()) + 0.3 * math.hypot(rg.mean(), yb.mean()))


@register_reward("colorfulness")
class ColorfulnessReward(SignalReward):
    r"""Hasler-Suesstrunk colourfulness averaged over the sampled frames (uint8 RGB view).

        hasler_m = mean_k M(frame_k)      (see :func:`hasler_susstrunk_colorfulness`)
        score    = hasler_m / 100          (about 1 = "highly colourful")
    """

    name: ClassVar[str] = "colorfulness"
    version: ClassVar[str] = "1"
    Options: ClassVar[type[SignalRewardOptions]] = SignalRewardOptions

    def score_video(self, batch: VideoBatch, index: int, prompt: str) -> dict[str, float]:
        frames = self.select(batch.uint8[index])  # (n, h, w, 3) uint8
        m = float(np.mean([hasler_susstrunk_colorfulness(frame) for frame in frames]))
        return {"score": m / 100.0, "hasler_m": m}


# --------------------------------------------------------------------------------------------------
# text_color_match
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColorModel:
    """How a colour word is recognised in HSV: ``kind`` "hue" (with ``hue`` in degrees and an optional
    value band ``dark``/``bright``), or an achromatic "white" / "black" / "gray"."""

    kind: Literal["hue", "white", "black", "gray"]
    hue: float = 0.0
    value_band: Literal["any", "dark", "bright"] = "any"


#: Colour word -> canonical colour name. Hue centres: red 0, orange 30, gold 50, yellow 60, green 120,
#: cyan 180, blue 240, purple 280, magenta 300, pink 330 degrees; orange and brown share hue 30 and are
#: split by value (orange bright, brown dark; see :func:`color_membership`).
COLOR_WORDS: dict[str, str] = {
    "red": "red", "crimson": "red", "scarlet": "red",
    "orange": "orange",
    "yellow": "yellow", "gold": "gold", "golden": "gold",
    "green": "green",
    "cyan": "cyan", "teal": "cyan", "turquoise": "cyan",
    "blue": "blue", "navy": "blue",
    "purple": "purple", "violet": "purple",
    "magenta": "magenta", "pink": "pink",
    "brown": "brown",
    "white": "white",
    "black": "black",
    "gray": "gray", "grey": "gray", "silver": "gray",
}  # fmt: skip
_COLOR_MODELS: dict[str, ColorModel] = {
    "red": ColorModel("hue", 0.0),
    "orange": ColorModel("hue", 30.0, "bright"),
    "gold": ColorModel("hue", 50.0),
    "yellow": ColorModel("hue", 60.0),
    "green": ColorModel("hue", 120.0),
    "cyan": ColorModel("hue", 180.0),
    "blue": ColorModel("hue", 240.0),
    "purple": ColorModel("hue", 280.0),
    "magenta": ColorModel("hue", 300.0),
    "pink": ColorModel("hue", 330.0),
    "brown": ColorModel("hue", 30.0, "dark"),
    "white": ColorModel("white"),
    "black": ColorModel("black"),
    "gray": ColorModel("gray"),
}


def parse_prompt_colors(prompt: str) -> list[str]:
    """Canonical colour names named in ``prompt`` (whole words, case-insensitive, first-seen order).

    Limitation: a word is taken literally ("an orange" the fruit counts as the colour orange).
    """
    found: list[str] = []
    for word in re.findall(r"[a-z]+", prompt.lower()):
        color = COLOR_WORDS.get(word)
        if color is not None and color not in found:
            found.append(color)
    return found


def rgb_to_hue_chroma_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """HSV-style decomposition of RGB in [0, 1] (..., 3) -> hue in degrees [0, 360), chroma
    C = max - min and value V = max (both in [0, 1]), each (...,) float32. Hue is 0 where C = 0.

    Uses ``cv2.cvtColor(COLOR_RGB2HSV)`` on float32 (hue in degrees, S = C / V), then C = S * V.
    """
    shape = rgb.shape[:-1]
    flat = np.ascontiguousarray(rgb, dtype=np.float32).reshape(-1, shape[-1] if len(shape) else 1, 3)
    hsv = cv2.cvtColor(flat, cv2.COLOR_RGB2HSV).reshape(*shape, 3)
    hue, value = hsv[..., 0], hsv[..., 2]
    return np.mod(hue, np.float32(360.0)), hsv[..., 1] * value, value


def _ramp(x: np.ndarray, zero_at: float, one_at: float) -> np.ndarray:
    """Linear ramp clipped to [0, 1]: 0 at ``zero_at``, 1 at ``one_at`` (either order)."""
    return np.clip((x - zero_at) / (one_at - zero_at), 0.0, 1.0)


def color_membership(
    hue: np.ndarray, chroma: np.ndarray, value: np.ndarray, color: str, hue_tolerance: float
) -> np.ndarray:
    """Soft membership in [0, 1] of each pixel in a canonical colour.

    - hue colours: ``max(0, 1 - d(h, h_c) / hue_tolerance) * ramp(C; 0.08 -> 0.25)`` with d the circular
      hue distance in degrees; "bright" (orange) also needs ``ramp(V; 0.55 -> 0.75)``, "dark" (brown)
      ``ramp(V; 0.75 -> 0.55)``.
    - white: ``ramp(V; 0.7 -> 0.9) * ramp(C; 0.2 -> 0.08)``;  black: ``ramp(V; 0.3 -> 0.12)``;
      gray: ``ramp(C; 0.2 -> 0.08) * ramp(V; 0.12 -> 0.3) * ramp(V; 0.9 -> 0.7)``.
    """
    model = _COLOR_MODELS[color]
    if model.kind == "white":
        return _ramp(value, 0.7, 0.9) * _ramp(chroma, 0.2, 0.08)
    if model.kind == "black":
        return _ramp(value, 0.3, 0.12)
    if model.kind == "gray":
        return _ramp(chroma, 0.2, 0.08) * _ramp(value, 0.12, 0.3) * _ramp(value, 0.9, 0.7)
    distance = np.abs(hue - model.hue) % 360.0
    distance = np.minimum(distance, 360.0 - distance)
    member = np.clip(1.0 - distance / hue_tolerance, 0.0, 1.0) * _ramp(chroma, 0.08, 0.25)
    if model.value_band == "bright":
        member = member * _ramp(value, 0.55, 0.75)
    elif model.value_band == "dark":
        member = member * _ramp(value, 0.75, 0.55)
    return member


class TextColorMatchOptions(SignalRewardOptions):
    hue_tolerance_deg: float = Field(30.0, gt=0, le=90, description="Hue distance at which membership reaches 0.")
    coverage_target: float = Field(
        0.1, gt=0, le=1, description="A colour counts as fully present once it covers this fraction of pixels."
    )
    neutral_score: float = Field(0.5, ge=0, le=1, description="Score of prompts that name no colour.")


@register_reward("text_color_match")
class TextColorMatchReward(SignalReward):
    r"""Text alignment without a model: are the colours named in the prompt present in the video?

    For the canonical colours c_1..c_K parsed from the prompt (:func:`parse_prompt_colors`) and the
    soft pixel membership m_c(p) of :func:`color_membership` over all sampled frames' pixels:

        coverage_c = mean_p m_c(p)
        score      = mean_c min(1, coverage_c / coverage_target)
        details:   has_color = 1, num_colors = K, coverage = mean_c coverage_c

    A prompt naming no colour scores ``neutral_score`` (0.5) with ``has_color = 0``, ``num_colors = 0``,
    ``coverage = 0``; not NaN, so such samples stay in training. All samples of a prompt group share
    the prompt, so the neutral value is constant within a group and carries no advantage.
    The coverage target (10 %) rewards each named colour being visible rather than painting the
    whole frame one colour.
    """

    name: ClassVar[str] = "text_color_match"
    version: ClassVar[str] = "1"
    Options: ClassVar[type[TextColorMatchOptions]] = TextColorMatchOptions
    options: TextColorMatchOptions

    def score_video(self, batch: VideoBatch, index: int, prompt: str) -> dict[str, float]:
        colors = parse_prompt_colors(prompt)
        if not colors:
            return {"score": self.options.neutral_score, "has_color": 0.0, "num_colors": 0.0, "coverage": 0.0}
        frames = self.select(batch.float01[index])  # (n, h, w, 3) float32 in [0, 1]
        hue, chroma, value = rgb_to_hue_chroma_value(frames)  # each (n, h, w)
        coverages = [
            float(color_membership(hue, chroma, value, c, self.options.hue_tolerance_deg).mean()) for c in colors
        ]
        presence = [min(1.0, cov / self.options.coverage_target) for cov in coverages]
        return {
            "score": float(np.mean(presence)),
            "has_color": 1.0,
            "num_colors": float(len(colors)),
            "coverage": float(np.mean(coverages)),
        }
