"""Weight-free rewards on constructed videos whose answer is known by hand."""

from __future__ import annotations

import colorsys
import math

import cv2
import numpy as np
import pytest

from astrolabe.rewards import RewardSpec, build_reward, score_all
from astrolabe.bench.rewards import SIGNAL_REWARDS, benchmark_signal_rewards
from astrolabe.rewards.signal import (
    color_membership,
    hasler_susstrunk_colorfulness,
    laplacian_variance,
    parse_prompt_colors,
    rgb_to_hue_chroma_value,
)

H = W = 32


def reward(name: str, **options):
    return build_reward(RewardSpec(name=name, options=options))


def gray_to_rgb(frames: np.ndarray) -> np.ndarray:
    """(F, H, W) -> (1, F, H, W, 3)."""
    return np.repeat(frames[..., None], 3, axis=-1)[None]


def smooth_texture(seed: int = 0, size: int = 64, sigma: float = 2.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    tex = cv2.GaussianBlur(rng.random((size, size)).astype(np.float32), (0, 0), sigma)
    return (tex - tex.min()) / (tex.max() - tex.min())  # (size, size) in [0, 1]


def square_video(frames: int, velocity: int, size: int = 32, side: int = 8) -> np.ndarray:
    """White square on black, moving right by ``velocity`` px per frame: (1, F, H, W, 3) uint8."""
    video = np.zeros((frames, size, size), dtype=np.uint8)
    for t in range(frames):
        x = 4 + velocity * t
        video[t, 12 : 12 + side, x : x + side] = 255
    return gray_to_rgb(video)


# ------------------------------------------------------------------------------------------ motion


def test_motion_static_square_is_zero_and_moving_square_is_dynamic():
    motion = reward("motion")
    static = motion(square_video(6, 0), ["x"])
    moving = motion(square_video(6, 3), ["x"])
    assert static.scores[0] == pytest.approx(0.0, abs=1e-6)
    assert static.details["dynamic_fraction"][0] == 0.0
    assert moving.scores[0] > 1e-3
    assert moving.details["dynamic_fraction"][0] == 1.0
    assert moving.details["top_magnitude"][0] > moving.scores[0]  # top 5% moves more than the average


@pytest.mark.parametrize(("dx", "dy"), [(1, 0), (2, 1), (3, 0)])
def test_motion_global_translation_matches_displacement(dx, dy):
    """A periodic texture rolled by (dx, dy) px/frame moves sqrt(dx^2 + dy^2) px at every pixel."""
    tex = smooth_texture()
    frames = np.stack([np.roll(tex, (t * dy, t * dx), axis=(0, 1)) for t in range(6)])
    video = gray_to_rgb(frames)  # float32 in [0, 1]
    diagonal = math.hypot(64, 64)
    expected = math.hypot(dx, dy) / diagonal
    assert reward("motion")(video, ["x"]).scores[0] == pytest.approx(expected, rel=0.05)
    # Stride 2 doubles the displacement per pair; the score is per frame, so it stays the same.
    assert reward("motion", frame_stride=2)(video, ["x"]).scores[0] == pytest.approx(expected, rel=0.05)
    # Dynamic iff the per-frame motion exceeds 6/256 * 64 = 1.5 px.
    dynamic = reward("motion")(video, ["x"]).details["dynamic_fraction"][0]
    assert dynamic == (1.0 if math.hypot(dx, dy) > 1.5 else 0.0)


# ------------------------------------------------------------------------------------------ smoothness


def test_smoothness_steady_flicker_and_fade():
    smooth = reward("smoothness")
    steady = np.full((1, 5, H, W, 3), 0.3, dtype=np.float32)
    flicker = np.zeros((1, 5, H, W, 3), dtype=np.float32)
    flicker[:, 1::2] = 1.0  # black / white / black ...
    fade = np.broadcast_to(np.linspace(0, 1, 5, dtype=np.float32)[None, :, None, None, None], (1, 5, H, W, 3))
    out = smooth(np.concatenate([steady, flicker, fade]), ["a", "b", "c"])
    np.testing.assert_allclose(out.details["temporal_flicker"], [1.0, 0.0, 0.75], atol=1e-6)
    np.testing.assert_allclose(out.details["interpolation"], [1.0, 0.0, 1.0], atol=1e-6)
    np.testing.assert_allclose(out.scores, [1.0, 0.0, 0.875], atol=1e-6)


def test_smoothness_matches_reference_loop_and_uneven_sampling():
    rng = np.random.default_rng(3)
    video = rng.random((1, 6, 8, 8, 3)).astype(np.float32)
    x = video[0].astype(np.float64)
    flicker = 1 - np.mean([np.abs(x[k + 1] - x[k]).mean() for k in range(5)])
    interp = 1 - np.mean([np.abs(x[k] - 0.5 * (x[k - 1] + x[k + 1])).mean() for k in range(1, 5)])
    out = reward("smoothness")(video, ["x"])
    assert out.details["temporal_flicker"][0] == pytest.approx(flicker, abs=1e-6)
    assert out.details["interpolation"][0] == pytest.approx(interp, abs=1e-6)
    # max_frames=4 of 10 frames picks 0, 3, 6, 9 ... of a fade over 11 frames: uneven gaps
    # elsewhere still interpolate a linear fade exactly.
    fade = np.broadcast_to(np.linspace(0, 1, 11, dtype=np.float32)[None, :, None, None, None], (1, 11, 4, 4, 3))
    out = reward("smoothness", max_frames=4)(np.ascontiguousarray(fade), ["x"])  # frames 0, 3, 7, 10
    assert out.details["interpolation"][0] == pytest.approx(1.0, abs=1e-6)


def test_smoothness_flicker_mode_needs_two_frames_others_three():
    two = np.zeros((1, 2, 4, 4, 3), dtype=np.uint8)
    assert reward("smoothness", mode="flicker")(two, ["x"]).scores[0] == 1.0
    with pytest.raises(ValueError, match="at least 3 frames"):
        reward("smoothness")(two, ["x"])


def test_motion_vs_smoothness_conflict():
    videos = np.concatenate([square_video(6, 0), square_video(6, 3)])
    out = score_all([reward("motion"), reward("smoothness")], videos, ["a", "b"])
    assert out["motion"].scores[1] > out["motion"].scores[0]
    assert out["smoothness"].scores[1] < out["smoothness"].scores[0]


# ------------------------------------------------------------------------------------------ sharpness


def laplacian_reference(gray: np.ndarray) -> np.ndarray:
    """[[0,1,0],[1,-4,1],[0,1,0]] with BORDER_REFLECT_101 (= numpy 'reflect'), in float64."""
    p = np.pad(gray.astype(np.float64), 1, mode="reflect")
    return p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * p[1:-1, 1:-1]


def test_sharpness_sharp_beats_blurred_and_matches_reference():
    yy, xx = np.mgrid[:H, :W]
    checker = (((yy // 4) + (xx // 4)) % 2 * 255).astype(np.uint8)
    blurred = cv2.GaussianBlur(checker, (0, 0), 2.0)
    video = np.stack([gray_to_rgb(np.stack([checker] * 3))[0], gray_to_rgb(np.stack([blurred] * 3))[0]])
    out = reward("sharpness")(video, ["a", "b"])
    assert out.scores[0] > out.scores[1]
    expected = laplacian_reference(checker).var()
    assert out.details["laplacian_variance"][0] == pytest.approx(expected, rel=1e-5)
    assert out.scores[0] == pytest.approx(math.log1p(expected), rel=1e-6)
    assert laplacian_variance(np.full((8, 8), 7, np.uint8)) == 0.0
    raw = reward("sharpness", log_scale=False)(video, ["a", "b"])
    np.testing.assert_allclose(raw.scores, out.details["laplacian_variance"], rtol=1e-6)


# ------------------------------------------------------------------------------------------ colorfulness


def test_colorfulness_grey_is_zero_and_pure_red_matches_hand_value():
    grey = np.full((1, 2, H, W, 3), 128, dtype=np.uint8)
    red = np.zeros((1, 2, H, W, 3), dtype=np.uint8)
    red[..., 0] = 255
    out = reward("colorfulness")(np.concatenate([grey, red]), ["a", "b"])
    # Pure red: rg = 255, yb = 127.5, no spread -> M = 0.3 * sqrt(255^2 + 127.5^2).
    expected_m = 0.3 * math.hypot(255.0, 127.5)
    np.testing.assert_allclose(out.details["hasler_m"], [0.0, expected_m], rtol=1e-6)
    np.testing.assert_allclose(out.scores, [0.0, expected_m / 100], rtol=1e-6)


def test_colorfulness_half_red_half_green_hand_value():
    frame = np.zeros((4, 4, 3), dtype=np.uint8)
    frame[:2, :, 0] = 255  # red top
    frame[2:, :, 1] = 255  # green bottom
    # rg = +-255 (mean 0, std 255), yb = 127.5 everywhere (std 0) -> M = 255 + 0.3 * 127.5.
    assert hasler_susstrunk_colorfulness(frame) == pytest.approx(255 + 0.3 * 127.5)


# ------------------------------------------------------------------------------------------ text colour


def solid(rgb, frames: int = 2) -> np.ndarray:
    video = np.zeros((1, frames, H, W, 3), dtype=np.uint8)
    video[...] = np.array(rgb, dtype=np.uint8)
    return video


def test_text_color_match_red_vs_blue_and_neutral():
    match = reward("text_color_match")
    videos = np.concatenate([solid((230, 20, 20)), solid((20, 20, 230)), solid((230, 20, 20))])
    out = match(videos, ["a red ball", "a red ball", "a ball on a table"])
    np.testing.assert_allclose(out.scores, [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(out.details["has_color"], [1.0, 1.0, 0.0])
    np.testing.assert_array_equal(out.details["num_colors"], [1.0, 1.0, 0.0])


def test_text_color_match_multiple_colours_and_coverage_target():
    match = reward("text_color_match")
    half = solid((255, 0, 0))
    half[:, :, H // 2 :] = (0, 0, 255)
    small = solid((0, 0, 0))
    small[:, :, :8, :8] = (255, 0, 0)  # 64 / 1024 = 6.25 % red
    out = match(np.concatenate([half, solid((255, 0, 0)), small]), ["a red and blue flag"] * 2 + ["a red ball"])
    # both colours present (50 % each >= 10 %) -> 1; only red -> (1 + 0) / 2; 6.25 % red -> 0.625
    np.testing.assert_allclose(out.scores, [1.0, 0.5, 0.625], atol=1e-6)
    np.testing.assert_allclose(out.details["coverage"], [0.5, 0.5, 0.0625], atol=1e-6)


def test_parse_prompt_colors_and_membership():
    assert parse_prompt_colors("A Grey cat, a GREY dog and a golden sun; redder") == ["gray", "gold"]
    assert parse_prompt_colors("no colours here") == []
    pixels = np.array([[255, 140, 0], [120, 60, 20], [250, 250, 250], [10, 10, 10], [128, 128, 128]]) / 255.0
    hue, chroma, value = rgb_to_hue_chroma_value(pixels.astype(np.float32))
    member = {c: color_membership(hue, chroma, value, c, 30.0) for c in ("orange", "brown", "white", "black", "gray")}
    # orange pixel: hue = 60 * 140/255 = 32.94 deg, bright; brown pixel: hue = 60 * 40/100 = 24 deg, V = 0.47.
    np.testing.assert_allclose(member["orange"], [1 - (60 * 140 / 255 - 30) / 30, 0, 0, 0, 0], atol=1e-4)
    np.testing.assert_allclose(member["brown"], [0, 1 - 6 / 30, 0, 0, 0], atol=1e-4)
    np.testing.assert_allclose(member["white"], [0, 0, 1, 0, 0])
    np.testing.assert_allclose(member["black"], [0, 0, 0, 1, 0])
    np.testing.assert_allclose(member["gray"], [0, 0, 0, 0, 1])


def test_hue_chroma_value_matches_colorsys():
    rgb = np.random.default_rng(0).random((50, 3)).astype(np.float32)
    hue, chroma, value = rgb_to_hue_chroma_value(rgb)
    ref = np.array([colorsys.rgb_to_hsv(*p) for p in rgb.astype(np.float64)])
    dh = np.abs(hue - 360 * ref[:, 0])
    assert np.minimum(dh, 360 - dh).max() < 1e-2
    np.testing.assert_allclose(chroma, ref[:, 1] * ref[:, 2], atol=1e-5)
    np.testing.assert_allclose(value, ref[:, 2], atol=1e-6)


# ------------------------------------------------------------------------------------------ all rewards


def test_every_signal_reward_is_deterministic_and_dtype_invariant():
    rng = np.random.default_rng(1)
    videos = rng.integers(0, 256, size=(3, 4, 16, 16, 3), dtype=np.uint8)
    prompts = ["a red car", "green grass", "a cat"]
    rewards = [reward(name) for name in SIGNAL_REWARDS]
    first = score_all(rewards, videos, prompts, batch_size=2)
    again = score_all(rewards, videos, prompts, batch_size=3)
    as_float = score_all(rewards, videos.astype(np.float32) / 255.0, prompts)
    for name in SIGNAL_REWARDS:
        np.testing.assert_array_equal(first[name].scores, again[name].scores)
        np.testing.assert_allclose(first[name].scores, as_float[name].scores, rtol=1e-5, atol=1e-6)
        assert first[name].scores.dtype == np.float32 and first[name].num_nan == 0


def test_frame_sampling_and_downscale_options():
    video = square_video(9, 2, size=32)
    full = reward("sharpness", log_scale=False)
    small = reward("sharpness", log_scale=False, max_side=16, max_frames=3)
    assert small.identity()["resolution"] == {"max_side": 16}
    assert small.identity()["frame_sampling"] == {"stride": 1, "max_frames": 3}
    frames = small.select(video[0, :, :, :, 0])
    assert frames.shape == (3, 16, 16)
    resized = [cv2.resize(video[0, t, :, :, 0], (16, 16), interpolation=cv2.INTER_AREA) for t in (0, 4, 8)]
    expected = np.mean([laplacian_variance(frame) for frame in resized])
    assert small(video, ["x"]).scores[0] == pytest.approx(expected, rel=1e-6)
    assert full(video, ["x"]).scores[0] != pytest.approx(expected, rel=1e-3)


def test_unknown_or_invalid_option_is_an_error():
    with pytest.raises(ValueError, match="allowed options"):
        reward("motion", treshold=1.0)
    with pytest.raises(ValueError, match="frame_stride"):
        reward("sharpness", frame_stride=0)


def test_benchmark_returns_positive_rates():
    rates = benchmark_signal_rewards(num_videos=2, frames=4, height=16, width=16, seed=0)
    assert set(rates) == set(SIGNAL_REWARDS) | {"all"}
    assert all(rate > 0 for rate in rates.values())
