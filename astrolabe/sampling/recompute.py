"""Krea's served sampling loop: KV recompute before every block (``kv_cache = "recompute"``).

Krea Realtime 14B as ``release_server.py`` serves it (``GenerationSession.recompute_kv_cache`` /
``get_clean_context_frames`` / ``generate_block_internal``; ``models-reference.md`` 5.7). With ``f``
frames per block and ``K`` context frames (``kv_cache_num_frames``, 3) every block ``b`` does:

1. **Context latents** ``c`` (at most ``K`` frames): the first latent frame of the video plus the newest
   ``K - 1`` generated latent frames after it (``clean[:, :1] ++ clean[:, 1:][:, -(K-1):]``). The real first
   latent is kept while ``(b - 1) f < K`` (the block before this one started inside the first ``K``
   frames); afterwards it is replaced by a fresh VAE encode, as a single image (a proper "first" latent), of
   the oldest of the last ``1 + 4 (K - 1)`` (= 9) decoded pixel frames.
2. **Recompute**: zero the cache, run the DiT once at ``t = 0`` over ``c`` at RoPE positions
   ``0 .. |c| - 1``, block-causal in blocks of ``f`` (one 3-frame block: full attention among them), and
   store their keys/values at slots ``0 .. |c| - 1``. Block 0 has no context: the cache stays empty.
3. **Denoise** the new block at RoPE positions ``|c| .. |c| + f - 1`` (= ``min(b f, K)``: 3..5 from the
   second block on), attending to the context and itself. No context pass afterwards. Positions are
   window-relative, so the video length is unbounded (no 1024-frame RoPE table limit, no cache growth).

The VAE sits inside the loop through a :class:`FirstFrameReencoder` hook: the generation stack passes
:class:`VaeFirstFrameReencoder`, which is also the streaming decoder of the video (every clean block is
decoded once, through it) and keeps the last ``1 + 4 (K - 1)`` pixel frames to re-encode.

Equal to ``release_server.py``: the context rule above (including the ``(b - 1) f < K`` switch and the
choice of ``frame_context_cache[0]``, a 9-frame deque of every decoded pixel frame), the recompute at
``t = 0`` with positions from 0 into a zeroed cache, the new block at ``min(current_start, K)``, a
``K + f``-frame attention window with no sink, no context pass. Assumptions / differences: noise comes from
Astrolabe's per-sample generators (Krea draws the whole video's noise up front and re-noises from one
generator), so videos are not bit-equal to Krea's for a seed; the VAE runs in its configured dtype (Krea:
float16); Krea's ``keep_first_frame`` option, prompt-embedding interpolation, start-frame / video-to-video
inputs and the output trim of the first block's first 3 pixel frames are not reproduced; the "KV Cache
Attention Bias" of Krea's blog (log β added to the logits of cached keys outside the first frame and the
current block) is not in Krea's GitHub code and is left out (equivalent to β = 1, its "off" setting).
The step list is the card's (``krea_served``: 1000 937 833 625 unwarped, the issue's reading of
``self_forcing_server_14b.yaml``); note that ``release_server.py`` (commit 0a9f719) ignores the yaml's list
and builds its own with ``v2v.get_denoising_schedule``: ``linspace(1000, 0, n)`` warped through the shifted
table, ``n`` = ``num_denoising_steps`` (6 there, "use 4 for performance"), whose last forward runs at t = 0.
A hard prompt cut restarts the loop as a new video (first frame = the cut's first frame); a soft switch
only changes the text: the next recompute re-encodes the context under the new prompt.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import torch

from astrolabe.models.wan.vae import StreamingDecoder, WanVAE

KREA_CONTEXT_FRAMES = 3  # release_server.py GenerateParams.kv_cache_num_frames


class FirstFrameReencoder(Protocol):
    """The VAE hook of the recompute loop."""

    def __call__(self, num_latent_frames: int) -> torch.Tensor:
        """A fresh first latent (B, C, h, w): the VAE encode, as a single image, of the oldest of the last
        ``1 + 4 (K - 1)`` decoded pixel frames, once the first ``num_latent_frames`` latent frames are decoded."""
        ...


def reencode_pixel_frames(context_frames: int, temporal_factor: int = 4) -> int:
    """Pixel frames the re-encoder keeps: ``1 + 4 (K - 1)`` (Krea's ``frame_cache_len``; 9 for K = 3)."""
    return 1 + (context_frames - 1) * temporal_factor


def keeps_first_latent(frames_since_origin: int, block_frames: int, context_frames: int) -> bool:
    """Krea's rule: the real first latent stays in the context while ``(b - 1) f < K`` with ``b f`` the frames
    generated so far (``get_clean_context_frames``); afterwards it is replaced by a re-encode."""
    return frames_since_origin - block_frames < context_frames


@dataclass
class RecomputeHistory:
    """The clean latents the recompute needs: the stream's first latent frame and the newest ``K - 1`` after it."""

    context_frames: int  # K
    origin: int = 0  # absolute frame index where this stream (or scene after a hard cut) started
    first: torch.Tensor | None = None  # (B, C, h, w)
    recent: deque[torch.Tensor] = field(default_factory=deque)  # newest frames after the first, oldest first

    def __post_init__(self) -> None:
        if self.context_frames < 1:
            raise ValueError(f"the recompute needs at least 1 context frame, got {self.context_frames}")
        self.recent = deque(self.recent, maxlen=self.context_frames - 1)

    def push(self, x0: torch.Tensor) -> None:
        """Record a clean block (B, f, C, h, w)."""
        for i in range(x0.shape[1]):
            if self.first is None:
                self.first = x0[:, i]
            else:
                self.recent.append(x0[:, i])

    def context(
        self, next_frame: int, block_frames: int, reencode: FirstFrameReencoder | None
    ) -> torch.Tensor | None:
        """Context latents (B, n <= K, C, h, w) for the block starting at absolute frame ``next_frame``;
        None for the first block of the stream (nothing to recompute)."""
        if self.first is None:
            return None
        first = self.first
        if not keeps_first_latent(next_frame - self.origin, block_frames, self.context_frames):
            if reencode is None:
                raise RuntimeError(
                    "Krea's KV recompute replaces the first latent frame by a VAE re-encode once it leaves the recent window: "
                    "pass a FirstFrameReencoder (e.g. VaeFirstFrameReencoder) to the BlockStreamer"
                )
            first = reencode(next_frame).to(device=first.device, dtype=first.dtype)
            if first.shape != self.first.shape:
                raise ValueError(f"re-encoded first latent {tuple(first.shape)} != {tuple(self.first.shape)}")
        return torch.stack([first, *self.recent], dim=1)


class VaeFirstFrameReencoder:
    """:class:`FirstFrameReencoder` with the video's VAE; also the video's streaming decoder.

    Decode every clean block through :meth:`decode_block` (pixels for the video writer); it keeps the last
    ``keep`` decoded pixel frames (Krea's ``frame_context_cache``). Calling it encodes the oldest kept frame
    as a one-frame video: (B, 3, 1, H, W) -> (B, 16, 1, h, w), a first latent (the VAE's causal first chunk).
    """

    def __init__(self, vae: WanVAE, context_frames: int = KREA_CONTEXT_FRAMES) -> None:
        self.vae = vae
        self.decoder = StreamingDecoder(vae)
        self.frames: deque[torch.Tensor] = deque(
            maxlen=reencode_pixel_frames(context_frames, vae.config.temporal_factor)
        )  # each (B, 3, H, W)

    def decode_block(self, z: torch.Tensor) -> torch.Tensor:
        """Normalised latents (B, 16, f, h, w) -> pixels (B, 3, n, H, W) in [-1, 1] (see StreamingDecoder)."""
        pixels = self.decoder.decode_block(z)
        self.frames.extend(pixels.unbind(2))
        return pixels

    def __call__(self, num_latent_frames: int) -> torch.Tensor:
        seen = self.decoder.latent_frames_seen
        if seen != num_latent_frames or not self.frames:
            raise RuntimeError(
                f"the re-encoder has decoded {seen} latent frames, the sampler has generated {num_latent_frames}: "
                "decode every clean block through VaeFirstFrameReencoder.decode_block before the next block"
            )
        return self.vae.encode(self.frames[0].unsqueeze(2))[:, :, 0]  # (B, 16, h, w)
