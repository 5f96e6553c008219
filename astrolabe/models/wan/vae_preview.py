"""A tiny Wan VAE whose decoder *is* the Wan2.1 latent preview: pixels respond smoothly to latents.

The tiny CPU model has random weights, and a randomly initialised VAE decoder is a chaotic function of
its latents (every stage renormalises with RMSNorm): a reward measured on its pixels barely follows any
direction the DiT can move, so the tiny default could not show learning. This module instead sets the
decoder's weights (same architecture, same ``state_dict`` keys) so that decoding is the well-known
linear latent-to-RGB preview of Wan2.1 (the 16x3 factors ComfyUI uses for its live previews, a fit of
the real decoder's first-order response), through a smooth saturation:

    p(z)      = F^T z + b                               z: (16,) normalised latent, F: (16, 3), b: (3,)
    pixel(z)  = A p / sqrt(2 |p|^2 + C^2)               A = C = ``PREVIEW_LEVEL`` (slope 1 at p = 0)

upsampled nearest x8 in space and repeated over the 4 pixel frames of every latent frame after the
first. How the architecture computes it:

* ``conv1`` (causal 3x3x3, on *raw* latents ``mu = z * std + mean``): only the current-frame,
  centre tap; channels ``[p, -p, C, 0, ...]`` (weights ``F^T / std``, bias ``b - F^T mean / std``).
* every residual block: last conv zeroed (the branch adds 0), width-changing shortcuts are
  identity embeddings; the middle attention's output projection is zeroed (identity).
* ``upsample2d`` / ``upsample3d`` convs: centre-tap identity on the first channels; the causal
  ``time_conv`` copies the current frame into both interleaved frames.
* head: ``RMSNorm`` maps ``x = [p, -p, C, 0...]`` (8 channels) to ``sqrt(8) x / ||x||``, and the
  head conv takes ``SiLU(u) - SiLU(-u) = u`` on channel pairs ``(k, k + 3)``, so the saturation above
  is the only non-linearity.

Only the decoder is set; the encoder keeps its random init (nothing in training encodes pixels).
:func:`preview_latents` is the decoder's analytic inverse (what the world model is pretrained on): the
mean pixel of each 8x8 cell and latent frame's pixel frames, desaturated, mapped to the least-norm ``z``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from astrolabe.models.wan.vae_blocks import AttentionBlock, CausalConv3d, Resample, ResidualBlock

__all__ = [
    "WAN21_LATENT_RGB_BIAS",
    "WAN21_LATENT_RGB_FACTORS",
    "PREVIEW_LEVEL",
    "init_preview_decoder_",
    "latent_cell_means",
    "preview_latents",
    "preview_pixels",
    "preview_video",
]

WAN21_LATENT_RGB_FACTORS: tuple[tuple[float, float, float], ...] = (
    (-0.1299, -0.1692, 0.2932), (0.0671, 0.0406, 0.0442), (0.3568, 0.2548, 0.1747), (0.0372, 0.2344, 0.1420),
    (0.0313, 0.0189, -0.0328), (0.0296, -0.0956, -0.0665), (-0.3477, -0.4059, -0.2925), (0.0166, 0.1902, 0.1975),
    (-0.0412, 0.0267, -0.1364), (-0.1293, 0.0740, 0.1636), (0.0680, 0.3019, 0.1128), (0.0032, 0.0581, 0.0639),
    (-0.1251, 0.0927, 0.1699), (0.0060, -0.0633, 0.0005), (0.3477, 0.2275, 0.2950), (0.1984, 0.0913, 0.1861),
)  # fmt: skip
"""Wan2.1 normalised latent channel -> (R, G, B) preview factors (ComfyUI ``latent_formats.Wan21``)."""

WAN21_LATENT_RGB_BIAS: tuple[float, float, float] = (-0.1835, -0.0868, -0.3360)

PREVIEW_LEVEL = 2.0
"""The constant channel C and gain A of the saturation (A = C: slope 1 at p = 0; |pixel| < A / sqrt(2))."""

_RGB = 3
_CARRIED = 2 * _RGB + 1  # [p, -p, C]


def preview_pixels(z: Tensor) -> Tensor:
    """The preview decode of normalised latents at latent resolution: (B, 16, F, h, w) -> (B, 3, F, h, w).

    ``pixel = A p / sqrt(2 |p|^2 + C^2)`` with ``p = F^T z + b`` (see the module docstring).
    """
    factors = torch.tensor(WAN21_LATENT_RGB_FACTORS, dtype=z.dtype, device=z.device)  # (16, 3)
    bias = torch.tensor(WAN21_LATENT_RGB_BIAS, dtype=z.dtype, device=z.device).view(1, _RGB, 1, 1, 1)
    p = torch.einsum("bcfhw,ck->bkfhw", z, factors) + bias  # (B, 3, F, h, w)
    level = PREVIEW_LEVEL
    return level * p / torch.sqrt(2.0 * p.square().sum(dim=1, keepdim=True) + level**2)


def preview_video(z: Tensor, spatial: int = 8, temporal: int = 4) -> Tensor:
    """What the preview-initialised decoder computes, without running it: normalised latents (B, 16, F, h, w)
    -> pixels (B, 3, 1 + 4(F - 1), 8h, 8w) in [-1, 1] (:func:`preview_pixels` upsampled nearest x8, latent
    frame 0 once and every later one 4 times). Equal to ``WanVAE.decode`` after :func:`init_preview_decoder_`
    (tested), and much cheaper on CPU."""
    cells = preview_pixels(z)  # (B, 3, F, h, w)
    repeats = torch.tensor([1] + [temporal] * (z.shape[2] - 1), device=z.device)
    frames = cells.repeat_interleave(repeats, dim=2)  # (B, 3, T, h, w)
    pixels = frames.repeat_interleave(spatial, dim=3).repeat_interleave(spatial, dim=4)
    return pixels.clamp(-1.0, 1.0)


def latent_cell_means(video: Tensor, spatial: int = 8, temporal: int = 4) -> Tensor:
    """Mean of ``video`` (B, C, 1 + 4k, H, W) over each latent cell: (B, C, 1 + k, H / 8, W / 8).

    Latent frame 0 is pixel frame 0, frame j >= 1 the pixel frames 4j-3 .. 4j (what the decoder repeats);
    spatially the ``spatial x spatial`` cells. Any channel count (colours, or a coverage mask with C = 1).
    """
    b, c, t, h, w = video.shape
    if (t - 1) % temporal or h % spatial or w % spatial:
        raise ValueError(f"video must be (B, C, 1 + {temporal}k, H, W) with H, W multiples of {spatial}, got {tuple(video.shape)}")
    first = video[:, :, :1]  # (B, C, 1, H, W)
    rest = video[:, :, 1:].reshape(b, c, (t - 1) // temporal, temporal, h, w).mean(dim=3)  # (B, C, k, H, W)
    frames = torch.cat([first, rest], dim=2)  # (B, C, F, H, W)
    return frames.reshape(b, c, -1, h // spatial, spatial, w // spatial, spatial).mean(dim=(4, 6))


def preview_latents(video: Tensor, spatial: int = 8, temporal: int = 4, max_norm2: float = 1.95) -> Tensor:
    """Least-norm normalised latents whose preview decode best fits ``video``: the preview decoder's inverse.

    video (B, 3, 1 + 4k, H, W) in [-1, 1] -> z (B, 16, 1 + k, H / 8, W / 8). Per latent cell, ``y`` = mean
    of its pixels (latent frame 0: pixel frame 0; frame j >= 1: pixel frames 4j-3 .. 4j, which the decoder
    repeats), the L2-best constant. ``|y|^2`` is clipped to ``max_norm2 < 2`` (the saturation's range: very
    bright colours are dimmed), then ``p = C y / sqrt(A^2 - 2 |y|^2)`` inverts ``y = A p / sqrt(2|p|^2 + C^2)``
    and ``z = F (F^T F)^{-1} (p - b)`` is the least-norm solution of ``F^T z + b = p``.
    """
    if video.shape[1] != _RGB:
        raise ValueError(f"video must be (B, 3, 1 + {temporal}k, H, W), got {tuple(video.shape)}")
    y = latent_cell_means(video, spatial, temporal)  # (B, 3, F, h, w)
    norm2 = y.square().sum(dim=1, keepdim=True)
    y = y * torch.sqrt(torch.clamp(max_norm2 / norm2.clamp_min(1e-12), max=1.0))
    p = PREVIEW_LEVEL * y / torch.sqrt(PREVIEW_LEVEL**2 - 2.0 * y.square().sum(dim=1, keepdim=True))
    factors = torch.tensor(WAN21_LATENT_RGB_FACTORS, dtype=torch.float64)  # (16, 3)
    solve = (factors @ torch.linalg.inv(factors.T @ factors)).to(video)  # (16, 3)
    bias = torch.tensor(WAN21_LATENT_RGB_BIAS, dtype=video.dtype, device=video.device).view(1, _RGB, 1, 1, 1)
    return torch.einsum("ck,bkfhw->bcfhw", solve.to(video.device), p - bias)


def _zero_(module: nn.Module) -> None:
    for param in module.parameters(recurse=False):
        nn.init.zeros_(param)


def _current_centre_tap(weight: Tensor) -> tuple[slice | int, ...]:
    """Index of the causal current-frame (last temporal) and spatial-centre tap of a conv weight."""
    k = weight.shape[2:]
    if len(k) == 3:
        return (..., k[0] - 1, k[1] // 2, k[2] // 2)
    return (..., k[0] // 2, k[1] // 2)


def _set_identity_(conv: nn.Conv2d | nn.Conv3d, copies: int = 1) -> None:
    """``out[j] = in[j mod in_channels]`` on the current-frame centre tap (``copies`` stacked blocks)."""
    _zero_(conv)
    with torch.no_grad():
        tap = conv.weight[_current_centre_tap(conv.weight)]  # (out, in) view
        block = conv.out_channels // copies
        n = min(block, conv.in_channels)
        for c in range(copies):
            tap[c * block : c * block + n, :n] += torch.eye(n, dtype=tap.dtype, device=tap.device)


def _init_input_conv_(conv: CausalConv3d, mean: Tensor, std: Tensor) -> None:
    """Raw latents -> ``[p, -p, C, 0...]`` with ``p = F^T (mu - mean) / std + b``."""
    _zero_(conv)
    if conv.out_channels < _CARRIED + 1:
        raise ValueError(f"the preview decoder needs >= {_CARRIED + 1} channels, the VAE has {conv.out_channels}")
    factors = torch.tensor(WAN21_LATENT_RGB_FACTORS, dtype=torch.float64).T / std  # (3, 16)
    bias = torch.tensor(WAN21_LATENT_RGB_BIAS, dtype=torch.float64) - factors @ mean  # (3,)
    with torch.no_grad():
        tap = conv.weight[_current_centre_tap(conv.weight)]  # (out, z_dim)
        tap[:_RGB] = factors.to(tap)
        tap[_RGB : 2 * _RGB] = -factors.to(tap)
        conv.bias[:_RGB] = bias.to(conv.bias)
        conv.bias[_RGB : 2 * _RGB] = -bias.to(conv.bias)
        conv.bias[2 * _RGB] = PREVIEW_LEVEL


def _init_head_conv_(conv: CausalConv3d, width: int) -> None:
    """``RMSNorm`` output ``u = sqrt(width) x / ||x||`` -> ``A (SiLU(u_k) - SiLU(u_{k+3})) / sqrt(width)``."""
    _zero_(conv)
    gain = PREVIEW_LEVEL / math.sqrt(width)
    with torch.no_grad():
        tap = conv.weight[_current_centre_tap(conv.weight)]  # (3, width)
        for k in range(_RGB):
            tap[k, k] = gain
            tap[k, k + _RGB] = -gain


def init_preview_decoder_(vae: nn.Module) -> nn.Module:
    """Set ``vae.decoder`` (and ``conv2``) in place so that ``vae.decode(z)`` is the latent preview.

    ``vae`` is a :class:`~astrolabe.models.wan.vae.WanVAE` of any width with at least 8 channels at
    every decoder stage (``tiny_vae()`` has 8 at its narrowest). Returns ``vae``.
    """
    cfg = vae.config
    mean = torch.tensor(cfg.latent_mean, dtype=torch.float64)
    std = torch.tensor(cfg.latent_std, dtype=torch.float64)
    _set_identity_(vae.conv2)  # the 1x1x1 latent conv before the decoder
    decoder = vae.decoder
    _init_input_conv_(decoder.conv1, mean, std)
    for module in decoder.modules():
        if isinstance(module, ResidualBlock):
            _zero_(module.residual[-1])
            if isinstance(module.shortcut, CausalConv3d):
                _set_identity_(module.shortcut)
        elif isinstance(module, AttentionBlock):
            _zero_(module.proj)
        elif isinstance(module, Resample):
            _set_identity_(module.resample[1])
            if module.time_conv is not None:
                _set_identity_(module.time_conv, copies=2)
    head_norm, _, head_conv = decoder.head
    nn.init.ones_(head_norm.gamma)
    _init_head_conv_(head_conv, head_conv.in_channels)
    return vae
