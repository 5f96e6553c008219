"""Throughput of the weight-free rewards on synthetic videos (videos per second, single process)."""

from __future__ import annotations

import logging
import time

import numpy as np

from astrolabe.rewards.base import RewardSpec, VideoBatch, build_reward, score_all

logger = logging.getLogger(__name__)

SIGNAL_REWARDS = ("motion", "smoothness", "sharpness", "colorfulness", "text_color_match")


def synthetic_videos(num_videos: int, frames: int, height: int, width: int, seed: int) -> np.ndarray:
    """Moving smooth colour noise: uint8 (N, F, H, W, 3); each video drifts by a random 0-3 px/frame."""
    rng = np.random.default_rng(seed)
    base = rng.random((num_videos, height // 4 + 1, width // 4 + 1, 3))
    base = np.repeat(np.repeat(base, 4, axis=1), 4, axis=2)[:, :height, :width]  # (N, H, W, 3) blocky texture
    velocity = rng.integers(0, 4, size=(num_videos, 2))
    videos = np.empty((num_videos, frames, height, width, 3), dtype=np.uint8)
    for n in range(num_videos):
        for t in range(frames):
            shifted = np.roll(base[n], (t * velocity[n, 0], t * velocity[n, 1]), axis=(0, 1))
            videos[n, t] = np.rint(shifted * 255).astype(np.uint8)
    return videos


def benchmark_signal_rewards(
    num_videos: int = 32, frames: int = 16, height: int = 64, width: int = 64, seed: int = 0, batch_size: int = 8
) -> dict[str, float]:
    """Videos per second of each weight-free reward (default options) and of all of them together.

    Each reward is timed alone on fresh :class:`VideoBatch` views (so the view conversion is included);
    ``"all"`` times :func:`score_all` with every reward sharing the views.
    """
    videos = synthetic_videos(num_videos, frames, height, width, seed)
    prompts = ["a red ball bouncing on green grass"] * num_videos
    rewards = [build_reward(RewardSpec(name=name)) for name in SIGNAL_REWARDS]
    results: dict[str, float] = {}
    for reward in rewards:
        start = time.perf_counter()
        for s in range(0, num_videos, batch_size):
            reward.score(VideoBatch(videos[s : s + batch_size]), prompts[s : s + batch_size])
        results[reward.name] = num_videos / (time.perf_counter() - start)
    start = time.perf_counter()
    score_all(rewards, videos, prompts, batch_size=batch_size)
    results["all"] = num_videos / (time.perf_counter() - start)
    logger.info("signal reward throughput (videos/s, %dx%dx%d): %s", frames, height, width, results)
    return results
