"""Wan2.1 causal 3D VAE (``Wan2.1_VAE.pth``): exact re-implementation with chunked and streaming codecs.

Reference: ``shared/reference/models-reference.md`` section 2. Module names mirror the original
``WanVAE_`` so that ``state_dict()`` keys are exactly the keys of the released file (194 tensors,
126,892,531 parameters for :func:`wan21_vae`), and the file loads with ``strict=True``.

Layout conventions: pixels ``(B, 3, T, H, W)`` in [-1, 1] with ``T = 1 + 4k``; latents
``(B, 16, F, H/8, W/8)`` with ``F = 1 + k``, normalised per channel as ``z = (mu - mean) / std``.

Causality. Every temporal convolution is causal (left-only zero padding of ``2p`` frames). Encoding
runs over chunks of ``1, 4, 4, ...`` frames (one latent frame per chunk), decoding over one latent
frame at a time; a :class:`FeatureCache` carries the last ``CACHE_T = 2`` input frames of every
3-tap temporal convolution from one chunk to the next, so the chunked pass equals one causal pass
over the whole sequence, with two deliberate exceptions inherited from Wan:

* ``downsample3d`` passes the first chunk through without its temporal conv (1 frame -> 1 latent);
  later chunks run the stride-2 conv on ``[last frame of previous chunk, chunk]``.
* ``upsample3d`` skips its temporal conv (and the frame doubling) on the first latent frame
  (1 latent -> 1 pixel frame); the ``time_conv`` then runs causally, zero padded, over the frames
  of latents 1, 2, ... only.

Because the cache is all the state there is, a latent video can be decoded block by block
(:class:`StreamingDecoder`, :func:`decode_stream`) with memory independent of its length.

The cache and the layers live in :mod:`astrolabe.models.wan.vae_blocks`; ``CACHE_T`` and
:class:`FeatureCache` are re-exported here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from astrolabe.configbase import Frozen
from astrolabe.models.wan.vae_blocks import (
    CACHE_T,
    CausalConv3d,
    FeatureCache,
    Resample,
    ResidualBlock,
    cached_causal_conv,
    head_block,
    middle_block,
    run_sequence,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_T",
    "WAN21_LATENT_MEAN",
    "WAN21_LATENT_STD",
    "WAN21_VAE_FILENAME",
    "WAN21_VAE_HF_REPO",
    "WanVAEConfig",
    "wan21_vae",
    "tiny_vae",
    "FeatureCache",
    "WanVAE",
    "StreamingDecoder",
    "decode_stream",
    "normalize_latents",
    "denormalize_latents",
    "check_state_dict",
    "load_wan_vae",
    "vae_from_pretrained_dir",
]

WAN21_LATENT_MEAN: tuple[float, ...] = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
WAN21_LATENT_STD: tuple[float, ...] = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

WAN21_VAE_FILENAME = "Wan2.1_VAE.pth"
WAN21_VAE_HF_REPO = "Wan-AI/Wan2.1-T2V-1.3B"


# --------------------------------------------------------------------------------------------------
# Config and size builders
# --------------------------------------------------------------------------------------------------


class WanVAEConfig(Frozen):
    """Architecture of the Wan2.1 VAE (``WanVAE_``). Sizes live only in the builders below.

    Stage widths are ``dim * dim_mult[i]``; the encoder downsamples spatially by 2 after every stage
    but the last (spatial factor ``2 ** (len(dim_mult) - 1)``) and temporally where
    ``temporal_downsample[i]`` is true (temporal factor ``2 ** sum(temporal_downsample)``); the
    decoder mirrors it. Attention sits only in the two middle blocks (Wan's ``attn_scales=[]``).
    """

    dim: int = Field(96, ge=2, description="base channel width (must be even: upsamplers halve it)")
    z_dim: int = Field(16, ge=1, description="latent channels (the encoder head emits 2 * z_dim)")
    dim_mult: tuple[int, ...] = Field((1, 2, 4, 4), min_length=1)
    num_res_blocks: int = Field(2, ge=1, description="residual blocks per encoder stage (decoder: +1)")
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    latent_mean: tuple[float, ...] = WAN21_LATENT_MEAN
    latent_std: tuple[float, ...] = WAN21_LATENT_STD

    @model_validator(mode="after")
    def _check(self) -> WanVAEConfig:
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample has {len(self.temporal_downsample)} entries but dim_mult has "
                f"{len(self.dim_mult)} stages: give one flag per downsampling step (len(dim_mult) - 1)"
            )
        if any(m < 1 for m in self.dim_mult):
            raise ValueError(f"dim_mult entries must be >= 1, got {self.dim_mult}")
        if any((self.dim * m) % 2 for m in self.dim_mult):
            raise ValueError(f"dim * dim_mult[i] must be even (upsamplers halve channels); dim={self.dim}")
        for name in ("latent_mean", "latent_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} values but z_dim={self.z_dim}: give one per latent channel"
                )
        if any(not (s > 0 and math.isfinite(s)) for s in self.latent_std):
            raise ValueError(f"latent_std values must be finite and > 0, got {self.latent_std}")
        if any(not math.isfinite(m) for m in self.latent_mean):
            raise ValueError(f"latent_mean values must be finite, got {self.latent_mean}")
        return self

    @property
    def spatial_factor(self) -> int:
        """Pixels per latent along H and W (8 for Wan2.1)."""
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def temporal_factor(self) -> int:
        """Pixel frames per latent frame after the first (4 for Wan2.1)."""
        return 2 ** sum(self.temporal_downsample)

    @property
    def temporal_upsample(self) -> tuple[bool, ...]:
        """Decoder temporal flags: the encoder's, reversed."""
        return tuple(reversed(self.temporal_downsample))


def wan21_vae() -> WanVAEConfig:
    """The released Wan2.1 VAE: 126,892,531 parameters, 194 tensors."""
    return WanVAEConfig()


def tiny_vae() -> WanVAEConfig:
    """Same structure and key names as :func:`wan21_vae` (only the widths shrink): for CPU tests."""
    return WanVAEConfig(dim=8)


# --------------------------------------------------------------------------------------------------
# Encoder and decoder
# --------------------------------------------------------------------------------------------------


class Encoder3d(nn.Module):
    """Pixels (B, 3, t, H, W) -> moments (B, 2*z_dim, t', H/8, W/8) for one chunk (t=1 first, else 4)."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        dims = [cfg.dim * m for m in (1, *cfg.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode))
        self.downsamples = nn.Sequential(*blocks)
        self.middle = middle_block(dims[-1], cfg.dropout)
        self.head = head_block(dims[-1], 2 * cfg.z_dim)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = cached_causal_conv(self.conv1, x, cache)
        x = run_sequence(self.downsamples, x, cache)
        x = run_sequence(self.middle, x, cache)
        return run_sequence(self.head, x, cache)


class Decoder3d(nn.Module):
    """Raw latents (B, z_dim, 1, h, w) -> pixels (B, 3, 1 or 4, 8h, 8w), one latent frame per call."""

    def __init__(self, cfg: WanVAEConfig) -> None:
        super().__init__()
        mult = cfg.dim_mult
        dims = [cfg.dim * m for m in (mult[-1], *reversed(mult))]
        self.conv1 = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.middle = middle_block(dims[0], cfg.dropout)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
            if i > 0:
                in_dim //= 2  # the previous upsampler halved the channels
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim, cfg.dropout))
                in_dim = out_dim
            if i != len(mult) - 1:
                mode = "upsample3d" if cfg.temporal_upsample[i] else "upsample2d"
                blocks.append(Resample(out_dim, mode))
        self.upsamples = nn.Sequential(*blocks)
        self.head = head_block(dims[-1], 3)

    def forward(self, x: Tensor, cache: FeatureCache) -> Tensor:
        x = cached_causal_conv(self.conv1, x, cache)
        x = run_sequence(self.middle, x, cache)
        x = run_sequence(self.upsamples, x, cache)
        return run_sequence(self.head, x, cache)


# --------------------------------------------------------------------------------------------------
# Latent normalisation
# --------------------------------------------------------------------------------------------------


def _channel_stats(cfg: WanVAEConfig, like: Tensor) -> tuple[Tensor, Tensor]:
    """mean, std as (1, C, 1, 1, 1) tensors on ``like``'s device/dtype."""
    mean = torch.tensor(cfg.latent_mean, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latent_std, dtype=like.dtype, device=like.device).view(1, -1, 1, 1, 1)
    return mean, std


def normalize_latents(mu: Tensor, cfg: WanVAEConfig) -> Tensor:
    """``z = (mu - mean) * (1 / std)`` per channel; mu (B, C, F, h, w)."""
    mean, std = _channel_stats(cfg, mu)
    return (mu - mean) * (1.0 / std)


def denormalize_latents(z: Tensor, cfg: WanVAEConfig) -> Tensor:
    """``mu = z * std + mean`` per channel (Wan computes ``z / (1/std) + mean``); z (B, C, F, h, w)."""
    mean, std = _channel_stats(cfg, z)
    return z / (1.0 / std) + mean


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Outputs are at least float32 (bf16/fp16 models return float32, float64 models float64)."""
    return torch.promote_types(dtype, torch.float32)


class WanVAE(nn.Module):
    """Wan2.1 causal video VAE. ``state_dict()`` keys equal those of ``Wan2.1_VAE.pth``.

    Submodules: ``encoder``, ``conv1`` (1x1x1 quant conv on the 2*z_dim moments), ``conv2``
    (1x1x1 post-quant conv on z_dim channels), ``decoder``.
    """

    def __init__(self, config: WanVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or wan21_vae()
        z = self.config.z_dim
        self.encoder = Encoder3d(self.config)
        self.conv1 = CausalConv3d(2 * z, 2 * z, 1)
        self.conv2 = CausalConv3d(z, z, 1)
        self.decoder = Decoder3d(self.config)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    # ---- validation -------------------------------------------------------------------------------

    def check_video(self, video: Tensor) -> None:
        """Raise ValueError unless video is (B, 3, 1 + 4k, H, W) with H, W divisible by 8."""
        s, tf = self.config.spatial_factor, self.config.temporal_factor
        if video.ndim != 5:
            raise ValueError(
                f"video must be 5-D (B, 3, T, H, W), got shape {tuple(video.shape)}; "
                "add a batch dim with video.unsqueeze(0) or permute (B, T, C, H, W) with .permute(0, 2, 1, 3, 4)"
            )
        b, c, t, h, w = video.shape
        if c != 3:
            raise ValueError(f"video must have 3 channels (RGB) in dim 1, got {c} (shape {tuple(video.shape)})")
        if t < 1 or (t - 1) % tf:
            lo = 1 + tf * ((t - 1) // tf) if t >= 1 else 1
            raise ValueError(
                f"video must have 1 + {tf}k frames, got T={t}; trim to {lo} or pad to {lo + tf} frames"
            )
        if h % s or w % s or h == 0 or w == 0:
            raise ValueError(
                f"video height and width must be positive multiples of {s}, got H={h}, W={w}; crop or resize"
            )
        if not video.is_floating_point():
            raise ValueError(f"video must be a float tensor in [-1, 1], got dtype {video.dtype}; use x / 127.5 - 1")

    def check_latents(self, z: Tensor) -> None:
        """Raise ValueError unless z is (B, z_dim, F >= 1, h, w) floating point."""
        zc = self.config.z_dim
        if z.ndim != 5 or z.shape[1] != zc or z.shape[2] < 1 or z.shape[3] < 1 or z.shape[4] < 1:
            raise ValueError(
                f"latents must be (B, {zc}, F, h, w) with F, h, w >= 1, got shape {tuple(z.shape)}; "
                "the DiT emits (B, F, C, h, w): permute with .permute(0, 2, 1, 3, 4)"
            )
        if not z.is_floating_point():
            raise ValueError(f"latents must be a float tensor, got dtype {z.dtype}")

    # ---- encode -----------------------------------------------------------------------------------

    def encode_moments(self, video: Tensor) -> tuple[Tensor, Tensor]:
        """Raw posterior moments: video (B, 3, 1+4k, H, W) -> mu, log_var, each (B, z, 1+k, H/8, W/8).

        Chunks of 1, 4, 4, ... frames run through the encoder with a shared :class:`FeatureCache`;
        each chunk yields one latent frame; then the 1x1x1 ``conv1`` and a channel split.
        """
        self.check_video(video)
        x = video.to(self.device, self.dtype)
        tf = self.config.temporal_factor
        cache = FeatureCache()
        chunks = [x[:, :, :1]] + [x[:, :, i : i + tf] for i in range(1, x.shape[2], tf)]
        h = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)  # (B, 2z, F, h, w)
        mu, log_var = self.conv1(h).chunk(2, dim=1)
        return mu, log_var

    def encode(self, video: Tensor) -> Tensor:
        """Normalised deterministic latents ``(mu - mean) / std``: (B, 3, 1+4k, H, W) -> (B, 16, 1+k, H/8, W/8).

        Output dtype: float32 (float64 for a float64 model).
        """
        mu, _ = self.encode_moments(video)
        return normalize_latents(mu.to(_out_dtype(mu.dtype)), self.config)

    # ---- decode -----------------------------------------------------------------------------------

    def decode_raw_step(self, z_raw: Tensor, cache: FeatureCache) -> Tensor:
        """One step of the decode loop: un-normalised latents (B, z, f, h, w) -> pixels, unclamped.

        ``conv2`` then the decoder, one latent frame at a time, carrying ``cache``. The first latent
        frame ever seen by ``cache`` yields 1 pixel frame, every later one ``temporal_factor``.
        """
        x = self.conv2(z_raw)
        return torch.cat([self.decoder(x[:, :, i : i + 1], cache) for i in range(x.shape[2])], dim=2)

    def decode(self, z: Tensor) -> Tensor:
        """Normalised latents (B, 16, F, h, w) -> pixels (B, 3, 1 + 4(F-1), 8h, 8w) clamped to [-1, 1]."""
        return StreamingDecoder(self).decode_block(z)

    def num_pixel_frames(self, num_latent_frames: int) -> int:
        """1 + temporal_factor * (F - 1)."""
        return 1 + self.config.temporal_factor * (num_latent_frames - 1)


class StreamingDecoder:
    """Decode a long latent video block by block, carrying the decoder's feature cache across calls.

    Concatenating the outputs of :meth:`decode_block` over consecutive blocks equals
    :meth:`WanVAE.decode` of the whole latent video (the ops are the same, in the same order). With
    3-latent blocks the first block gives 9 pixel frames, every later block 12. Only the cache is
    kept between calls (its size is independent of the video length), and it is detached after each
    block: gradients do not flow into earlier blocks.
    """

    def __init__(self, vae: WanVAE) -> None:
        self.vae = vae
        self.cache = FeatureCache()
        self.latent_frames_seen = 0
        self._geometry: tuple[int, int, int] | None = None  # (B, h, w) of the stream

    def reset(self) -> None:
        """Start a new video."""
        self.cache.clear()
        self.latent_frames_seen = 0
        self._geometry = None

    def decode_block(self, z: Tensor) -> Tensor:
        """Normalised latents (B, 16, f, h, w) -> pixels (B, 3, n, 8h, 8w) in [-1, 1].

        n = 1 + 4(f - 1) for the first block of a stream, 4f afterwards.
        """
        vae = self.vae
        vae.check_latents(z)
        geometry = (z.shape[0], z.shape[3], z.shape[4])
        if self._geometry is not None and geometry != self._geometry:
            raise ValueError(
                f"latent block (B, h, w)={geometry} differs from the stream's {self._geometry}; "
                "call reset() before decoding a different video"
            )
        self._geometry = geometry
        z_raw = denormalize_latents(z.to(vae.device, _out_dtype(vae.dtype)), vae.config).to(vae.dtype)
        x = vae.decode_raw_step(z_raw, self.cache)
        self.cache.detach_()
        self.latent_frames_seen += z.shape[2]
        return x.to(_out_dtype(x.dtype)).clamp(-1.0, 1.0)


def decode_stream(vae: WanVAE, blocks: Iterable[Tensor]) -> Iterator[Tensor]:
    """Generator over pixel chunks of consecutive latent blocks of one video (see :class:`StreamingDecoder`)."""
    decoder = StreamingDecoder(vae)
    for block in blocks:
        yield decoder.decode_block(block)


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def _download_hint(path: Path) -> str:
    return (
        f"Download '{WAN21_VAE_FILENAME}' from the Hugging Face repo '{WAN21_VAE_HF_REPO}' "
        f"(e.g. `huggingface-cli download {WAN21_VAE_HF_REPO} {WAN21_VAE_FILENAME} --local-dir {path.parent}`) "
        "and put it in the configured model directory."
    )


def check_state_dict(state: Mapping[str, Tensor], expected: Mapping[str, Tensor], source: str, limit: int = 10) -> None:
    """Raise ValueError listing the first missing / unexpected / mis-shaped keys and non-finite tensors."""
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad_type = [k for k in state if k in expected and not isinstance(state[k], Tensor)]
    shaped = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state and isinstance(state[k], Tensor) and state[k].shape != expected[k].shape
    ]
    problems = []
    groups = (("missing", missing), ("unexpected", unexpected), ("not a tensor", bad_type), ("mis-shaped", shaped))
    for name, items in groups:
        if items:
            more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
            problems.append(f"{len(items)} {name}: {items[:limit]}{more}")
    if problems:
        raise ValueError(
            f"{source} does not match the Wan VAE layout ({len(expected)} tensors expected, {len(state)} found): "
            + "; ".join(problems)
            + ". Check that the file is the original Wan2.1_VAE.pth and that the config matches it."
        )
    nonfinite = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if nonfinite:
        raise ValueError(
            f"{source} has non-finite (NaN/Inf) values in {nonfinite[:limit]}: the file is corrupt; download it again"
        )


def load_wan_vae(
    path: str | Path,
    config: WanVAEConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> WanVAE:
    """Load ``Wan2.1_VAE.pth`` (a flat state dict) into a :class:`WanVAE` in eval mode, no grad.

    ``torch.load(weights_only=True, map_location="cpu")`` then ``load_state_dict(strict=True)``;
    the key / shape / finiteness checks run first so that errors name the offending keys.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Wan VAE checkpoint not found: {path}. {_download_hint(path)}")
    config = config or wan21_vae()
    state = torch.load(path, weights_only=True, map_location="cpu")
    if not isinstance(state, Mapping):
        raise ValueError(
            f"{path} holds a {type(state).__name__}, expected a flat state dict of tensors (the Wan2.1_VAE.pth format)"
        )
    with torch.device("meta"):
        model = WanVAE(config)
    check_state_dict(state, model.state_dict(), str(path))
    model.load_state_dict(state, strict=True, assign=True)
    model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
    logger.info("loaded Wan VAE from %s (%d tensors, dtype %s)", path, len(state), dtype)
    return model


def vae_from_pretrained_dir(
    directory: str | Path,
    config: WanVAEConfig | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> WanVAE:
    """:func:`load_wan_vae` on ``<directory>/Wan2.1_VAE.pth``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"model directory {directory} does not exist. {_download_hint(directory / WAN21_VAE_FILENAME)}"
        )
    return load_wan_vae(directory / WAN21_VAE_FILENAME, config=config, dtype=dtype, device=device)
