"""The tiny VAE's preview decoder: decode(z) is the saturated Wan2.1 latent-to-RGB preview, upsampled."""

from __future__ import annotations

import pytest
import torch

from astrolabe.build import build_vae
from astrolabe.config import ModelConfig
from astrolabe.models.registry import get_base_model
from astrolabe.models.wan.vae import StreamingDecoder, WanVAE, WanVAEConfig, tiny_vae
from astrolabe.models.wan.vae_preview import (
    PREVIEW_LEVEL,
    WAN21_LATENT_RGB_BIAS,
    WAN21_LATENT_RGB_FACTORS,
    init_preview_decoder_,
    preview_pixels,
)


def _expected_video(z: torch.Tensor) -> torch.Tensor:
    """preview_pixels, nearest x8 in space, latent frame 0 -> 1 pixel frame, later ones -> 4; clamped."""
    p = preview_pixels(z).repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)  # (B, 3, F, 8h, 8w)
    frames = [p[:, :, :1]] + [p[:, :, i : i + 1].expand(-1, -1, 4, -1, -1) for i in range(1, z.shape[2])]
    return torch.cat(frames, dim=2).clamp(-1.0, 1.0)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    torch.manual_seed(3)
    return init_preview_decoder_(WanVAE(tiny_vae())).eval()


def test_preview_pixels_formula() -> None:
    z = torch.randn(2, 16, 3, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = torch.tensor(WAN21_LATENT_RGB_FACTORS, dtype=torch.float64)
    p = torch.einsum("bcfhw,ck->bkfhw", z, f) + torch.tensor(WAN21_LATENT_RGB_BIAS, dtype=torch.float64).view(
        1, 3, 1, 1, 1
    )
    c = PREVIEW_LEVEL
    norm = torch.sqrt(2 * (p**2).sum(1, keepdim=True) + c**2)
    torch.testing.assert_close(preview_pixels(z), c * p / norm)
    # slope 1 at p = 0: small p passes through almost unchanged
    small = preview_pixels(torch.zeros(1, 16, 1, 1, 1, dtype=torch.float64))
    b = torch.tensor(WAN21_LATENT_RGB_BIAS, dtype=torch.float64)
    torch.testing.assert_close(small.flatten(), c * b / torch.sqrt(2 * (b**2).sum() + c**2))


@torch.no_grad()
def test_decode_is_the_upsampled_preview(vae: WanVAE) -> None:
    z = torch.randn(2, 16, 4, 3, 5, generator=torch.Generator().manual_seed(1))
    out = vae.decode(z)
    assert out.shape == (2, 3, 13, 24, 40)
    torch.testing.assert_close(out, _expected_video(z), atol=1e-5, rtol=0)


@torch.no_grad()
def test_streaming_decode_matches_whole(vae: WanVAE) -> None:
    z = torch.randn(1, 16, 5, 2, 2, generator=torch.Generator().manual_seed(2))
    stream = StreamingDecoder(vae)
    parts = [stream.decode_block(z[:, :, :2]), stream.decode_block(z[:, :, 2:])]
    torch.testing.assert_close(torch.cat(parts, dim=2), vae.decode(z), atol=1e-6, rtol=0)


@torch.no_grad()
def test_pixels_follow_latents_monotonically(vae: WanVAE) -> None:
    """Moving z along a factor column moves that colour channel up, everywhere (no chaotic response)."""
    direction = torch.tensor(WAN21_LATENT_RGB_FACTORS)[:, 0].view(1, 16, 1, 1, 1)  # the red column
    z = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(4)) * 0.3
    red = [vae.decode(z + s * direction)[:, 0].mean().item() for s in (0.0, 0.5, 1.0, 1.5)]
    assert all(b > a + 0.02 for a, b in zip(red, red[1:], strict=False)), red


def test_same_state_dict_layout_as_random() -> None:
    random_sd = WanVAE(tiny_vae()).state_dict()
    preview_sd = init_preview_decoder_(WanVAE(tiny_vae())).state_dict()
    assert {k: v.shape for k, v in random_sd.items()} == {k: v.shape for k, v in preview_sd.items()}
    assert all(torch.isfinite(v).all() for v in preview_sd.values())


def test_too_narrow_vae_is_refused() -> None:
    narrow = WanVAE(WanVAEConfig(dim=2, dim_mult=(1, 1), temporal_downsample=(False,)))
    with pytest.raises(ValueError, match="needs >= 8 channels"):
        init_preview_decoder_(narrow)


def test_build_vae_init_knob() -> None:
    card = get_base_model("tiny")
    z = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        preview = build_vae(ModelConfig(), card).decode(z)
        random = build_vae(ModelConfig(tiny_vae_init="random"), card).decode(z)
    torch.testing.assert_close(preview, _expected_video(z), atol=1e-5, rtol=0)
    assert (preview - random).abs().max() > 0.1
