"""Block-autoregressive streaming sampler with a rolling KV cache, group branching and prompt switches.

One block of ``f`` latent frames (``models-reference.md`` 4.4, ``astrolabe-reference.md`` 4):

    x = eps_0                                      fresh noise, (B, f, C, h, w)
    for k in 0..K-1:   v = G(x, t_k | cache);  x0 = x - sigma_k v
                       if k < K-1:  x = (1 - sigma_{k+1}) x0 + sigma_{k+1} eps_{k+1}   (fresh noise, not an ODE step)
    block output = x0;  context pass G(x0, t = 0 | cache, write) stores the clean block's keys/values

Randomness: the sampler asks a :class:`NoiseSource` for draw ``(start_frame, step)`` of each block:
step 0 is the initial noise ``eps_0``, step k >= 1 the re-noising noise ``eps_k``. By default every
sample owns a ``torch.Generator`` seeded from its recorded seed (:class:`SampleNoise`) and draws, block
by block, its initial noise then its re-noising noise. A sample's video depends only on its seed, its
prompt and the model, never on the batch it ran in, so any sample can be regenerated exactly. A
:class:`astrolabe.sampling.noise_tape.NoiseTape` supplies the same draws explicitly (AR-CoPO branches
share all noise but one chunk's initial noise).

Group branching: a prefix is generated once per prompt, the cache is forked K ways along the batch
(:meth:`KVCache.fork`), and each candidate continues with its own seed (:meth:`BlockStreamer.fork`) or
its own rows of a noise source (:meth:`BlockStreamer.fork_with`; AR-CoPO pivot forking,
:mod:`astrolabe.sampling.pivot`). :func:`rebuild_context`
replays the context passes over stored prefix latents to rebuild the same cache for the RL update.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from astrolabe.models.wan.attention import CausalSpec
from astrolabe.models.wan.dit import WanDiT
from astrolabe.sampling.kv_cache import KVCache
from astrolabe.sampling.schedule import StepSchedule, add_noise, flow_to_x0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamSpec:
    """Everything the sampler needs that depends on the base model and the latent size."""

    causal: CausalSpec
    steps: StepSchedule
    latent_channels: int
    latent_height: int
    latent_width: int
    max_cache_frames: int | None = None  # global attention capacity (None = RoPE limit)
    first_block_steps: StepSchedule | None = None  # Causal Forcing++: the first frame uses the 4-step list

    def steps_for(self, start_frame: int) -> StepSchedule:
        """The denoising schedule of the block starting at ``start_frame``."""
        if start_frame == 0 and self.first_block_steps is not None:
            return self.first_block_steps
        return self.steps

    @property
    def block_frames(self) -> int:
        return self.causal.block_frames

    def block_shape(self, batch: int, frames: int | None = None) -> tuple[int, ...]:
        f = self.block_frames if frames is None else frames
        return (batch, f, self.latent_channels, self.latent_height, self.latent_width)


class NoiseSource(Protocol):
    """Where the sampler's Gaussian draws come from, one batch row per stream."""

    device: torch.device  # where the draws are made (a fork with seeds draws there too)

    def __len__(self) -> int:
        """Number of streams (the batch size)."""
        ...

    def draw(self, start_frame: int, step: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """Noise ``(B, *shape)`` of the block starting at ``start_frame``: ``step`` 0 is the initial noise,
        ``step`` k >= 1 the re-noising noise before denoising step k."""
        ...


class SampleNoise:
    """Independent Gaussian noise streams, one generator per sample, seeded from recorded seeds.

    Draws happen in call order (the sampler's order: per block, the initial noise then each re-noising
    noise); :meth:`draw`'s indices only name the draw.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str = "cpu") -> None:
        self.seeds = [int(s) for s in seeds]
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(s) for s in self.seeds]

    def __len__(self) -> int:
        return len(self.seeds)

    def randn(self, shape: Sequence[int], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(B, *shape) with row b drawn from generator b."""
        return torch.stack(
            [torch.randn(tuple(shape), generator=g, device=self.device, dtype=dtype) for g in self.generators]
        )

    def draw(self, start_frame: int, step: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        """The next draw of every generator, (B, *shape) (the indices are not used: see the class docstring)."""
        return self.randn(shape, dtype)

    def get_state(self) -> list[torch.Tensor]:
        return [g.get_state() for g in self.generators]


def make_cache(model: WanDiT, spec: StreamSpec) -> KVCache:
    """Empty cache sized from the model config and the latent grid."""
    s = model.config.tokens_per_frame(spec.latent_height, spec.latent_width)
    return KVCache(
        num_layers=model.config.num_layers,
        tokens_per_frame=s,
        causal=spec.causal,
        max_frames=spec.max_cache_frames,
    )


def denoise_steps(
    model: WanDiT,
    cache: KVCache,
    context: torch.Tensor,  # (B, L, text_dim)
    noise: NoiseSource,
    start_frame: int,
    spec: StreamSpec,
    frames: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Few-step denoising of one block against the cache (read-only), one step at a time.

    Yields ``(x_t, x0_hat)`` per step k: the model input (B, f, C, h, w) and its x0 prediction. The
    re-noising draw for step k + 1 happens after step k's yield; the last ``x0_hat`` is the block output.
    """
    b = context.shape[0]
    shape = spec.block_shape(b, frames)[1:]
    x = noise.draw(start_frame, 0, shape, dtype)
    steps = spec.steps_for(start_frame)
    for k, (t, sigma) in enumerate(zip(steps.timesteps, steps.sigmas)):
        tt = torch.full((b,), t, device=x.device)
        v = model(x, tt, context, kv_cache=cache, start_frame=start_frame)
        x0 = flow_to_x0(x, v, sigma)
        yield x, x0
        if k + 1 < len(steps.timesteps):
            x = add_noise(x0, noise.draw(start_frame, k + 1, shape, dtype), steps.sigmas[k + 1])


def final_x0(steps: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """Run a block's denoising steps (:func:`denoise_steps`) to the end; the last x0 is the block output."""
    x0 = None
    for _, x0 in steps:
        pass
    if x0 is None:
        raise ValueError("a block needs at least one denoising step")
    return x0


def write_context(
    model: WanDiT,
    cache: KVCache,
    context: torch.Tensor,
    x0: torch.Tensor,  # (B, f, C, h, w) clean latents
    spec: StreamSpec,
    start_frame: int | None = None,
    frame_positions: Sequence[int] | None = None,
) -> None:
    """Context pass: run the model on clean frames at the context timestep and commit their keys/values."""
    b = x0.shape[0]
    tt = torch.full((b,), spec.steps.context_timestep, device=x0.device)
    model(
        x0,
        tt,
        context,
        kv_cache=cache,
        start_frame=0 if start_frame is None else start_frame,
        frame_positions=frame_positions,
        cache_write=True,
    )


@dataclass
class BlockStreamer:
    """Stateful generation of one batch of streams, block by block.

    Keeps the KV cache and, for the prompt-switch re-cache, the clean latents of the frames the cache
    currently holds (bounded by the window). Nothing else of the past is retained.
    """

    model: WanDiT
    spec: StreamSpec
    context: torch.Tensor  # (B, L, text_dim)
    noise: NoiseSource
    cache: KVCache | None = None
    next_frame: int = 0
    retained: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> (B, C, h, w)

    def __post_init__(self) -> None:
        if self.cache is None:
            self.cache = make_cache(self.model, self.spec)
        if len(self.noise) != self.context.shape[0]:
            raise ValueError(f"{len(self.noise)} seeds for a batch of {self.context.shape[0]} prompts")

    @torch.no_grad()
    def step(self, frames: int | None = None) -> torch.Tensor:
        """Generate the next block; returns its clean latents (B, f, C, h, w) and caches them."""
        f = self.spec.block_frames if frames is None else frames
        x0 = final_x0(denoise_steps(self.model, self.cache, self.context, self.noise, self.next_frame, self.spec, f))
        self.commit(x0)
        return x0

    @torch.no_grad()
    def commit(self, x0: torch.Tensor) -> None:
        """Append a denoised block (B, f, C, h, w) at ``next_frame``: context pass, retained latents, advance."""
        f = x0.shape[1]
        write_context(self.model, self.cache, self.context, x0, self.spec, start_frame=self.next_frame)
        for i in range(f):
            self.retained[self.next_frame + i] = x0[:, i]
        self.retained = {p: self.retained[p] for p in self.cache.positions}
        self.next_frame += f

    @torch.no_grad()
    def switch_prompt(self, context: torch.Tensor, hard: bool) -> None:
        """Change the prompt. Hard cut: flush the cache (the new scene starts from nothing). Soft switch
        (LongLive-style re-cache): keep the history but recompute the cached frames' keys/values under the
        new prompt, at their original positions, sink included."""
        if context.shape[0] != self.context.shape[0]:
            raise ValueError("a prompt switch must keep the batch size")
        self.context = context
        positions = list(self.cache.positions)
        self.cache.reset()
        if hard or not positions:
            self.retained = {}
            return
        latents = torch.stack([self.retained[p] for p in positions], dim=1)  # (B, n, C, h, w)
        write_context(self.model, self.cache, context, latents, self.spec, frame_positions=positions)

    def fork(self, k: int, seeds: Sequence[Sequence[int]]) -> BlockStreamer:
        """K candidates per stream sharing this prefix; ``seeds[b][j]`` seeds candidate j of stream b."""
        if len(seeds) != self.context.shape[0] or any(len(s) != k for s in seeds):
            raise ValueError(f"fork needs {k} seeds for each of {self.context.shape[0]} streams")
        flat = [s for per in seeds for s in per]
        return self.fork_with(k, SampleNoise(flat, self.noise.device))

    def fork_with(self, k: int, noise: NoiseSource) -> BlockStreamer:
        """K candidates per stream sharing this prefix, drawing from ``noise`` (B*k rows, candidate j of
        stream b in row b*k + j), e.g. a :class:`~astrolabe.sampling.noise_tape.NoiseTape`."""
        if len(noise) != self.context.shape[0] * k:
            raise ValueError(f"fork of {self.context.shape[0]} streams x {k} needs {self.context.shape[0] * k} "
                             f"noise rows, got {len(noise)}")
        return BlockStreamer(
            model=self.model,
            spec=self.spec,
            context=self.context.repeat_interleave(k, dim=0),
            noise=noise,
            cache=self.cache.fork(k),
            next_frame=self.next_frame,
            retained={p: x.repeat_interleave(k, dim=0) for p, x in self.retained.items()},
        )


def generate_blocks(streamer: BlockStreamer, num_blocks: int) -> Iterator[torch.Tensor]:
    """Yield ``num_blocks`` clean blocks (B, f, C, h, w) one at a time."""
    for _ in range(num_blocks):
        yield streamer.step()


@torch.no_grad()
def rebuild_context(
    model: WanDiT,
    spec: StreamSpec,
    context: torch.Tensor,  # (B, L, text_dim)
    prefix_latents: torch.Tensor,  # (B, P, C, h, w) clean prefix, P a multiple of the block size
    start_frame: int = 0,
) -> KVCache:
    """Replay the context passes over a stored prefix: the cache the sampler had at the branch point."""
    cache = make_cache(model, spec)
    f = spec.block_frames
    if prefix_latents.shape[1] % f:
        raise ValueError(f"prefix of {prefix_latents.shape[1]} frames is not a multiple of block size {f}")
    for s in range(0, prefix_latents.shape[1], f):
        write_context(model, cache, context, prefix_latents[:, s : s + f], spec, start_frame=start_frame + s)
    return cache
