"""Streaming clip-window NFT update: train one local window of a long rollout against a detached prefix.

Paper part 2 (``DESIGN.md`` "Streaming training"); the release has no such code (reference 10.3). For a
rollout of ``P + W`` latent frames the update trains only the ``W`` window frames ``[P, P + W)``:

1. Prefix context, no gradient. The clean prefix latents ``x0[:, :P]`` are replayed through the sampler's
   context passes (``t = 0``, block by block, rolling window + sink) to rebuild the KV cache the sampler had
   at the branch point (:func:`build_prefix_cache`). The cache is detached: no gradient flows through
   history, and its size is bounded by the attention window, so memory is constant in ``P``.
2. One training noise level per micro-batch (or per sample), ``sigma ~ NFTConfig.train_sigmas``, and
   ``x_t = (1 - sigma) * x0_win + sigma * eps`` with ``eps ~ N(0, I)`` from an explicit generator: one draw
   per sample (the release), or one draw shared by the micro-batch (``noise_per="micro_batch"``; below).
3. The window forward (:func:`window_predictions`): all ``W`` frames at timestep ``t = 1000 * sigma``, block
   causal inside the window, attending to the cached prefix keys/values. It is *read-only* on the cache, so
   one cache serves the current (with grad), old and reference (without grad) forwards. The flow output
   is turned into an x0 prediction ``x0_hat = x_t - sigma * v``.
4. :func:`astrolabe.rl.nft.nft_loss` on the window frames.

Equivalence (tested): the window prediction equals the non-cached block-causal forward of the whole
sequence ``[x0_prefix at t = 0, x_t at t]`` restricted to the window frames, when the same policy built the
cache. The only approximation of the streaming update is therefore the *choice of policy for the prefix
keys/values* (``StreamingUpdateConfig.cache_policy``):

- ``"old"`` (default): the old/sampling policy, i.e. exactly the context the rollout saw; the current
  and reference policies then read the old policy's prefix keys/values.
- ``"default"``: the current policy (detached), i.e. the context the current model would compute itself.

Whole-clip mode (:func:`clip_predictions`) is the release's update done right: no prefix, every frame
noised, one non-cached forward with the *block*-causal mask (``block_frames = 3``; the release trained
frame-causally by accident, reference 10.2, reproducible with ``clip_mask="release_frame_causal"``).

Shared noise (``StreamingUpdateConfig.noise_per="micro_batch"``). At the old policy the NFT gradient of a
micro-batch is ``g = sum_i (2 r_i - 1) * beta * J_i^T (v_old(x_t^i) - v*_i)`` (up to the loss's weighting):
each sample pulls toward or away from its own target by its optimality ``r_i``. A micro-batch holds
candidates of one group, whose ``2 r_i - 1`` sum to about 0 (advantages are centred per group; only clipping
breaks it). With one ``(sigma, eps)`` for the whole micro-batch, the part of the residual
``v_old(x_t^i) - v*_i`` that the group's samples share (the part due to ``eps``, large when the samples are
alike) cancels in that sum. What is left is the part due to the samples' differences, which is what the
rewards rank. Each sample's ``(sigma, eps)`` is still ``N(0, I)``-distributed, so the expected gradient is
unchanged; only its variance drops. The variance drops most when ``rl.micro_batch_size`` is at least the
group size, so that the whole group shares one draw. ``astrolabe bench noise`` measures the effect on a
run: the agreement (cosine) of gradients from independent noise draws.

Policies. A policy is selected either by a context manager factory run around ``model(...)`` (e.g.
``lambda: policy_set.use("old")`` over peft adapters) or by a separate module (e.g. a frozen copy), keyed
``"default"`` (the trained policy, required), ``"old"`` (required) and ``"ref"`` (optional; no KL term
without it). The no-grad forwards run first, so a context manager may even swap weights in place.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal, Union

import torch
import torch.nn as nn
from pydantic import Field

from astrolabe.configbase import Frozen
from astrolabe.models.wan.attention import CausalWindow
from astrolabe.models.wan.dit import WanDiT
from astrolabe.rl.nft import NFTConfig, nft_loss, sample_train_sigmas
from astrolabe.sampling.kv_cache import KVCache
from astrolabe.sampling.schedule import add_noise, flow_to_x0
from astrolabe.sampling.scenes import SceneSegment, switches_until
from astrolabe.sampling.streaming import PromptSwitch, StreamConfig, make_cache, rebuild_context

log = logging.getLogger(__name__)

NUM_TRAIN_TIMESTEPS = 1000  # t = 1000 * sigma (schedule convention)
PolicySwitch = Union[Callable[[], AbstractContextManager], nn.Module]  # context manager factory or a module


class StreamingUpdateConfig(Frozen):
    """How the clip-window (or whole-clip) NFT update is run."""

    mode: Literal["window", "clip"] = Field(
        "window", description="'window': detached prefix cache + local window; 'clip': whole clip, no prefix."
    )
    cache_policy: Literal["old", "default"] = Field(
        "old", description="Policy that rebuilds the prefix cache: 'old' (what the rollout saw) or 'default'."
    )
    sigma_per: Literal["micro_batch", "sample"] = Field(
        "micro_batch", description="One training sigma per micro-batch (release) or one per sample."
    )
    noise_per: Literal["sample", "micro_batch"] = Field(
        "sample",
        description="One training noise draw per sample (release) or one shared by the micro-batch's candidates "
        "of one group: an unbiased, lower-variance gradient (module docstring; set rl.micro_batch_size >= "
        "rollout.group_size so the whole group shares it).",
    )
    clip_mask: Literal["block_causal", "release_frame_causal"] = Field(
        "block_causal",
        description="Whole-clip attention mask; 'release_frame_causal' reproduces the release's bug 10.2.",
    )


@dataclass
class WindowBatch:
    """One micro-batch of window-update inputs (all latents clean, from the rollout)."""

    context: torch.Tensor  # (B, L, text_dim) text features
    prefix_latents: torch.Tensor  # (B, P, C, h, w) clean prefix, P a multiple of the block size (may be 0)
    window_x0: torch.Tensor  # (B, W, C, h, w) clean window latents
    r: torch.Tensor  # (B,) optimality in [0, 1]
    kl_mask: torch.Tensor | None = None  # (B,) bool; None = KL on every sample
    # Scene prompts (``p1[3s] | p2``): the prefix's first prompt (None = ``context``) and the prompt switches the
    # rollout made up to the window's first frame (:func:`~astrolabe.sampling.streaming.rebuild_context`);
    # ``context`` is then the window's scene.
    prefix_context: torch.Tensor | None = None  # (B, L, text_dim)
    switches: tuple[PromptSwitch, ...] = ()

    def __post_init__(self) -> None:
        b = self.window_x0.shape[0]
        contexts = [("prefix_context", self.prefix_context), *(("switch context", s.context) for s in self.switches)]
        for name, c in contexts:
            if c is not None and c.shape[0] != b:
                raise ValueError(f"{name} has batch size {c.shape[0]}, the window {b}")
        if self.window_x0.dim() != 5 or self.prefix_latents.dim() != 5:
            raise ValueError(
                f"prefix_latents and window_x0 must be (B, F, C, h, w); got {tuple(self.prefix_latents.shape)} "
                f"and {tuple(self.window_x0.shape)} (use a (B, 0, C, h, w) prefix for a window at frame 0)"
            )
        if self.prefix_latents.shape[0] != b or self.context.shape[0] != b:
            raise ValueError(
                f"batch sizes differ: context {self.context.shape[0]}, prefix {self.prefix_latents.shape[0]}, "
                f"window {b}"
            )
        if self.prefix_latents.shape[2:] != self.window_x0.shape[2:]:
            raise ValueError(
                f"prefix frames {tuple(self.prefix_latents.shape[2:])} and window frames "
                f"{tuple(self.window_x0.shape[2:])} must share (C, h, w)"
            )
        if self.r.shape != (b,):
            raise ValueError(f"r must be (B,) = ({b},), got {tuple(self.r.shape)}")
        if self.kl_mask is not None and self.kl_mask.shape != (b,):
            raise ValueError(f"kl_mask must be (B,) = ({b},), got {tuple(self.kl_mask.shape)}")

    @property
    def window_start(self) -> int:
        """Absolute frame index of the first window frame (= P)."""
        return self.prefix_latents.shape[1]


# ----------------------------------------------------------------------------------- policies


def _check_policies(policies: Mapping[str, PolicySwitch]) -> None:
    missing = {"default", "old"} - set(policies)
    if missing:
        raise ValueError(
            f"policies lack {sorted(missing)}: pass e.g. {{'default': lambda: ps.use('default'), "
            "'old': lambda: ps.use('old'), 'ref': lambda: ps.use('ref')}} or modules"
        )
    unknown = set(policies) - {"default", "old", "ref"}
    if unknown:
        raise ValueError(f"unknown policy names {sorted(unknown)}; use 'default', 'old' and optionally 'ref'")


@contextlib.contextmanager
def _under(policy: PolicySwitch, model: nn.Module) -> Iterator[nn.Module]:
    """Yield the module to run for ``policy``: ``policy`` itself if a module, else ``model`` inside its context."""
    if isinstance(policy, nn.Module):
        yield policy
        return
    with policy():
        yield model


@contextlib.contextmanager
def train_mode(model: nn.Module, enabled: bool) -> Iterator[None]:
    """``model.train(enabled)`` for the duration of the block (the previous mode restored afterwards).

    The trained policy's forward runs in train mode, so that per-block activation checkpointing
    (:func:`astrolabe.parallel.parallelize`) and LoRA dropout take effect; every no-grad forward (prefix
    cache, old and reference policies) runs in eval mode, as in the rollout.
    """
    before = model.training
    model.train(enabled)
    try:
        yield
    finally:
        model.train(before)


# ----------------------------------------------------------------------------------- prefix cache


@torch.no_grad()
def build_prefix_cache(
    model: WanDiT,
    stream: StreamConfig,
    context: torch.Tensor,  # (B, L, text_dim) the prompt of the prefix's first frame
    prefix_latents: torch.Tensor,  # (B, P, C, h, w) clean
    group_size: int = 1,
    switches: tuple[PromptSwitch, ...] = (),
) -> KVCache:
    """Detached KV cache of the clean prefix, rebuilt by the sampler's context passes (no gradient).

    ``model`` is run as given: the caller picks the policy (run this under the old policy's context for the
    default ``cache_policy="old"``). With ``group_size = K`` consecutive rows ``b*K .. b*K+K-1`` must share
    their prefix and prompts (a branched group); the cache is built once per group and forked K ways.
    ``switches``: the rollout's prompt switches of a scene prompt (:func:`rebuild_context`).
    """
    b = prefix_latents.shape[0]
    if group_size < 1 or b % group_size:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the batch size {b}")
    if group_size > 1:
        def heads(x: torch.Tensor) -> torch.Tensor:
            if not torch.equal(x, x[::group_size].repeat_interleave(group_size, dim=0)):
                raise ValueError(f"rows of a group of {group_size} must share prefix latents and prompts; use "
                                 "group_size=1 otherwise")
            return x[::group_size]

        head_switches = tuple(PromptSwitch(s.frame, heads(s.context), s.hard) for s in switches)
        return build_prefix_cache(model, stream, heads(context), heads(prefix_latents),
                                  switches=head_switches).fork(group_size)
    if prefix_latents.shape[1] == 0 and not switches:
        return make_cache(model, stream)
    return rebuild_context(model, stream, context, prefix_latents, switches=switches)


def scene_prefix(
    segments: Sequence[SceneSegment],
    window_start_block: int,
    block_frames: int,
    contexts: Mapping[str, torch.Tensor],  # text -> (1, L, text_dim)
    batch: int,
) -> tuple[torch.Tensor, tuple[PromptSwitch, ...]]:
    """The prefix's first prompt (B, L, text_dim) and the prompt switches up to the window's first block
    (:func:`~astrolabe.sampling.scenes.switches_until`) of a rollout made with the scene plan ``segments``: the
    inputs of :func:`build_prefix_cache` that replay its cache."""
    first = contexts[segments[0].prompt].expand(batch, -1, -1)
    switches = tuple(
        PromptSwitch(seg.start_block * block_frames, contexts[seg.prompt].expand(batch, -1, -1), seg.hard_cut_before)
        for seg in switches_until(list(segments), window_start_block)
    )
    return first, switches


# ----------------------------------------------------------------------------------- predictions


def _sigma_column(sigma: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
    """Sigma as a (B,) float64 tensor on ``like``'s device."""
    s = torch.as_tensor(sigma, dtype=torch.float64, device=like.device)
    if s.ndim == 0:
        s = s.expand(batch)
    if s.shape != (batch,):
        raise ValueError(f"sigma must be a float or a (B,) = ({batch},) tensor, got {tuple(s.shape)}")
    return s


def _flow_to_x0(x_t: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x0_hat = x_t - sigma v with per-sample sigma (B,)."""
    return flow_to_x0(x_t, v, sigma.view(-1, *([1] * (x_t.dim() - 1))))


def window_predictions(
    model: nn.Module,
    cache: KVCache,
    x_t: torch.Tensor,  # (B, W, C, h, w) noised window
    sigma: float | torch.Tensor,  # scalar or (B,)
    context: torch.Tensor,  # (B, L, text_dim)
    window_start: int,
) -> torch.Tensor:
    """x0 prediction (B, W, C, h, w) of the window frames attending to the detached prefix cache.

    All W frames go through one forward at ``t = 1000 sigma``; attention is block-causal inside the window
    (and windowed/sinked as the cache's causal window says). The cache is only read, through
    :meth:`KVCache.read_only`.
    """
    b, w = x_t.shape[:2]
    if w % cache.causal.block_frames:
        raise ValueError(f"window of {w} frames is not a multiple of block_frames={cache.causal.block_frames}")
    if cache.positions and window_start <= max(cache.positions):
        last = max(cache.positions)
        raise ValueError(f"window_start={window_start} must follow the cached prefix (last cached frame {last})")
    s = _sigma_column(sigma, b, x_t)  # (B,)
    v = model(x_t, s * NUM_TRAIN_TIMESTEPS, context, kv_cache=cache.read_only(), start_frame=window_start)
    return _flow_to_x0(x_t, v, s)


def clip_causal_window(causal: CausalWindow, clip_mask: str = "block_causal") -> CausalWindow:
    """Attention mask of the whole-clip forward.

    ``"block_causal"``: the rollout's mask (3-frame blocks, full attention inside a block). ``"release_frame_
    causal"``: the release's accidental mask (reference 10.2): 1-frame blocks, same window, no sink frames.
    """
    if clip_mask == "block_causal":
        return causal
    if clip_mask == "release_frame_causal":
        return CausalWindow(block_frames=1, window_frames=causal.window_frames, sink_frames=0)
    raise ValueError(f"clip_mask={clip_mask!r}; use 'block_causal' or 'release_frame_causal'")


def clip_predictions(
    model: nn.Module,
    causal: CausalWindow,
    x_t: torch.Tensor,  # (B, F, C, h, w) the whole noised clip
    sigma: float | torch.Tensor,  # scalar or (B,)
    context: torch.Tensor,  # (B, L, text_dim)
) -> torch.Tensor:
    """Whole-clip x0 prediction (B, F, C, h, w): one non-cached forward with the block-causal ``causal`` mask."""
    b = x_t.shape[0]
    s = _sigma_column(sigma, b, x_t)  # (B,)
    v = model(x_t, s * NUM_TRAIN_TIMESTEPS, context, causal=causal)
    return _flow_to_x0(x_t, v, s)


# ----------------------------------------------------------------------------------- noise


def draw_training_noise(
    x0: torch.Tensor,  # (B, W, C, h, w)
    stream: StreamConfig,
    nft_cfg: NFTConfig,
    sigma_generator: torch.Generator,
    noise_generator: torch.Generator,
    sigma_per: str = "micro_batch",
    shift: float | None = None,
    noise_per: str = "sample",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training sigma (B,) float64 and noise eps (like x0) from explicit generators.

    Sigma is drawn from the rollout's sigmas as ``nft_cfg.train_sigmas`` says (``shift`` only for
    ``"release_unwarped"``); ``eps`` is drawn on the noise generator's device, one draw per sample
    (``noise_per="sample"``) or one (1, W, C, h, w) draw repeated over the batch (``"micro_batch"``).
    """
    b = x0.shape[0]
    if sigma_per == "micro_batch":
        sig = sample_train_sigmas(nft_cfg, stream.steps.sigmas, sigma_generator, 1, shift=shift).expand(b)
    elif sigma_per == "sample":
        sig = sample_train_sigmas(nft_cfg, stream.steps.sigmas, sigma_generator, b, shift=shift)
    else:
        raise ValueError(f"sigma_per={sigma_per!r}; use 'micro_batch' or 'sample'")
    if noise_per not in ("sample", "micro_batch"):
        raise ValueError(f"noise_per={noise_per!r}; use 'sample' or 'micro_batch'")
    shape = x0.shape if noise_per == "sample" else (1, *x0.shape[1:])
    eps = torch.randn(shape, generator=noise_generator, device=noise_generator.device, dtype=x0.dtype)
    eps = eps.expand(x0.shape).contiguous()  # (B, W, C, h, w)
    return sig.to(x0.device), eps.to(x0.device)


# ----------------------------------------------------------------------------------- loss


def policy_predictions(
    policies: Mapping[str, PolicySwitch],
    model: nn.Module,
    predict: Callable[[nn.Module], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Run ``predict`` under each policy: ``old`` / ``ref`` first without grad (eval mode), then ``default`` with
    grad (train mode: activation checkpointing and LoRA dropout engage, see :func:`train_mode`)."""
    _check_policies(policies)
    out: dict[str, torch.Tensor] = {}
    for name in ("old", "ref"):
        if name in policies:
            with torch.no_grad(), _under(policies[name], model) as m, train_mode(m, False):
                out[name] = predict(m)
    with _under(policies["default"], model) as m, train_mode(m, True):
        out["default"] = predict(m)
    return out


def _loss(
    preds: Mapping[str, torch.Tensor],
    x0: torch.Tensor,
    r: torch.Tensor,
    sigma: torch.Tensor,
    x_t: torch.Tensor,
    kl_mask: torch.Tensor | None,
    nft_cfg: NFTConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    return nft_loss(
        preds["default"], preds["old"], x0, r, sigma, x_t,
        cfg=nft_cfg, kl_ref=preds.get("ref"), kl_mask=kl_mask,
    )  # fmt: skip


def window_nft_loss(
    policies: Mapping[str, PolicySwitch],
    model: nn.Module,
    cache: KVCache,
    batch: WindowBatch,
    sigma: torch.Tensor,  # (B,)
    eps: torch.Tensor,  # (B, W, C, h, w)
    nft_cfg: NFTConfig,
) -> tuple[torch.Tensor, dict[str, float]]:
    """NFT loss of the window frames at ``x_t = (1 - sigma) x0 + sigma eps`` against the detached ``cache``."""
    x0 = batch.window_x0
    x_t = add_noise(x0, eps, sigma.view(-1, 1, 1, 1, 1).to(x0.dtype))  # (B, W, C, h, w)

    def predict(m: nn.Module) -> torch.Tensor:
        return window_predictions(m, cache, x_t, sigma, batch.context, batch.window_start)

    preds = policy_predictions(policies, model, predict)
    return _loss(preds, x0, batch.r, sigma, x_t, batch.kl_mask, nft_cfg)


def clip_nft_loss(
    policies: Mapping[str, PolicySwitch],
    model: nn.Module,
    causal: CausalWindow,
    context: torch.Tensor,  # (B, L, text_dim)
    x0: torch.Tensor,  # (B, F, C, h, w) the whole clean clip
    r: torch.Tensor,  # (B,)
    sigma: torch.Tensor,  # (B,)
    eps: torch.Tensor,  # like x0
    nft_cfg: NFTConfig,
    kl_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Whole-clip NFT loss: every frame noised and trained in one block-causal forward."""
    x_t = add_noise(x0, eps, sigma.view(-1, 1, 1, 1, 1).to(x0.dtype))

    def predict(m: nn.Module) -> torch.Tensor:
        return clip_predictions(m, causal, x_t, sigma, context)

    preds = policy_predictions(policies, model, predict)
    return _loss(preds, x0, r, sigma, x_t, kl_mask, nft_cfg)


def window_nft_step(
    policies: Mapping[str, PolicySwitch],
    model: nn.Module,
    stream: StreamConfig,
    batch: WindowBatch,
    nft_cfg: NFTConfig,
    sigma_generator: torch.Generator,
    noise_generator: torch.Generator,
    cfg: StreamingUpdateConfig | None = None,
    *,
    shift: float | None = None,
    group_size: int = 1,
    backward: bool = True,
) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch of the streaming update: cache, noise, three forwards, NFT loss, (backward).

    ``cfg.mode == "window"``: the prefix cache is rebuilt (no grad) under ``cfg.cache_policy`` and only the
    window is trained. ``"clip"``: the prefix is ignored; only the window frames form the clip (a short
    video trained whole, e.g. 21 frames from frame 0), with the ``cfg.clip_mask`` attention mask.
    Calls ``loss.backward()`` when ``backward`` (divide the loss yourself for gradient accumulation by
    passing ``backward=False``). Returns the loss and metrics (``loss/...``, ``kl/...``, ``nft/...``,
    ``update/...``). Whatever mode ``model`` is in, the trained forward runs in train mode and the no-grad
    forwards in eval mode (:func:`train_mode`); activation checkpointing is set on the module once, by
    :func:`astrolabe.parallel.parallelize`.
    """
    cfg = cfg or StreamingUpdateConfig()
    _check_policies(policies)
    sigma, eps = draw_training_noise(
        batch.window_x0, stream, nft_cfg, sigma_generator, noise_generator, cfg.sigma_per, shift, cfg.noise_per
    )
    if cfg.mode == "window":
        with _under(policies[cfg.cache_policy], model) as m, train_mode(m, False):
            prefix_context = batch.context if batch.prefix_context is None else batch.prefix_context
            cache = build_prefix_cache(m, stream, prefix_context, batch.prefix_latents, group_size, batch.switches)
        loss, metrics = window_nft_loss(policies, model, cache, batch, sigma, eps, nft_cfg)
    else:
        causal = clip_causal_window(stream.causal, cfg.clip_mask)
        loss, metrics = clip_nft_loss(
            policies, model, causal, batch.context, batch.window_x0, batch.r, sigma, eps, nft_cfg, batch.kl_mask
        )
    if backward:
        loss.backward()
    metrics["update/sigma_mean"] = float(sigma.mean())
    metrics["update/window_start"] = float(batch.window_start if cfg.mode == "window" else 0)
    metrics["update/window_frames"] = float(batch.window_x0.shape[1])
    return loss, metrics
