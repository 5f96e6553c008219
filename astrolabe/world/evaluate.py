"""How well a world model follows captions: per-attribute accuracy of the detector on its generations.

:func:`generation_accuracy` samples each caption with the 4-step block-AR streaming sampler (one seed per
video), decodes with the preview decoder, and compares the detector's reading
(:func:`~astrolabe.world.detector.classify`) with the caption: the share of videos whose colour, shape,
direction, speed (moving captions only) and background are right, plus ``detected`` (an object found) and
``all`` (every attribute right). Chance: colour 1/6, shape 1/3, direction 1/5, speed 1/2, background 1/6.
:func:`roundtrip_accuracy` is the same measure on rendered ground truth passed through the latents
(:func:`~astrolabe.world.pretrain.world_latents`, then the decoder): the ceiling the latent space allows.

:func:`caption_variety` samples every caption with several seeds and measures what a group of one caption
(GRPO / NFT advantages are relative to the group) gives RL to rank (:func:`variety_summary`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

from astrolabe.models.wan.vae_preview import preview_video
from astrolabe.models.wan.dit import WanDiT
from astrolabe.sampling.streaming import BlockStreamer, SampleNoise, StreamConfig, generate_blocks
from astrolabe.world.detector import classify, detect_clip
from astrolabe.world.grammar import WorldCaption, heldout_captions
from astrolabe.world.pretrain import WorldModel, WorldModelRecipe, world_latents
from astrolabe.world.render import WorldConfig, render
from astrolabe.world.rewards import alignment_terms

__all__ = [
    "ATTRIBUTES",
    "attribute_accuracy",
    "caption_variety",
    "decode_latents",
    "generate_latents",
    "generate_videos",
    "generation_accuracy",
    "roundtrip_accuracy",
    "variety_summary",
    "world_stream_config",
]

ATTRIBUTES = ("color", "shape", "direction", "speed", "background")


def world_stream_config() -> StreamConfig:
    """The sampler sizes of the registry's ``world`` base model (4 warped steps, 3-frame blocks, 8x8 latents)."""
    from astrolabe.build import stream_config
    from astrolabe.config import ModelConfig
    from astrolabe.models.registry import get_base_model

    return stream_config(ModelConfig(base="world"), get_base_model("world"))


@torch.no_grad()
def generate_latents(
    dit: WanDiT, context: torch.Tensor, stream: StreamConfig, seeds: Sequence[int], num_blocks: int
) -> torch.Tensor:
    """Streamed clean latents (B, num_blocks * f, C, h, w) for text features ``context`` (B, L, text_dim)."""
    streamer = BlockStreamer(dit, stream, context, SampleNoise(seeds))
    return torch.cat(list(generate_blocks(streamer, num_blocks)), dim=1)


def decode_latents(latents: torch.Tensor) -> np.ndarray:
    """DiT latents (B, F, C, h, w) -> frames (B, T, H, W, 3) float32 in [0, 1] (the preview decoder)."""
    pixels = preview_video(latents.permute(0, 2, 1, 3, 4).float())  # (B, 3, T, H, W)
    return ((pixels.permute(0, 2, 3, 4, 1) + 1.0) / 2.0).numpy().astype(np.float32)


def attribute_accuracy(
    videos: np.ndarray, captions: Sequence[WorldCaption], config: WorldConfig
) -> dict[str, float]:
    """Share of videos (B, T, H, W, 3) whose detected attributes match their caption's (module docstring)."""
    hits = {name: [] for name in (*ATTRIBUTES, "detected", "all")}
    times = np.arange(videos.shape[1]) / config.fps
    for video, caption in zip(videos, captions, strict=True):
        found = classify(detect_clip(video, times), config)
        right = {name: found is not None and getattr(found, name) == getattr(caption, name) for name in ATTRIBUTES}
        for name in ATTRIBUTES:
            if name != "speed" or caption.speed is not None:
                hits[name].append(right[name])
        hits["detected"].append(found is not None)
        hits["all"].append(all(right[n] for n in caption.named))
    return {name: float(np.mean(v)) if v else float("nan") for name, v in hits.items()}


def _captions(captions: Sequence[WorldCaption] | None, count: int) -> list[WorldCaption]:
    return list(heldout_captions() if captions is None else captions)[:count]


def generate_videos(
    model: WorldModel,
    captions: Sequence[WorldCaption],  # (N,)
    seeds: Sequence[int],  # (N,): the noise seed of each video
    stream: StreamConfig | None = None,
    config: WorldConfig = WorldModelRecipe().world,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Decoded frames (N, T, H, W, 3) in [0, 1] of the 4-step streaming sampler, ``batch_size`` videos at a time;
    ``progress(done, total)`` after each batch."""
    stream = world_stream_config() if stream is None else stream
    latent_frames = 1 + (config.num_frames - 1) // 4
    videos = []
    for start in range(0, len(captions), batch_size):
        context = model.text.encode([c.text for c in captions[start : start + batch_size]])
        latents = generate_latents(model.dit, context, stream, list(seeds[start : start + batch_size]),
                                   latent_frames // stream.block_frames)  # fmt: skip
        videos.append(decode_latents(latents))
        if progress is not None:
            progress(min(start + batch_size, len(captions)), len(captions))
    return np.concatenate(videos)


def generation_accuracy(
    model: WorldModel,
    captions: Sequence[WorldCaption] | None = None,
    count: int = 64,
    seed: int = 0,
    stream: StreamConfig | None = None,
    config: WorldConfig = WorldModelRecipe().world,
    batch_size: int = 32,
) -> dict[str, float]:
    """:func:`attribute_accuracy` of one generation per caption (the first ``count`` held-out captions by
    default), video ``i`` sampled with seed ``seed + i``."""
    chosen = _captions(captions, count)
    seeds = [seed + i for i in range(len(chosen))]
    return attribute_accuracy(generate_videos(model, chosen, seeds, stream, config, batch_size), chosen, config)


def roundtrip_accuracy(
    captions: Sequence[WorldCaption] | None = None,
    count: int = 64,
    seed: int = 0,
    config: WorldConfig = WorldModelRecipe().world,
) -> dict[str, float]:
    """:func:`attribute_accuracy` of rendered ground truth after latents -> preview decoder."""
    chosen = _captions(captions, count)
    rng = np.random.default_rng(seed)
    frames = torch.stack([render(c, rng, config).frames for c in chosen])  # (B, T, 3, H, W)
    return attribute_accuracy(decode_latents(world_latents(frames)), chosen, config)


def variety_summary(
    readings: Sequence[Sequence[WorldCaption | None]],  # (C, S): the detector's reading of seed s of caption c
    scores: np.ndarray,  # (C, S): world_alignment of the same videos
    captions: Sequence[WorldCaption],  # (C,)
) -> dict[str, float]:
    """What groups of one caption give RL to rank.

    Per attribute ``a`` (over the captions that name it): ``right/a`` the share of videos whose reading is the
    caption's, ``unanimous/a`` the share of captions whose ``S`` readings are all equal (1 = every group of that
    caption agrees on ``a``: nothing to rank on it). With ``A[c, s]`` the alignment scores:

        alignment/within_std  = mean_c std_s A[c, s]      (what one group can rank)
        alignment/between_std = std_c mean_s A[c, s]      (how much the captions differ)
        alignment/within_share = within_std / (within_std + between_std)
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.shape != (len(captions), len(readings[0]) if readings else 0) or len(readings) != len(captions):
        raise ValueError(f"readings {len(readings)} x ?, scores {scores.shape} and {len(captions)} captions disagree")
    out: dict[str, float] = {}
    for name in ATTRIBUTES:
        named = [(c, row) for c, row in zip(captions, readings, strict=True) if getattr(c, name) is not None]
        if not named:
            continue
        values = [[None if r is None else getattr(r, name) for r in row] for _, row in named]
        right = [[v == getattr(c, name) for v in vs] for (c, _), vs in zip(named, values, strict=True)]
        out[f"right/{name}"] = float(np.mean(right))
        out[f"unanimous/{name}"] = float(np.mean([len(set(vs)) == 1 for vs in values]))
    within, between = float(scores.std(axis=1).mean()), float(scores.mean(axis=1).std())
    out |= {"alignment/mean": float(scores.mean()), "alignment/within_std": within, "alignment/between_std": between,
            "alignment/within_share": within / (within + between) if within + between > 0 else float("nan")}
    return out


def caption_variety(
    model: WorldModel,
    captions: Sequence[WorldCaption] | None = None,
    count: int = 16,
    seeds: int = 8,
    seed: int = 0,
    stream: StreamConfig | None = None,
    config: WorldConfig = WorldModelRecipe().world,
    batch_size: int = 32,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """:func:`variety_summary` of ``seeds`` generations of each of the first ``count`` captions (held-out by
    default); seed ``k`` of caption ``c`` is ``seed + c * seeds + k``. ``progress(done, total)`` after each batch."""
    chosen = _captions(captions, count)
    jobs = [(c, k) for c in range(len(chosen)) for k in range(seeds)]
    videos = generate_videos(model, [chosen[c] for c, _ in jobs], [seed + c * seeds + k for c, k in jobs], stream,
                             config, batch_size, progress)  # fmt: skip
    times = np.arange(config.num_frames) / config.fps
    readings: list[list[WorldCaption | None]] = [[] for _ in chosen]
    scores = np.zeros((len(chosen), seeds))
    for (c, k), video in zip(jobs, videos, strict=True):
        detection = detect_clip(video, times)
        readings[c].append(classify(detection, config))
        scores[c, k] = alignment_terms(detection, chosen[c], config)["score"]
    return variety_summary(readings, scores, chosen)
