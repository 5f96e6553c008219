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

``StreamConfig.kv_cache`` chooses how the cache evolves between blocks: ``context_pass`` (above: SF,
LongLive, CF, Astrolabe's training sampler) or ``recompute`` (Krea's served loop, ``release_server.py``:
before each block the cache is zeroed and rebuilt by one t = 0 pass over the first latent frame + the
newest two, at RoPE positions 0..2, and the block is denoised at positions 3..5, with no context pass;
see :mod:`astrolabe.sampling.recompute`). Recompute is a generation mode: group branching and the RL
update's :func:`rebuild_context` refuse it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from astrolabe.models.registry import KVCacheMode
from astrolabe.models.wan.attention import CausalWindow, RopeMode
from astrolabe.models.wan.dit import WanDiT
from astrolabe.sampling.kv_cache import KVCache
from astrolabe.sampling.recompute import KREA_CONTEXT_FRAMES, FirstFrameReencoder, RecomputeHistory
from astrolabe.sampling.schedule import StepSchedule, add_noise, flow_to_x0

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamConfig:
    """Everything the sampler needs that depends on the base model and the latent size."""

    causal: CausalWindow
    steps: StepSchedule
    latent_channels: int
    latent_height: int
    latent_width: int
    max_cache_frames: int | None = None  # global attention capacity (None = RoPE limit)
    first_block_steps: StepSchedule | None = None  # Causal Forcing++: the first frame uses the 4-step list
    rope: RopeMode = "absolute"  # cache_relative = the release's inference_wan.py numerics (generate only)
    kv_cache: KVCacheMode = "context_pass"  # recompute = Krea's served loop (generate only)
    recompute_frames: int = KREA_CONTEXT_FRAMES  # K context frames of the recompute (Krea's kv_cache_num_frames)

    def __post_init__(self) -> None:
        if self.kv_cache != "recompute":
            return
        w, need = self.causal.window_frames, self.recompute_frames + self.block_frames
        if self.recompute_frames < 1 or (w is not None and w < need) or self.causal.sink_frames:
            raise ValueError(
                f"kv_cache='recompute' needs >= 1 context frame, no sink and a window of at least {need} frames "
                f"(context {self.recompute_frames} + block {self.block_frames}), got {self.causal}"
            )
        if self.rope != "absolute":
            raise ValueError(
                "kv_cache='recompute' already uses window-relative RoPE positions (0..K+f-1): use sampling.rope=absolute"
            )

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


def make_cache(model: WanDiT, stream: StreamConfig) -> KVCache:
    """Empty cache sized from the model config and the latent grid."""
    s = model.config.tokens_per_frame(stream.latent_height, stream.latent_width)
    return KVCache(
        num_layers=model.config.num_layers,
        tokens_per_frame=s,
        causal=stream.causal,
        max_frames=stream.max_cache_frames,
        rope=stream.rope,
    )


def denoise_steps(
    model: WanDiT,
    cache: KVCache,
    context: torch.Tensor,  # (B, L, text_dim)
    noise: NoiseSource,
    start_frame: int,
    stream: StreamConfig,
    frames: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Few-step denoising of one block against the cache (read-only), one step at a time.

    Yields ``(x_t, x0_hat)`` per step k: the model input (B, f, C, h, w) and its x0 prediction. The
    re-noising draw for step k + 1 happens after step k's yield; the last ``x0_hat`` is the block output.
    """
    b = context.shape[0]
    shape = stream.block_shape(b, frames)[1:]
    x = noise.draw(start_frame, 0, shape, dtype)
    steps = stream.steps_for(start_frame)
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
    stream: StreamConfig,
    start_frame: int | None = None,
    frame_positions: Sequence[int] | None = None,
) -> None:
    """Context pass: run the model on clean frames at the context timestep and commit their keys/values."""
    b = x0.shape[0]
    tt = torch.full((b,), stream.steps.context_timestep, device=x0.device)
    model(
        x0,
        tt,
        context,
        kv_cache=cache,
        start_frame=0 if start_frame is None else start_frame,
        frame_positions=frame_positions,
        cache_write=True,
    )


def recompute_cache(
    model: WanDiT,
    cache: KVCache,
    context: torch.Tensor,  # (B, L, text_dim)
    latents: torch.Tensor,  # (B, n, C, h, w) clean context latents
    stream: StreamConfig,
) -> int:
    """Krea's KV recompute: forget the cached frames (the text cache stays), then one forward at the context
    timestep (0) over ``latents`` at RoPE positions ``0 .. n-1`` (block-causal in blocks of ``f``: full
    attention inside one block) writes their keys/values. Returns ``n``, the position of the next block."""
    cache.clear_frames()
    write_context(model, cache, context, latents, stream, start_frame=0)
    return latents.shape[1]


@dataclass
class BlockStreamer:
    """Stateful generation of one batch of streams, block by block.

    Keeps the KV cache and, for the prompt-switch re-cache, the clean latents of the frames the cache
    currently holds (bounded by the window). Nothing else of the past is retained.

    With ``stream.kv_cache == "recompute"`` (Krea's served loop) it keeps a :class:`RecomputeHistory`
    instead and needs ``reencoder`` (the VAE hook) once the first frame leaves the recent window.
    """

    model: WanDiT
    stream: StreamConfig
    context: torch.Tensor  # (B, L, text_dim)
    noise: NoiseSource
    cache: KVCache | None = None
    next_frame: int = 0
    retained: dict[int, torch.Tensor] = field(default_factory=dict)  # position -> (B, C, h, w)
    reencoder: FirstFrameReencoder | None = None  # recompute only: the VAE re-encode of the first frame
    history: RecomputeHistory | None = None  # recompute only: first latent + newest K-1

    def __post_init__(self) -> None:
        if self.cache is None:
            self.cache = make_cache(self.model, self.stream)
        if self.recomputes and self.history is None:
            self.history = RecomputeHistory(self.stream.recompute_frames, origin=self.next_frame)
        if len(self.noise) != self.context.shape[0]:
            raise ValueError(f"{len(self.noise)} seeds for a batch of {self.context.shape[0]} prompts")

    @torch.no_grad()
    def step(self, frames: int | None = None) -> torch.Tensor:
        """Generate the next block; returns its clean latents (B, f, C, h, w) and caches them."""
        f = self.stream.block_frames if frames is None else frames
        if self.recomputes:
            return self._step_recompute(f)
        steps = denoise_steps(self.model, self.cache, self.context, self.noise, self.next_frame, self.stream, f)
        x0 = final_x0(steps)
        self.commit(x0)
        return x0

    @torch.no_grad()
    def commit(self, x0: torch.Tensor) -> None:
        """Append a denoised block (B, f, C, h, w) at ``next_frame``: context pass, retained latents, advance."""
        f = x0.shape[1]
        write_context(self.model, self.cache, self.context, x0, self.stream, start_frame=self.next_frame)
        for i in range(f):
            self.retained[self.next_frame + i] = x0[:, i]
        self.retained = {p: self.retained[p] for p in self.cache.positions}
        self.next_frame += f

    @property
    def recomputes(self) -> bool:
        return self.stream.kv_cache == "recompute"

    def _step_recompute(self, f: int) -> torch.Tensor:
        """Krea's block: rebuild the cache from the context latents, denoise at positions n .. n+f-1."""
        latents = self.history.context(self.next_frame, self.stream.block_frames, self.reencoder)
        if latents is None:  # first block of the stream: empty cache at position 0
            self.cache.clear_frames()
            start = 0
        else:
            start = recompute_cache(self.model, self.cache, self.context, latents, self.stream)
        x0 = final_x0(denoise_steps(self.model, self.cache, self.context, self.noise, start, self.stream, f))
        self.history.push(x0)
        self.next_frame += f
        return x0

    @torch.no_grad()
    def switch_prompt(self, context: torch.Tensor, hard: bool) -> None:
        """Change the prompt. Hard cut: flush the cache (the new scene starts from nothing). Soft switch
        (LongLive-style re-cache): keep the history but recompute the cached frames' keys/values under the
        new prompt, at their original positions, sink included."""
        if context.shape[0] != self.context.shape[0]:
            raise ValueError("a prompt switch must keep the batch size")
        self.context = context
        if self.recomputes:  # the next recompute re-encodes the context under the new prompt
            self.cache.reset()
            if hard:
                self.history = RecomputeHistory(self.stream.recompute_frames, origin=self.next_frame)
            return
        positions = list(self.cache.positions)
        self.cache.reset()
        if hard or not positions:
            self.retained = {}
            return
        latents = torch.stack([self.retained[p] for p in positions], dim=1)  # (B, n, C, h, w)
        write_context(self.model, self.cache, context, latents, self.stream, frame_positions=positions)

    def fork(self, k: int, seeds: Sequence[Sequence[int]]) -> BlockStreamer:
        """K candidates per stream sharing this prefix; ``seeds[b][j]`` seeds candidate j of stream b."""
        if len(seeds) != self.context.shape[0] or any(len(s) != k for s in seeds):
            raise ValueError(f"fork needs {k} seeds for each of {self.context.shape[0]} streams")
        flat = [s for per in seeds for s in per]
        return self.fork_with(k, SampleNoise(flat, self.noise.device))

    def fork_with(self, k: int, noise: NoiseSource) -> BlockStreamer:
        """K candidates per stream sharing this prefix, drawing from ``noise`` (B*k rows, candidate j of
        stream b in row b*k + j), e.g. a :class:`~astrolabe.sampling.noise_tape.NoiseTape`."""
        if self.recomputes:
            raise ValueError("group branching is not defined for kv_cache='recompute' (Krea's served loop); "
                             "sample rollouts with the training sampler (kv_cache='context_pass', e.g. krea14b)")
        if len(noise) != self.context.shape[0] * k:
            raise ValueError(f"fork of {self.context.shape[0]} streams x {k} needs {self.context.shape[0] * k} "
                             f"noise rows, got {len(noise)}")
        return BlockStreamer(
            model=self.model,
            stream=self.stream,
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


@dataclass(frozen=True)
class PromptSwitch:
    """A scene change a stream made before writing the block that starts at ``frame``: from there on it runs
    under ``context``, its cache flushed (``hard``, a cut) or re-cached under the new prompt
    (:meth:`BlockStreamer.switch_prompt`)."""

    frame: int
    context: torch.Tensor  # (B, L, text_dim)
    hard: bool


class _NoDraws:
    """The noise source of a replay: committing stored latents never draws."""

    def __init__(self, batch: int, device: torch.device) -> None:
        self.batch, self.device = batch, device

    def __len__(self) -> int:
        return self.batch

    def draw(self, start_frame: int, step: int, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        raise RuntimeError("a replayed stream does not sample")


@torch.no_grad()
def rebuild_context(
    model: WanDiT,
    stream: StreamConfig,
    context: torch.Tensor,  # (B, L, text_dim) the prompt of the prefix's first frame
    prefix_latents: torch.Tensor,  # (B, P, C, h, w) clean prefix, P a multiple of the block size
    start_frame: int = 0,
    switches: Sequence[PromptSwitch] = (),
) -> KVCache:
    """Replay the context passes over a stored prefix: the cache the sampler had at the branch point.

    ``switches`` are the prompt switches the sampler made, at block boundaries in ``(start_frame, start_frame + P]``
    (one at ``start_frame + P`` is the switch into the window's scene, made after the last prefix block). The
    replay runs the sampler's own :meth:`BlockStreamer.commit` and :meth:`BlockStreamer.switch_prompt`, so the
    cache equals the sampler's exactly (a soft switch re-caches the retained frames under the new prompt).
    """
    if stream.kv_cache != "context_pass":
        raise ValueError(f"rebuild_context replays context passes; kv_cache={stream.kv_cache!r} has none (use "
                         "the training sampler, kv_cache='context_pass', e.g. base model krea14b, for RL)")
    f, p = stream.block_frames, prefix_latents.shape[1]
    if p % f:
        raise ValueError(f"prefix of {p} frames is not a multiple of block size {f}")
    at = {sw.frame: sw for sw in switches}
    bad = [fr for fr in at if not (start_frame < fr <= start_frame + p and (fr - start_frame) % f == 0)]
    if bad or len(at) != len(switches):
        raise ValueError(f"prompt switches at frames {sorted(sw.frame for sw in switches)} must be distinct block "
                         f"boundaries in ({start_frame}, {start_frame + p}] (blocks of {f} frames)")
    streamer = BlockStreamer(model, stream, context, _NoDraws(context.shape[0], context.device), next_frame=start_frame)
    for s in range(0, p, f):
        if start_frame + s in at:
            streamer.switch_prompt(at[start_frame + s].context, hard=at[start_frame + s].hard)
        streamer.commit(prefix_latents[:, s : s + f])
    if start_frame + p in at:
        streamer.switch_prompt(at[start_frame + p].context, hard=at[start_frame + p].hard)
    assert streamer.cache is not None
    return streamer.cache

