"""Wan2.1 text-to-video DiT, bidirectional or block-causal, KV-cache aware.

``WanDiT.state_dict()`` keys are exactly Wan2.1's (825 tensors for 1.3B, 1095 for 14B), so an original
state dict loads with ``strict=True`` and no renaming. The math follows
``shared/reference/models-reference.md`` section 1.3:

    e  = time_embedding(sinusoid(t))                       (B, F, D)   per-frame timesteps
    e0 = time_projection(e)  -> 6 rows (shift/scale/gate for attention and FFN)
    c  = text_embedding(context padded with zeros to text_len; no mask)
    per block:  x += g_a * SelfAttn(LN(x)(1 + sc_a) + sh_a)
                x += CrossAttn(LN3(x), c)
                x += g_f * FFN(LN(x)(1 + sc_f) + sh_f)
    head:       out = Linear(LN(x)(1 + scale) + shift) with (shift, scale) = head.modulation + e
    output:     the flow prediction v = noise - x0, shape (B, F, C, H, W)

Attention modes (see :mod:`astrolabe.models.wan.attention`): bidirectional (``causal=None``),
block-causal with optional rolling window and sink frames, and the cached streaming forward that
reads (and, for the context pass, writes) a :class:`astrolabe.sampling.kv_cache.KVCache`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from astrolabe.models.wan.attention import (
    AttentionBackend,
    CausalWindow,
    QueryBlock,
    SlotRope,
    plan_attention,
    planned_attention,
    attention,
    slot_rope,
)
from astrolabe.models.wan.config import WanConfig
from astrolabe.models.wan.rope import rope_apply, rope_frequencies, rope_tables

if TYPE_CHECKING:
    from astrolabe.sampling.kv_cache import KVCache


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep features (N,) -> (N, dim), float64: [cos(t w_k), sin(t w_k)], w_k = 10000^(-k/half).

    ``t`` is on the 0..1000 scale and may be fractional (937.5).
    """
    half = dim // 2
    t = t.to(torch.float64)
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = torch.outer(t, freqs)  # (N, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class WanRMSNorm(nn.Module):
    """y = x * rsqrt(mean(x^2) + eps) * weight, computed in float32 and cast back."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class WanLayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 (as original Wan), cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        w = None if self.weight is None else self.weight.to(xf.dtype)
        b = None if self.bias is None else self.bias.to(xf.dtype)
        return F.layer_norm(xf, self.normalized_shape, w, b, self.eps).type_as(x)


class _WanAttentionProjections(nn.Module):
    """The projections shared by self- and cross-attention: q, k, v, o (D -> D) and optional RMS q/k norms.

    Keys ``{q,k,v,o}.{weight,bias}`` and, with ``qk_norm``, ``norm_{q,k}.weight`` (Wan's names).
    """

    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.norm_q = WanRMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()
        self.norm_k = WanRMSNorm(d, cfg.eps) if cfg.qk_norm else nn.Identity()


class WanSelfAttention(_WanAttentionProjections):
    def forward(
        self,
        x: torch.Tensor,  # (B, L, D) tokens of the new frames
        freqs: torch.Tensor | SlotRope,  # (L, d/2) absolute rotations of the new tokens, or cache-relative ones
        plan: tuple[QueryBlock, ...],
        tokens_per_frame: int,
        backend: AttentionBackend,
        cache: KVCache | None,
        layer_idx: int,
        cache_write: bool,
    ) -> torch.Tensor:
        b, length, _ = x.shape
        n, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, length, n, d)
        k = self.norm_k(self.k(x)).view(b, length, n, d)
        relative = isinstance(freqs, SlotRope)  # keys are cached un-rotated and rotated by slot per query block
        if not relative:
            q, k = rope_apply(q, freqs), rope_apply(k, freqs)
        v = self.v(x).view(b, length, n, d)
        k_all, v_all = k, v
        if cache is not None:
            cached = cache.layer(layer_idx)
            if cached is not None:
                k_all = torch.cat([cached.k.to(k.dtype), k], dim=1)
                v_all = torch.cat([cached.v.to(v.dtype), v], dim=1)
            if cache_write:
                cache.stage(layer_idx, k, v)
        out = planned_attention(
            q, k_all, v_all, plan, tokens_per_frame, backend, freqs if relative else None
        )  # (B, L, n, d)
        return self.o(out.reshape(b, length, n * d))


class WanCrossAttention(_WanAttentionProjections):
    def forward(
        self,
        x: torch.Tensor,  # (B, L, D)
        context: torch.Tensor,  # (B, text_len, D) embedded text, all rows attended (no mask)
        backend: AttentionBackend,
        cache: KVCache | None,
        layer_idx: int,
    ) -> torch.Tensor:
        b, length, _ = x.shape
        n, d = self.num_heads, self.head_dim
        q = self.norm_q(self.q(x)).view(b, length, n, d)
        cached = cache.text_kv(layer_idx) if cache is not None else None
        if cached is None:
            k = self.norm_k(self.k(context)).view(b, -1, n, d)
            v = self.v(context).view(b, -1, n, d)
            if cache is not None and cache.keeps_text_kv and not torch.is_grad_enabled():
                # store the text keys/values only on no-grad (sampling / context) forwards: a training forward
                # with gradient checkpointing must recompute them, and each policy has its own projections
                cache.store_text_kv(layer_idx, k, v)
        else:
            k, v = cached
        out = attention(q, k.to(q.dtype), v.to(q.dtype), backend)
        return self.o(out.reshape(b, length, n * d))


class WanAttentionBlock(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        d = cfg.dim
        self.norm1 = WanLayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(cfg)
        self.norm3 = WanLayerNorm(d, eps=cfg.eps, elementwise_affine=True) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = WanCrossAttention(cfg)
        self.norm2 = WanLayerNorm(d, eps=cfg.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(d, cfg.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(cfg.ffn_dim, d))
        self.modulation = nn.Parameter(torch.randn(1, 6, d) / d**0.5)

    def forward(
        self,
        x: torch.Tensor,  # (B, L, D), L = F * S
        e0: torch.Tensor,  # (B, F, 6, D)
        context: torch.Tensor,  # (B, text_len, D)
        freqs: torch.Tensor | SlotRope,
        plan: tuple[QueryBlock, ...],
        tokens_per_frame: int,
        backend: AttentionBackend,
        cache: KVCache | None,
        layer_idx: int,
        cache_write: bool,
    ) -> torch.Tensor:
        b, length, dim = x.shape
        nf = e0.shape[1]
        mod = (self.modulation.unsqueeze(0) + e0).unsqueeze(3)  # (B, F, 6, 1, D)
        sh_a, sc_a, g_a, sh_f, sc_f, g_f = mod.unbind(dim=2)  # each (B, F, 1, D)

        def per_frame(z: torch.Tensor) -> torch.Tensor:
            return z.view(b, nf, length // nf, dim)

        h = (per_frame(self.norm1(x)) * (1 + sc_a) + sh_a).view(b, length, dim).type_as(x)
        y = self.self_attn(h, freqs, plan, tokens_per_frame, backend, cache, layer_idx, cache_write)
        x = x + (per_frame(y) * g_a).view(b, length, dim).type_as(x)
        x = x + self.cross_attn(self.norm3(x), context, backend, cache, layer_idx)
        h = (per_frame(self.norm2(x)) * (1 + sc_f) + sh_f).view(b, length, dim).type_as(x)
        x = x + (per_frame(self.ffn(h)) * g_f).view(b, length, dim).type_as(x)
        return x


class WanHead(nn.Module):
    def __init__(self, cfg: WanConfig) -> None:
        super().__init__()
        out = cfg.out_dim * cfg.patch_volume
        self.norm = WanLayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, out)
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x (B, L, D), e (B, F, D) -> (B, L, out_dim * patch_volume)."""
        b, length, dim = x.shape
        nf = e.shape[1]
        shift, scale = (self.modulation.unsqueeze(0) + e.unsqueeze(2)).unsqueeze(3).unbind(dim=2)  # (B, F, 1, D)
        h = self.norm(x).view(b, nf, length // nf, dim) * (1 + scale) + shift
        return self.head(h.view(b, length, dim).type_as(x))


class WanDiT(nn.Module):
    """Wan2.1 DiT with Wan's exact parameter names; see the module docstring for the math."""

    def __init__(self, config: WanConfig, attention_backend: AttentionBackend = "sdpa") -> None:
        super().__init__()
        self.config = config
        self.attention_backend: AttentionBackend = attention_backend
        self.gradient_checkpointing = False
        d = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, d, kernel_size=config.patch_size, stride=config.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(config.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(config.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        self.blocks = nn.ModuleList([WanAttentionBlock(config) for _ in range(config.num_layers)])
        self.head = WanHead(config)
        if config.learned_positions is not None:  # not Wan's (WanConfig.learned_positions)
            block, tokens = config.learned_positions
            self.pos_embedding = nn.Parameter(torch.zeros(2 * block, tokens, d))
        # RoPE tables are rebuilt, never stored (Wan keeps them as a plain attribute, not a buffer).
        self._rope = rope_tables(config.head_dim, config.rope_max_positions)

    # ----------------------------------------------------------------- init
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator) -> None:
        """Random init for tests and the tiny model: Wan's scheme (xavier linears, N(0, .02) embeddings).

        Unlike Wan's zero-initialised head, the head gets a small random init so that a randomly initialised
        tiny model produces non-trivial flows.
        """
        for m in self.modules():
            if isinstance(m, nn.Linear):
                bound = math.sqrt(6.0 / (m.in_features + m.out_features))
                m.weight.copy_(torch.rand(m.weight.shape, generator=generator) * 2 * bound - bound)
                m.bias.zero_()
        w = self.patch_embedding.weight
        bound = math.sqrt(6.0 / (w[0].numel() + w.shape[0]))
        w.copy_(torch.rand(w.shape, generator=generator) * 2 * bound - bound)
        self.patch_embedding.bias.zero_()
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    m.weight.copy_(torch.randn(m.weight.shape, generator=generator) * 0.02)
        for blk in self.blocks:
            blk.modulation.copy_(torch.randn(blk.modulation.shape, generator=generator) / self.config.dim**0.5)
        self.head.modulation.copy_(torch.randn(self.head.modulation.shape, generator=generator) / self.config.dim**0.5)
        if self.config.learned_positions is not None:  # unit scale, like the patch-embedded noise (0.02 is drowned)
            self.pos_embedding.copy_(torch.randn(self.pos_embedding.shape, generator=generator))

    def compile_blocks(self) -> None:
        """``torch.compile`` every transformer block in place (parameter names and state dict unchanged).

        Shapes change as the KV cache fills, so the first blocks of a video recompile; worth it for long runs.
        """
        for blk in self.blocks:
            blk.compile(dynamic=None)

    # ----------------------------------------------------------------- helpers
    def _embed_time(self, t: torch.Tensor, batch: int, frames: int) -> tuple[torch.Tensor, torch.Tensor]:
        """t (B,) or (B, F) on the 0..1000 scale -> e (B, F, D), e0 (B, F, 6, D)."""
        if t.dim() == 0:
            t = t.expand(batch)
        if t.dim() == 1:
            if t.shape[0] != batch:
                raise ValueError(f"timesteps of shape {tuple(t.shape)} do not match batch {batch}")
            t = t[:, None].expand(batch, frames)
        if t.shape != (batch, frames):
            raise ValueError(f"timesteps must be (B,) or (B, F) = ({batch}, {frames}), got {tuple(t.shape)}")
        dtype = self.time_embedding[0].weight.dtype
        s = sinusoidal_embedding(self.config.freq_dim, t.reshape(-1)).to(dtype)
        e = self.time_embedding(s)  # (B*F, D)
        e0 = self.time_projection(e).view(batch, frames, 6, self.config.dim)
        return e.view(batch, frames, self.config.dim), e0

    def _embed_text(self, context: torch.Tensor) -> torch.Tensor:
        """(B, Lc <= text_len, text_dim) -> zero-pad to text_len -> (B, text_len, D)."""
        cfg = self.config
        if context.dim() != 3 or context.shape[-1] != cfg.text_dim:
            raise ValueError(f"text context must be (B, L, {cfg.text_dim}), got {tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ValueError(f"text context has {context.shape[1]} rows, more than text_len={cfg.text_len}")
        if context.shape[1] < cfg.text_len:
            context = F.pad(context, (0, 0, 0, cfg.text_len - context.shape[1]))
        return self.text_embedding(context.to(self.text_embedding[0].weight.dtype))

    def _learned_positions(self, positions: Sequence[int], tokens_per_frame: int) -> torch.Tensor:
        """Absolute latent-frame positions -> (F * S, D) rows of ``pos_embedding``: frame ``p`` takes block row
        ``p mod n`` in the first block (``p < n``) and ``n + p mod n`` after it, then one row per token."""
        block, tokens = self.config.learned_positions
        if tokens != tokens_per_frame:
            raise ValueError(
                f"learned_positions holds {tokens} tokens per frame, the latents give {tokens_per_frame}: "
                "this DiT was built for another latent size"
            )
        rows = [p % block + (block if p >= block else 0) for p in positions]
        rows = torch.tensor(rows, device=self.pos_embedding.device)
        return self.pos_embedding[rows].flatten(0, 1)  # (F * S, D)

    def _unpatchify(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """(B, L, p_t*p_h*p_w*C) channel-last patches -> (B, F, C, H, W)."""
        b = out.shape[0]
        f, hp, wp = grid
        pt, ph, pw = self.config.patch_size
        c = self.config.out_dim
        u = out.view(b, f, hp, wp, pt, ph, pw, c)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u).reshape(b, c, f * pt, hp * ph, wp * pw)
        return u.permute(0, 2, 1, 3, 4)

    # ----------------------------------------------------------------- forward
    def forward(
        self,
        x: torch.Tensor,  # (B, F, C, H, W) noisy latents of the new frames
        t: torch.Tensor,  # (B,) or (B, F) timesteps on the 0..1000 scale
        context: torch.Tensor,  # (B, L <= text_len, text_dim) text features
        *,
        causal: CausalWindow | None = None,
        start_frame: int = 0,
        frame_positions: Sequence[int] | None = None,
        kv_cache: KVCache | None = None,
        cache_write: bool = False,
    ) -> torch.Tensor:
        """Flow prediction (B, F, C, H, W).

        ``causal=None`` and no cache: bidirectional attention. With ``causal`` (or a cache, which carries
        its own causal window) frames attend block-causally. ``frame_positions`` (absolute latent-frame indices for
        RoPE and the window rule) default to ``start_frame .. start_frame + F - 1``. A cache with
        ``rope="cache_relative"`` rotates by window slot instead (:mod:`astrolabe.models.wan.attention`). With ``cache_write``
        the new frames' keys/values are committed to ``kv_cache`` after the forward (the context pass).
        """
        cfg = self.config
        if x.dim() != 5 or x.shape[2] != cfg.in_dim:
            raise ValueError(f"latents must be (B, F, {cfg.in_dim}, H, W), got {tuple(x.shape)}")
        b, nf, _, h, w = x.shape
        positions = list(frame_positions) if frame_positions is not None else list(range(start_frame, start_frame + nf))
        if len(positions) != nf:
            raise ValueError(f"{len(positions)} frame positions given for {nf} frames")
        if kv_cache is not None:
            if causal is not None and causal != kv_cache.causal:
                raise ValueError(f"causal window {causal} differs from the cache's {kv_cache.causal}")
            causal = kv_cache.causal
        if cache_write and kv_cache is None:
            raise ValueError("cache_write=True needs a kv_cache")
        if causal is not None and nf % causal.block_frames and kv_cache is None:
            raise ValueError(f"{nf} frames is not a multiple of block_frames={causal.block_frames}")

        tokens = self.patch_embedding(x.permute(0, 2, 1, 3, 4).to(self.patch_embedding.weight.dtype))
        grid = tuple(tokens.shape[2:])  # (F, Hp, Wp)
        s = grid[1] * grid[2]
        tokens = tokens.flatten(2).transpose(1, 2)  # (B, L, D)
        if cfg.learned_positions is not None:
            tokens = tokens + self._learned_positions(positions, s).to(tokens.dtype)
        if kv_cache is not None and kv_cache.tokens_per_frame != s:
            raise ValueError(f"cache holds {kv_cache.tokens_per_frame} tokens per frame, latents give {s}")

        e, e0 = self._embed_time(t.to(x.device), b, nf)
        ctx = self._embed_text(context)

        cached_pos = kv_cache.positions if kv_cache is not None else []
        origin = kv_cache.origin_for(positions) if kv_cache is not None else min(positions)
        plan = plan_attention(cached_pos + positions, nf, causal, origin)
        freqs: torch.Tensor | SlotRope
        if kv_cache is not None and kv_cache.rope == "cache_relative":
            freqs = slot_rope(self._rope, plan, len(cached_pos), (grid[1], grid[2]))
        else:
            freqs = rope_frequencies(self._rope, positions, (grid[1], grid[2]))

        for i, blk in enumerate(self.blocks):
            args = (e0, ctx, freqs, plan, s, self.attention_backend, kv_cache, i, cache_write)
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(blk, tokens, *args, use_reentrant=False)
            else:
                tokens = blk(tokens, *args)
        if cache_write:
            kv_cache.commit(positions)
        out = self.head(tokens, e)
        return self._unpatchify(out, grid).to(x.dtype)
