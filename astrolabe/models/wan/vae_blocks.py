"""Building blocks of the Wan2.1 causal 3D VAE: the feature cache, causal convolutions and layers.

See :mod:`astrolabe.models.wan.vae` for the model, its layout conventions and the causality rules these
blocks implement. Every block that needs state between chunks of a causal pass takes a
:class:`FeatureCache`; module names mirror Wan's ``WanVAE_`` so ``state_dict()`` keys match the file.
"""

from __future__ import annotations

import enum

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CACHE_T",
    "AttentionBlock",
    "CausalConv3d",
    "FeatureCache",
    "NearestUpsample2x",
    "RMSNorm",
    "Resample",
    "ResidualBlock",
    "cached_causal_conv",
    "head_block",
    "middle_block",
    "run_sequence",
]

CACHE_T = 2
"""Frames of the previous chunk that each 3-tap causal conv keeps (= its left receptive field)."""


# --------------------------------------------------------------------------------------------------
# Feature cache
# --------------------------------------------------------------------------------------------------


class _Marker(enum.Enum):
    """State of an ``upsample3d`` slot after the first latent frame (Wan's ``'Rep'`` sentinel)."""

    FIRST_FRAME_SEEN = "first_frame_seen"


_Slot = Tensor | _Marker


class FeatureCache:
    """Per-module state carried between chunks of a causal pass (Wan's ``feat_cache`` list).

    Slots are keyed by module identity: a 3-tap :class:`CausalConv3d` stores its last ``CACHE_T``
    input frames; ``downsample3d`` stores its last output frame; ``upsample3d`` stores a marker after
    the first latent frame, then the last ``CACHE_T`` inputs of its ``time_conv``.
    """

    def __init__(self) -> None:
        self._slots: dict[nn.Module, _Slot] = {}

    def get(self, module: nn.Module) -> _Slot | None:
        return self._slots.get(module)

    def put(self, module: nn.Module, value: _Slot) -> None:
        self._slots[module] = value

    def clear(self) -> None:
        self._slots.clear()

    def detach_(self) -> None:
        """Cut the autograd graph to earlier chunks (keeps memory flat when streaming with grad on)."""
        for key, value in self._slots.items():
            if isinstance(value, Tensor):
                self._slots[key] = value.detach()

    def __len__(self) -> int:
        return len(self._slots)

    def numel(self) -> int:
        """Total elements held (constant once every slot is filled)."""
        return sum(v.numel() for v in self._slots.values() if isinstance(v, Tensor))


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Conv3d):
    """Conv3d, zero padded ``2 * p_t`` frames on the left only; spatial padding symmetric.

    With ``cache`` (``(B, C, c, H, W)``, ``c <= 2p_t`` frames preceding ``x``) the cached frames
    replace ``c`` of the left zero frames: ``y = conv(pad(cat[cache, x]))``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int, int],
        stride: int | tuple[int, int, int] = 1,
        padding: int | tuple[int, int, int] = 0,
    ) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride=stride, padding=padding)
        pt, ph, pw = self.padding  # type: ignore[misc]
        # F.pad order: (w_left, w_right, h_top, h_bottom, t_left, t_right)
        self._causal_pad: tuple[int, int, int, int, int, int] = (pw, pw, ph, ph, 2 * pt, 0)
        self.padding = (0, 0, 0)

    def forward(self, x: Tensor, cache: Tensor | None = None) -> Tensor:  # (B, C, T, H, W)
        pad = list(self._causal_pad)
        if cache is not None and pad[4] > 0:
            x = torch.cat([cache.to(x.device, x.dtype), x], dim=2)
            pad[4] -= cache.shape[2]
        return super().forward(F.pad(x, pad))


def cached_causal_conv(conv: CausalConv3d, x: Tensor, cache: FeatureCache) -> Tensor:
    """Apply ``conv`` to chunk ``x`` (B, C, t, H, W) with its cached predecessors, then update the slot.

    The slot becomes the last ``CACHE_T`` frames of ``[previous slot, x]`` (Wan keeps only one
    frame of the previous slot when ``t < CACHE_T``).
    """
    prev = cache.get(conv)
    assert prev is None or isinstance(prev, Tensor)
    keep = x[:, :, -CACHE_T:].clone()
    if keep.shape[2] < CACHE_T and prev is not None:
        keep = torch.cat([prev[:, :, -1:].to(keep.device, keep.dtype), keep], dim=2)
    out = conv(x, prev)
    cache.put(conv, keep)
    return out


class RMSNorm(nn.Module):
    """``y = x / max(||x||_2 over channels, 1e-12) * sqrt(C) * gamma`` (no bias).

    ``gamma`` has shape (C, 1, 1, 1) for video tensors (B, C, T, H, W) and (C, 1, 1) for images
    (N, C, H, W), exactly as Wan's ``RMS_norm``.
    """

    def __init__(self, dim: int, images: bool) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones((dim, 1, 1) if images else (dim, 1, 1, 1)))

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(x, dim=1) * self.scale * self.gamma


class NearestUpsample2x(nn.Module):
    """Nearest-neighbour x2 along H and W of (N, C, H, W); parameter-free (Wan's ``resample.0``)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.interpolate(x, scale_factor=2.0, mode="nearest-exact")


def _per_frame(fn: nn.Module, x: Tensor) -> Tensor:
    """Apply a 2-D module to every frame: (B, C, T, H, W) -> (B, C', T, H', W')."""
    b, c, t, h, w = x.shape
    y = fn(x.transpose(1, 2).reshape(b * t, c, h, w))  # (B*T, C', H', W')
    return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


def _interleave_time(x: Tensor) -> Tensor:
    """(B, 2C, T, H, W) -> (B, C, 2T, H, W): channel half 0 gives even frames, half 1 odd frames."""
    b, c2, t, h, w = x.shape
    x = x.reshape(b, 2, c2 // 2, t, h, w)
    return torch.stack((x[:, 0], x[:, 1]), dim=3).reshape(b, c2 // 2, 2 * t, h, w)


class ResidualBlock(nn.Module):
    """``x + f(x)`` with f = RMSNorm, SiLU, CausalConv3d(3), RMSNorm, SiLU, Dropout, CausalConv3d(3);
    the skip is a 1x1x1 conv when the width changes. Keys: residual.{0,2,3,6}, shortcut."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim, images=False),
            nn.SiLU(),
            CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim, images=False),
            nn.SiLU(),
            nn.Dropout(dropout),
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut: nn.Module = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:  # (B, C, t, H, W)
        h = self.shortcut(x)
        for layer in self.residual:
            x = cached_causal_conv(layer, x, cache) if isinstance(layer, CausalConv3d) else layer(x)
        return x + h


class AttentionBlock(nn.Module):
    """Per-frame single-head spatial self-attention with a residual:
    ``x + proj(softmax(q k^T / sqrt(C)) v)`` with q, k, v = to_qkv(RMSNorm(x)) over the H*W tokens."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)
        nn.init.zeros_(self.proj.weight)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, T, H, W)
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))  # (BT, C, H, W)
        qkv = self.to_qkv(y).reshape(b * t, 1, c * 3, h * w).permute(0, 1, 3, 2)  # (BT, 1, HW, 3C)
        q, k, v = qkv.contiguous().chunk(3, dim=-1)  # (BT, 1, HW, C) each
        y = F.scaled_dot_product_attention(q, k, v)  # (BT, 1, HW, C)
        y = y.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        y = self.proj(y)
        return x + y.reshape(b, t, c, h, w).transpose(1, 2)


class Resample(nn.Module):
    """Spatial x2 down/up-sampling, optionally with a causal temporal x2 (Wan's ``Resample``).

    * ``downsample2d``: per frame, zero pad right/bottom by 1, Conv2d(3, stride 2).
    * ``downsample3d``: the same, then ``time_conv`` (3,1,1) stride 2 over ``[last frame of the
      previous chunk, chunk]``; the first chunk passes through (its frame is cached).
    * ``upsample2d``: per frame, nearest x2 then Conv2d(3, pad 1) halving channels.
    * ``upsample3d``: first ``time_conv`` (3,1,1) C -> 2C causal, interleaved to 2x frames
      (skipped on the first latent frame), then the ``upsample2d`` path.
    """

    MODES = ("upsample2d", "upsample3d", "downsample2d", "downsample3d")

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        if mode not in self.MODES:
            raise ValueError(f"Resample mode must be one of {self.MODES}, got {mode!r}")
        self.mode = mode
        self.resample: nn.Sequential
        self.time_conv: CausalConv3d | None = None
        if mode.startswith("upsample"):
            self.resample = nn.Sequential(NearestUpsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
            if mode == "upsample3d":
                self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))
        else:
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=(2, 2)))
            if mode == "downsample3d":
                self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), padding=(0, 0, 0))

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:  # (B, C, t, H, W)
        if self.mode == "upsample3d":
            x = self._temporal_upsample(x, cache)  # (B, C, t or 2t, H, W)
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._temporal_downsample(x, cache)
        return x

    def _temporal_upsample(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """Causal ``time_conv`` to 2C channels, interleaved into 2t frames; identity on the first call."""
        assert self.time_conv is not None
        prev = cache.get(self.time_conv)
        if prev is None:
            cache.put(self.time_conv, _Marker.FIRST_FRAME_SEEN)
            return x
        keep = x[:, :, -CACHE_T:].clone()
        if keep.shape[2] < CACHE_T:
            head = torch.zeros_like(keep) if isinstance(prev, _Marker) else prev[:, :, -1:].to(keep)
            keep = torch.cat([head, keep], dim=2)
        y = self.time_conv(x, None if isinstance(prev, _Marker) else prev)  # (B, 2C, t, H, W)
        cache.put(self.time_conv, keep)
        return _interleave_time(y)

    def _temporal_downsample(self, x: Tensor, cache: FeatureCache) -> Tensor:
        """Stride-2 ``time_conv`` over ``[previous last frame, x]``; the first chunk passes through."""
        assert self.time_conv is not None
        prev = cache.get(self.time_conv)
        if prev is None:
            cache.put(self.time_conv, x.clone())
            return x
        assert isinstance(prev, Tensor)
        keep = x[:, :, -1:].clone()
        y = self.time_conv(torch.cat([prev[:, :, -1:].to(x), x], dim=2))
        cache.put(self.time_conv, keep)
        return y


def head_block(in_dim: int, out_dim: int) -> nn.Sequential:
    """RMSNorm, SiLU, CausalConv3d(3): keys head.0.gamma, head.2.{weight,bias}."""
    return nn.Sequential(RMSNorm(in_dim, images=False), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1))


def middle_block(dim: int, dropout: float) -> nn.Sequential:
    """Residual, attention, residual at the lowest resolution: keys middle.{0,1,2}."""
    return nn.Sequential(ResidualBlock(dim, dim, dropout), AttentionBlock(dim), ResidualBlock(dim, dim, dropout))


def run_sequence(layers: nn.Sequential, x: Tensor, cache: FeatureCache) -> Tensor:
    """Run a Sequential of residual / attention / resample / norm / activation / conv layers chunk-wise."""
    for layer in layers:
        if isinstance(layer, (ResidualBlock, Resample)):
            x = layer(x, cache)
        elif isinstance(layer, CausalConv3d):
            x = cached_causal_conv(layer, x, cache)
        else:
            x = layer(x)
    return x
