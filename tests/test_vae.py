"""Tests of the Wan2.1 causal 3D VAE (astrolabe.models.wan.vae).

The chunked, cached model is compared with an independent *functional* re-derivation written here:
one causal pass over the whole sequence with plain F.conv3d / F.conv2d on the state dict, where
downsample3d passes frame 0 through and runs its stride-2 conv on all frames, and upsample3d passes
frame 0 through and runs its time_conv causally over frames 1.. (models-reference.md 2.3).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from astrolabe.models.wan.vae import (
    WAN21_LATENT_MEAN,
    WAN21_LATENT_STD,
    StreamingDecoder,
    WanVAE,
    WanVAEConfig,
    decode_stream,
    denormalize_latents,
    load_wan_vae,
    normalize_latents,
    tiny_vae,
    vae_from_pretrained_dir,
    wan21_vae,
)

DT = torch.float64


# ------------------------------------------------------------------------------------------------
# fixtures
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny convolutions are dominated by thread overhead on a busy 2-core box: run them on one thread."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def vae() -> WanVAE:
    """Tiny float64 VAE with non-trivial gammas and attention projections."""
    g = torch.Generator().manual_seed(0)
    model = WanVAE(tiny_vae())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 + torch.rand(p.shape, generator=g))
            elif "proj.weight" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.to(DT).eval()


def _video(t: int, h: int = 16, w: int = 16, b: int = 1, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, t, h, w, generator=g, dtype=DT) * 2 - 1


def _latents(f: int, h: int = 2, w: int = 2, b: int = 1, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 16, f, h, w, generator=g, dtype=DT)


# ------------------------------------------------------------------------------------------------
# independent functional reference (whole sequence, no cache)
# ------------------------------------------------------------------------------------------------


def _causal(x, w, b, stride=(1, 1, 1)):
    """Zero pad kt-1 frames on the left, k//2 spatially on both sides."""
    kt, kh, kw = w.shape[2:]
    return F.conv3d(F.pad(x, (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)), w, b, stride=stride)


def _rms(x, g):
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(x.shape[1]) * g


def _frames(fn, x):
    return torch.stack([fn(x[:, :, i]) for i in range(x.shape[2])], dim=2)


def _res(sd, p, x):
    h = _causal(x, sd[p + "shortcut.weight"], sd[p + "shortcut.bias"]) if p + "shortcut.weight" in sd else x
    y = _causal(F.silu(_rms(x, sd[p + "residual.0.gamma"])), sd[p + "residual.2.weight"], sd[p + "residual.2.bias"])
    y = _causal(F.silu(_rms(y, sd[p + "residual.3.gamma"])), sd[p + "residual.6.weight"], sd[p + "residual.6.bias"])
    return h + y


def _attn(sd, p, x):
    def frame(f):
        b, c, hh, ww = f.shape
        n = _rms(f, sd[p + "norm.gamma"])
        q, k, v = F.conv2d(n, sd[p + "to_qkv.weight"], sd[p + "to_qkv.bias"]).flatten(2).split(c, dim=1)
        a = torch.softmax(q.transpose(1, 2) @ k / math.sqrt(c), dim=-1)  # (B, HW, HW)
        o = (a @ v.transpose(1, 2)).transpose(1, 2).reshape(b, c, hh, ww)
        return f + F.conv2d(o, sd[p + "proj.weight"], sd[p + "proj.bias"])

    return _frames(frame, x)


def _middle(sd, p, x):
    return _res(sd, p + "2.", _attn(sd, p + "1.", _res(sd, p + "0.", x)))


def _head(sd, p, x):
    return _causal(F.silu(_rms(x, sd[p + "0.gamma"])), sd[p + "2.weight"], sd[p + "2.bias"])


def _n_blocks(sd, prefix):
    return 1 + max(int(k[len(prefix) :].split(".")[0]) for k in sd if k.startswith(prefix))


def ref_encode(sd, x, mean, std):
    x = _causal(x, sd["encoder.conv1.weight"], sd["encoder.conv1.bias"])
    for i in range(_n_blocks(sd, "encoder.downsamples.")):
        p = f"encoder.downsamples.{i}."
        if p + "resample.1.weight" not in sd:
            x = _res(sd, p, x)
            continue
        w, b = sd[p + "resample.1.weight"], sd[p + "resample.1.bias"]
        x = _frames(lambda f: F.conv2d(F.pad(f, (0, 1, 0, 1)), w, b, stride=2), x)
        if p + "time_conv.weight" in sd and x.shape[2] > 1:
            y = F.conv3d(x, sd[p + "time_conv.weight"], sd[p + "time_conv.bias"], stride=(2, 1, 1))
            x = torch.cat([x[:, :, :1], y], dim=2)
    x = _head(sd, "encoder.head.", _middle(sd, "encoder.middle.", x))
    mu = F.conv3d(x, sd["conv1.weight"], sd["conv1.bias"])[:, :16]
    return (mu - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)


def ref_decode(sd, z, mean, std):
    x = z * std.view(1, -1, 1, 1, 1) + mean.view(1, -1, 1, 1, 1)
    x = F.conv3d(x, sd["conv2.weight"], sd["conv2.bias"])
    x = _middle(sd, "decoder.middle.", _causal(x, sd["decoder.conv1.weight"], sd["decoder.conv1.bias"]))
    for i in range(_n_blocks(sd, "decoder.upsamples.")):
        p = f"decoder.upsamples.{i}."
        if p + "resample.1.weight" not in sd:
            x = _res(sd, p, x)
            continue
        if p + "time_conv.weight" in sd and x.shape[2] > 1:
            y = _causal(x[:, :, 1:], sd[p + "time_conv.weight"], sd[p + "time_conv.bias"])  # (B, 2C, T-1, ..)
            c = x.shape[1]
            later = [y[:, half * c : (half + 1) * c, j] for j in range(y.shape[2]) for half in (0, 1)]
            x = torch.cat([x[:, :, :1], torch.stack(later, dim=2)], dim=2)
        w, b = sd[p + "resample.1.weight"], sd[p + "resample.1.bias"]
        x = _frames(lambda f: F.conv2d(f.repeat_interleave(2, -2).repeat_interleave(2, -1), w, b, padding=1), x)
    return _head(sd, "decoder.head.", x).clamp(-1, 1)


def _assert_close(a: torch.Tensor, b: torch.Tensor, rtol: float = 0.0, atol: float = 1e-12) -> None:
    """|a - b| <= atol + rtol |b| elementwise, same shape and dtype (torch.testing is slow to import)."""
    assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
    err = (a - b).abs() - rtol * b.abs()
    assert err.max() <= atol, f"max abs diff {(a - b).abs().max().item():.3e} > atol {atol}"


def _stats():
    return torch.tensor(WAN21_LATENT_MEAN, dtype=DT), torch.tensor(WAN21_LATENT_STD, dtype=DT)


# ------------------------------------------------------------------------------------------------
# key layout and sizes (models-reference 2.4)
# ------------------------------------------------------------------------------------------------


def _expected_keys() -> set[str]:
    """The 194 keys of Wan2.1_VAE.pth, written out from models-reference.md 2.4."""
    keys = set()

    def res(p, shortcut=False):
        keys.update(p + s for s in ("residual.0.gamma", "residual.3.gamma"))
        for i in (2, 6):
            keys.update((f"{p}residual.{i}.weight", f"{p}residual.{i}.bias"))
        if shortcut:
            keys.update((p + "shortcut.weight", p + "shortcut.bias"))

    def conv(p):
        keys.update((p + "weight", p + "bias"))

    def middle(p):
        res(p + "0.")
        res(p + "2.")
        keys.add(p + "1.norm.gamma")
        conv(p + "1.to_qkv.")
        conv(p + "1.proj.")

    conv("encoder.conv1.")
    for i in (0, 1, 3, 4, 6, 7, 9, 10):
        res(f"encoder.downsamples.{i}.", shortcut=i in (3, 6))
    for i in (2, 5, 8):
        conv(f"encoder.downsamples.{i}.resample.1.")
    for i in (5, 8):
        conv(f"encoder.downsamples.{i}.time_conv.")
    middle("encoder.middle.")
    keys.add("encoder.head.0.gamma")
    conv("encoder.head.2.")
    conv("conv1.")
    conv("conv2.")
    conv("decoder.conv1.")
    middle("decoder.middle.")
    for i in range(15):
        p = f"decoder.upsamples.{i}."
        if i in (3, 7, 11):
            conv(p + "resample.1.")
            if i != 11:
                conv(p + "time_conv.")
        else:
            res(p, shortcut=i == 4)
    keys.add("decoder.head.0.gamma")
    conv("decoder.head.2.")
    return keys


def test_full_config_keys_shapes_and_param_count_on_meta():
    with torch.device("meta"):
        model = WanVAE(wan21_vae())
    sd = model.state_dict()
    assert len(sd) == 194
    assert set(sd) == _expected_keys()
    assert sum(p.numel() for p in model.parameters()) == 126_892_531
    expected_shapes = {
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.7.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.upsamples.4.shortcut.weight": (384, 192, 1, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.6.shortcut.weight": (384, 192, 1, 1, 1),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.downsamples.2.resample.1.weight": (96, 96, 3, 3),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.head.0.gamma": (384, 1, 1, 1),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
        "decoder.head.0.gamma": (96, 1, 1, 1),
    }
    for key, shape in expected_shapes.items():
        assert tuple(sd[key].shape) == shape, key


def test_tiny_config_has_identical_key_layout():
    with torch.device("meta"):
        assert set(WanVAE(tiny_vae()).state_dict()) == _expected_keys()
    cfg = tiny_vae()
    assert (cfg.spatial_factor, cfg.temporal_factor, cfg.z_dim) == (8, 4, 16)
    assert cfg.latent_mean == WAN21_LATENT_MEAN and cfg.latent_std == WAN21_LATENT_STD


def test_config_validation_messages():
    with pytest.raises(ValidationError, match="one flag per downsampling step"):
        WanVAEConfig(temporal_downsample=(True, True))
    with pytest.raises(ValidationError, match="one per latent channel"):
        WanVAEConfig(z_dim=4)
    with pytest.raises(ValidationError, match="even"):
        WanVAEConfig(dim=7)
    with pytest.raises(ValidationError):
        WanVAEConfig(unknown_knob=1)
    with pytest.raises(ValidationError):
        wan21_vae().dim = 8  # frozen


# ------------------------------------------------------------------------------------------------
# math, shapes, causality
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [1, 5, 13])
def test_encode_shapes_and_matches_whole_sequence_reference(vae, t):
    x = _video(t, w=24, b=2)  # non-square: catches H/W mix-ups
    with torch.no_grad():
        z = vae.encode(x)
    assert z.shape == (2, 16, 1 + (t - 1) // 4, 2, 3) and z.dtype == DT
    ref = ref_encode(vae.state_dict(), x, *_stats())
    _assert_close(z, ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize("f", [1, 3])
def test_decode_shapes_and_matches_whole_sequence_reference(vae, f):
    z = _latents(f, w=3, b=2)
    with torch.no_grad():
        y = vae.decode(z)
    assert y.shape == (2, 3, 1 + 4 * (f - 1), 16, 24) and y.dtype == DT
    assert y.min() >= -1 and y.max() <= 1
    ref = ref_decode(vae.state_dict(), z, *_stats())
    _assert_close(y, ref, rtol=0, atol=1e-10)


def test_latent_normalisation_uses_wan_constants(vae):
    x = _video(5)
    with torch.no_grad():
        mu, log_var = vae.encode_moments(x)
        z = vae.encode(x)
    assert mu.shape == log_var.shape == z.shape
    # channel 0: mean -0.7571, std 2.8184; channel 15: mean -0.2921, std 1.9160
    _assert_close(z[:, 0], (mu[:, 0] + 0.7571) / 2.8184, rtol=0, atol=1e-12)
    _assert_close(z[:, 15], (mu[:, 15] + 0.2921) / 1.9160, rtol=0, atol=1e-12)
    _assert_close(denormalize_latents(normalize_latents(mu, vae.config), vae.config), mu)


def test_encode_is_causal(vae):
    x = _video(13)
    x2 = x.clone()
    x2[:, :, 5:] = -x2[:, :, 5:]  # change every frame after the second latent's chunk (frames 1..4)
    with torch.no_grad():
        z, z2 = vae.encode(x), vae.encode(x2)
    assert torch.equal(z[:, :, :2], z2[:, :, :2])
    assert (z[:, :, 2:] - z2[:, :, 2:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3


def test_decode_is_causal(vae):
    z = _latents(4)
    z2 = z.clone()
    z2[:, :, 2:] += 1.0
    with torch.no_grad():
        y, y2 = vae.decode(z), vae.decode(z2)
    assert torch.equal(y[:, :, :5], y2[:, :, :5])  # latents 0, 1 -> pixel frames 0..4
    assert (y[:, :, 5:] - y2[:, :, 5:]).abs().max() > 1e-3


def test_batch_items_are_independent(vae):
    x = torch.cat([_video(5, seed=3), _video(5, seed=4)])
    with torch.no_grad():
        both = vae.encode(x)
        one = vae.encode(x[1:])
    _assert_close(both[1:], one, rtol=0, atol=1e-12)


def test_decode_is_differentiable(vae):
    z = _latents(2, h=1, w=1).requires_grad_(True)
    vae.decode(z).square().sum().backward()
    assert z.grad is not None and z.grad[:, :, 0].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# streaming decode
# ------------------------------------------------------------------------------------------------


def test_streaming_decode_equals_whole_decode_with_bounded_cache(vae):
    z = _latents(8, h=1, w=1)
    with torch.no_grad():
        whole = vae.decode(z)
        dec = StreamingDecoder(vae)
        chunks, cache_sizes = [], []
        for start in range(0, 8, 3):
            chunks.append(dec.decode_block(z[:, :, start : start + 3]))
            cache_sizes.append((len(dec.cache), dec.cache.numel()))
    assert [c.shape[2] for c in chunks] == [9, 12, 8]
    _assert_close(torch.cat(chunks, dim=2), whole, rtol=0, atol=1e-12)
    assert cache_sizes[1] == cache_sizes[2]  # memory independent of video length
    assert dec.latent_frames_seen == 8


def test_decode_stream_generator_and_reset(vae):
    z = _latents(5, h=1, w=1)
    with torch.no_grad():
        whole = vae.decode(z)
        chunks = list(decode_stream(vae, (z[:, :, i : i + 3] for i in (0, 3))))
        assert [c.shape[2] for c in chunks] == [9, 8]
        _assert_close(torch.cat(chunks, dim=2), whole, rtol=0, atol=1e-12)
        dec = StreamingDecoder(vae)
        dec.decode_block(_latents(2, h=1, w=1, seed=9))
        with pytest.raises(ValueError, match="reset"):
            dec.decode_block(_latents(1, h=2, w=1))
        dec.reset()
        _assert_close(dec.decode_block(z[:, :, :2]), whole[:, :, :5], rtol=0, atol=1e-12)


def test_streaming_detaches_between_blocks(vae):
    dec = StreamingDecoder(vae)
    z1 = _latents(2, h=1, w=1).requires_grad_(True)
    dec.decode_block(z1)
    assert all(not v.requires_grad for v in dec.cache._slots.values() if isinstance(v, torch.Tensor))


# ------------------------------------------------------------------------------------------------
# input errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((1, 3, 4, 16, 16), "1 \\+ 4k frames, got T=4; trim to 1 or pad to 5"),
        ((1, 3, 6, 16, 16), "trim to 5 or pad to 9"),
        ((1, 4, 5, 16, 16), "3 channels"),
        ((1, 3, 5, 12, 16), "multiples of 8"),
        ((1, 3, 5, 16, 20), "multiples of 8"),
        ((3, 5, 16, 16), "5-D"),
    ],
)
def test_encode_rejects_bad_video(vae, shape, match):
    with pytest.raises(ValueError, match=match):
        vae.encode(torch.zeros(shape, dtype=DT))


def test_decode_rejects_bad_latents(vae):
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.zeros(1, 8, 2, 2, 2, dtype=DT))
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.zeros(1, 2, 16, 2, 2, dtype=DT)[:, :, :0])
    with pytest.raises(ValueError, match="latents must be"):
        vae.decode(torch.zeros(16, 2, 2, 2, dtype=DT))


# ------------------------------------------------------------------------------------------------
# loader
# ------------------------------------------------------------------------------------------------


def _save(sd, path: Path) -> Path:
    torch.save({k: v.detach().float().clone() for k, v in sd.items()}, path)
    return path


def test_loader_round_trip(vae, tmp_path):
    path = _save(vae.state_dict(), tmp_path / "Wan2.1_VAE.pth")
    loaded = load_wan_vae(path, config=tiny_vae(), dtype=DT)
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    ref = {k: v.float().double() for k, v in vae.state_dict().items()}
    for k, v in loaded.state_dict().items():
        assert v.dtype == DT and torch.equal(v, ref[k]), k
    x = _video(5)
    with torch.no_grad():
        _assert_close(loaded.encode(x), ref_encode(ref, x, *_stats()), rtol=0, atol=1e-10)
    from_dir = vae_from_pretrained_dir(tmp_path, config=tiny_vae(), dtype=torch.bfloat16)
    assert from_dir.dtype == torch.bfloat16
    with torch.no_grad():
        z = from_dir.encode(x)
    assert z.dtype == torch.float32 and z.shape == (1, 16, 2, 2, 2)


def test_loader_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="Wan-AI/Wan2.1-T2V-1.3B") as err:
        load_wan_vae(tmp_path / "Wan2.1_VAE.pth", config=tiny_vae())
    assert "Wan2.1_VAE.pth" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match="Wan2.1_VAE.pth"):
        vae_from_pretrained_dir(tmp_path, config=tiny_vae())


def test_loader_reports_key_mismatches(vae, tmp_path):
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    del sd["decoder.head.0.gamma"]
    sd["encoder.extra.weight"] = torch.zeros(3)
    sd["conv2.weight"] = torch.zeros(16, 16, 3, 1, 1)
    path = _save(sd, tmp_path / "bad.pth")
    with pytest.raises(ValueError) as err:
        load_wan_vae(path, config=tiny_vae())
    msg = str(err.value)
    assert "1 missing: ['decoder.head.0.gamma']" in msg
    assert "1 unexpected: ['encoder.extra.weight']" in msg
    assert "conv2.weight: file (16, 16, 3, 1, 1) vs model (16, 16, 1, 1, 1)" in msg
    # the full-size config against a tiny file: shape errors, listing is truncated
    with pytest.raises(ValueError, match="mis-shaped.*more"):
        load_wan_vae(_save(vae.state_dict(), tmp_path / "tiny.pth"))


def test_loader_rejects_non_finite_and_non_dict(vae, tmp_path):
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    sd["encoder.middle.1.proj.weight"][0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*encoder.middle.1.proj.weight"):
        load_wan_vae(_save(sd, tmp_path / "nan.pth"), config=tiny_vae())
    torch.save([torch.zeros(1)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="flat state dict"):
        load_wan_vae(tmp_path / "list.pth", config=tiny_vae())
