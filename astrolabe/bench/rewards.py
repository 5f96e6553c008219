"""Reward throughput (videos per second, single process): the weight-free rewards on synthetic videos
(``astrolabe bench rewards``) and model rewards on checkpoints the caller names.

Nothing here writes checkpoints: random-weight fakes in the real layouts live in ``tests/fakes``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import numpy as np

from astrolabe.rewards import RewardSpec, VideoBatch, build_reward, score_all

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


def benchmark_model_rewards(
    reward_options: Mapping[str, Mapping[str, Any]], num_videos: int = 4, frames: int = 9, height: int = 60,
    width: int = 104, device: str = "cpu", repeats: int = 2, seed: int = 0,
) -> dict[str, float]:
    """Videos/s of each model reward ``name -> options`` (options name the local checkpoint directories).

    Measures the real code path (file loading once in a warm-up call, then ``repeats`` timed scoring calls)
    on random uint8 videos (N, F, H, W, 3). Returns reward name -> videos per second.
    """
    rng = np.random.default_rng(seed)
    videos = rng.integers(0, 256, (num_videos, frames, height, width, 3), dtype=np.uint8)
    prompts = [f"prompt {i}" for i in range(num_videos)]
    results = {}
    for name, options in reward_options.items():
        reward = build_reward(RewardSpec(name=name, options={**options, "device": device}))
        reward(videos, prompts)  # warm-up + model load
        start = time.perf_counter()
        for _ in range(repeats):
            reward(videos, prompts)
        results[name] = repeats * num_videos / (time.perf_counter() - start)
    logger.info("model reward throughput (videos/s, %dx%dx%d): %s", frames, height, width, results)
    return results
