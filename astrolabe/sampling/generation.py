"""Streaming text-to-video generation: scene prompts -> blocks -> streaming VAE decode -> mp4.

Nothing of the video is held in memory beyond the KV cache window and one decoded block: clean
blocks are decoded as they are produced (the VAE's streaming decoder carries its own cache) and
written straight into the mp4 writer. With ``stream.kv_cache == "recompute"`` (Krea's served loop) the
decoder is a :class:`~astrolabe.sampling.recompute.VaeFirstFrameReencoder`, which the sampler also uses to
re-encode the first latent frame from the decoded pixels.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from astrolabe.data.video import DEFAULT_CRF, StreamingMp4Writer, to_uint8_frames
from astrolabe.models.wan.dit import WanDiT
from astrolabe.models.wan.vae import StreamingDecoder, WanVAE
from astrolabe.sampling.scenes import (
    ScenePlanError,
    SceneSegment,
    parse_scene_prompt,
    pixel_frames_for_latent,
    plan_scenes,
    required_blocks,
)
from astrolabe.sampling.recompute import VaeFirstFrameReencoder
from astrolabe.sampling.streaming import BlockStreamer, SampleNoise, StreamConfig

log = logging.getLogger(__name__)


@dataclass
class GenerationStack:
    """The modules and derived sizes one generation needs."""

    dit: WanDiT
    vae: WanVAE
    encode_text: Callable[[list[str]], torch.Tensor]  # prompts -> (B, text_len, text_dim)
    stream: StreamConfig
    fps: int
    device: torch.device


@dataclass(frozen=True)
class GenerationResult:
    prompt: str
    seed: int
    path: Path
    num_latent_frames: int
    num_pixel_frames: int
    segments: tuple[SceneSegment, ...]
    seconds: float


def blocks_for(num_latent_frames: int, block_frames: int) -> int:
    if num_latent_frames % block_frames:
        raise ValueError(
            f"{num_latent_frames} latent frames is not a multiple of the model's {block_frames} frames per block"
        )
    return num_latent_frames // block_frames


def latent_frames_for_pixels(num_pixel_frames: int, block_frames: int) -> int:
    """Pixel frames (1 + 4k) -> latent frames, rounded up to whole blocks."""
    if num_pixel_frames < 1 or (num_pixel_frames - 1) % 4:
        raise ValueError(f"--num-frames must be of the form 1 + 4k (e.g. 81), got {num_pixel_frames}")
    latent = 1 + (num_pixel_frames - 1) // 4
    return -(-latent // block_frames) * block_frames


@dataclass(frozen=True)
class VideoPlan:
    """The length and scene plan of one prompt line, checked before anything is generated."""

    prompt: str
    num_latent_frames: int
    segments: tuple[SceneSegment, ...]


def plan_video(
    prompt_line: str, fps: float, block_frames: int, requested_latent: int | None, default_latent: int
) -> VideoPlan:
    """Parse and plan one line. Without a requested length the video is the model's default length grown to
    hold every scene; a requested length that is too short raises :class:`ScenePlanError` (with the
    ``--num-frames`` that fits)."""
    scenes = parse_scene_prompt(prompt_line)
    if requested_latent is None:
        latent = max(default_latent, required_blocks(scenes, fps, block_frames) * block_frames)
    else:
        latent = requested_latent
    segments = plan_scenes(scenes, blocks_for(latent, block_frames), fps, block_frames)
    return VideoPlan(prompt_line, latent, tuple(segments))


def check_plans(
    prompts: list[str], fps: float, block_frames: int, requested_latent: int | None, default_latent: int
) -> list[VideoPlan]:
    """:func:`plan_video` for every line; one error naming every line that does not fit and the ``--num-frames``
    that fits them all."""
    plans, errors, need = [], [], 0
    for i, p in enumerate(prompts, start=1):
        try:
            plans.append(plan_video(p, fps, block_frames, requested_latent, default_latent))
        except ScenePlanError as e:
            errors.append(f"  prompt {i}: {e}")
            need = max(need, e.blocks_needed)
    if errors:
        fits = pixel_frames_for_latent(need * block_frames)
        raise ValueError(
            f"{len(errors)} of {len(prompts)} prompt(s) do not fit in the video (nothing was generated):\n"
            + "\n".join(errors[:10]) + ("\n  ..." if len(errors) > 10 else "")
            + f"\n--num-frames {fits} fits every prompt (or leave --num-frames out: each video then grows to fit)"
        )
    return plans


def warn_tiny_text(plans: list[VideoPlan]) -> None:
    """Log, once per run, that the tiny model's text encoder reads only the first 15 bytes of every scene."""
    from astrolabe.models.wan.text_encoder import TINY_PROMPT_BYTES, clean_prompt, tiny_visible_text

    long = [seg.prompt for plan in plans for seg in plan.segments if tiny_visible_text(seg.prompt) != clean_prompt(seg.prompt)]
    if long:
        log.warning(
            "the tiny model's text encoder reads only the first %d bytes of a prompt (text_len 16 incl. EOS): %d scene "
            "prompt(s) are truncated, e.g. %r is read as %r; scenes sharing those bytes look identical to it",
            TINY_PROMPT_BYTES, len(long), long[0], tiny_visible_text(long[0]),
        )


@torch.no_grad()
def generate_video(
    stack: GenerationStack,
    prompt_line: str,
    seed: int,
    num_latent_frames: int,
    out_path: Path,
    on_block: Callable[[int, int], None] | None = None,
    num_pixel_frames: int | None = None,
    crf: int = DEFAULT_CRF,
) -> GenerationResult:
    """Generate one (scene) prompt into ``out_path`` (mp4), decoding and writing block by block.

    ``num_pixel_frames`` trims the written video when the request is not a whole number of blocks
    (generation always runs whole blocks).
    """
    start = time.perf_counter()
    scenes = parse_scene_prompt(prompt_line)
    num_blocks = blocks_for(num_latent_frames, stack.stream.block_frames)
    segments = plan_scenes(scenes, num_blocks, stack.fps, stack.stream.block_frames)
    contexts = [stack.encode_text([seg.prompt]).to(stack.device) for seg in segments]
    reencoder = None
    if stack.stream.kv_cache == "recompute":
        reencoder = VaeFirstFrameReencoder(stack.vae, stack.stream.recompute_frames)
    decoder = reencoder if reencoder is not None else StreamingDecoder(stack.vae)
    streamer = BlockStreamer(
        stack.dit, stack.stream, contexts[0], SampleNoise([seed], stack.device), reencoder=reencoder
    )
    frames_written = 0
    with StreamingMp4Writer(out_path, fps=stack.fps, crf=crf) as writer:
        for seg_idx, seg in enumerate(segments):
            if seg_idx > 0:
                streamer.switch_prompt(contexts[seg_idx], hard=seg.hard_cut_before)
            for b in range(seg.start_block, seg.end_block):
                x0 = streamer.step()  # (1, f, C, h, w)
                pixels = decoder.decode_block(x0.permute(0, 2, 1, 3, 4).to(stack.vae.dtype))  # (1, 3, n, H, W)
                chunk = to_uint8_frames(pixels[0].permute(1, 0, 2, 3), value_range=(-1.0, 1.0))  # (n, H, W, 3)
                if num_pixel_frames is not None:
                    chunk = chunk[: max(0, num_pixel_frames - frames_written)]
                if len(chunk):
                    writer.write(chunk)
                frames_written += chunk.shape[0]
                if on_block is not None:
                    on_block(b + 1, num_blocks)
    return GenerationResult(
        prompt=prompt_line,
        seed=seed,
        path=out_path,
        num_latent_frames=num_latent_frames,
        num_pixel_frames=frames_written,
        segments=tuple(segments),
        seconds=time.perf_counter() - start,
    )
