"""The pretrained world model: preview latents, the cached deterministic recipe, the `world` base model, and
its held-out accuracy band."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import astrolabe.world.pretrain as pretrain
from astrolabe.config import ModelConfig
from astrolabe.build import build_dit, build_text, build_vae
from astrolabe.models.registry import get_base_model
from astrolabe.models.wan.vae import WanVAE, tiny_vae
from astrolabe.models.wan.vae_preview import init_preview_decoder_, preview_latents, preview_video
from astrolabe.world.evaluate import generation_accuracy, roundtrip_accuracy, variety_summary, world_stream_config
from astrolabe.world.grammar import heldout_captions, parse_caption
from astrolabe.world.tokenizer import UNK_ID
from astrolabe.world.pretrain import (
    WorldModelMissingError,
    WorldModelRecipe,
    build_world_model,
    load_world_model,
    train_world_model,
    world_model_dir,
)

QUICK = WorldModelRecipe(steps=2, batch_size=2, warmup_steps=1)


def test_preview_video_is_the_preview_decoder_and_preview_latents_invert_it() -> None:
    vae = init_preview_decoder_(WanVAE(tiny_vae())).eval()
    g = torch.Generator().manual_seed(0)
    z = torch.randn(1, 16, 3, 2, 2, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(preview_video(z), vae.decode(z), atol=1e-5, rtol=0)
    # a video constant on every 8x8 cell and latent frame (colours inside the saturation's range) round-trips
    cells = torch.rand(1, 3, 3, 2, 2, generator=g) * 1.2 - 0.6  # (B, 3, F, h, w) in [-0.6, 0.6]
    video = cells.repeat_interleave(torch.tensor([1, 4, 4]), dim=2).repeat_interleave(8, 3).repeat_interleave(8, 4)
    torch.testing.assert_close(preview_video(preview_latents(video)), video, atol=1e-5, rtol=0)


def test_latent_roundtrip_keeps_colour_motion_and_background() -> None:
    """The ceiling the latent space allows: the detector on rendered ground truth through latents + decoder."""
    acc = roundtrip_accuracy(count=40)
    assert min(acc["direction"], acc["speed"], acc["background"]) >= 0.95, acc
    assert acc["color"] >= 0.8, acc  # a small object may fill no 8x8 cell: its colour is blended with the background
    assert acc["shape"] >= 0.45, acc  # shapes from 8x8-cell coverage: about 2 in 3 (chance 1/3)


def test_object_weights_follow_the_rendered_object() -> None:
    """Coverage is the renderer's blend weight (a square of side s covers s^2 pixels); cells away from the object
    weigh 1, cells inside it 1 + w."""
    recipe = WorldModelRecipe()
    caption, frames, coverage = pretrain.pretraining_pair(0, 0, recipe)
    side = recipe.world.object_px
    area = {"square": side**2, "circle": np.pi * side**2 / 4, "triangle": side**2 / 2}[parse_caption(caption).shape]
    np.testing.assert_allclose(coverage.sum(dim=(1, 2)).numpy(), area, rtol=0.05)
    weights = pretrain.loss_weights(coverage[None], 10.0)  # (1, F, 1, 8, 8)
    assert weights.shape == (1, 6, 1, 8, 8)
    assert float(weights.min()) == 1.0 and 1.0 + 10.0 * 0.5 < float(weights.max()) <= 11.0


def test_fresh_dit_passes_the_noise_through() -> None:
    """Identity-flow init: at t = 1000 the untrained DiT already predicts v ~= x_t (x0 ~= 0)."""
    dit, text = pretrain._fresh_modules(QUICK.model_copy(update={"identity_init": True}))
    x_t = torch.randn(2, 3, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        v = dit(x_t, torch.full((2,), 1000.0), text.encode(["a red circle", "a blue square"]), causal=world_stream_config().causal)
    assert float((v - x_t).square().mean() / x_t.square().mean()) < 0.05


def test_recipe_is_deterministic_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a, b = train_world_model(QUICK), train_world_model(QUICK)
    for x, y in zip(a.dit.state_dict().values(), b.dit.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    path = build_world_model(tmp_path, QUICK)
    assert path == world_model_dir(tmp_path, QUICK) and (path / "manifest.json").is_file()
    before = (path / "manifest.json").stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("a second build must not train")

    monkeypatch.setattr(pretrain, "train_world_model", no_training)
    assert build_world_model(tmp_path, QUICK) == path
    assert (path / "manifest.json").stat().st_mtime_ns == before
    assert world_model_dir(tmp_path, WorldModelRecipe(steps=3)) != path  # the recipe is the key
    loaded = load_world_model(path, QUICK)
    for x, y in zip(a.dit.state_dict().values(), loaded.dit.state_dict().values(), strict=True):
        assert torch.equal(x, y)
    prompts = [c.text for c in heldout_captions()[:2]]
    torch.testing.assert_close(loaded.text.encode(prompts), a.text.encode(prompts))


def test_world_text_encoder_sees_every_word() -> None:
    text = train_world_model(QUICK).text
    longest = max((c.text for c in heldout_captions()), key=len)
    ids, mask = text.tokenize([longest])
    assert int(mask.sum()) == len(longest.split()) + 1  # every word and the EOS
    assert UNK_ID not in ids[0].tolist()  # every word of the grammar has its own id
    changed = longest.rsplit(" ", 2)[0] + " " + ("red" if "red" not in longest.split()[-2] else "blue") + " background"
    assert not torch.equal(text.encode([longest]), text.encode([changed]))  # the last word reaches the DiT


def test_world_base_model_needs_the_build_and_loads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    card = get_base_model("world")
    mc = ModelConfig(base="world", checkpoint_dir=tmp_path)
    with pytest.raises(WorldModelMissingError, match="astrolabe world build"):
        build_dit(mc, card)
    path = build_world_model(tmp_path, QUICK)
    monkeypatch.setattr(pretrain, "world_model_root", lambda checkpoint_dir: path)
    dit, text, vae = build_dit(mc, card), build_text(mc, card), build_vae(mc, card)
    assert dit.config.text_len == text.text_len == 64
    model = pretrain.WorldModel(dit, text)
    acc = generation_accuracy(model, count=3, stream=world_stream_config())
    assert set(acc) >= {"color", "shape", "direction", "background"} and all(0 <= v <= 1 for v in acc.values())
    assert vae.decode(torch.zeros(1, 16, 1, 8, 8)).shape == (1, 3, 1, 64, 64)


@pytest.fixture(scope="module")
def heldout_accuracy(default_world_model: Path) -> dict[str, float]:
    """The default recipe built from scratch (conftest, a few minutes on 2 cores) and its 96 held-out generations."""
    return generation_accuracy(load_world_model(default_world_model), count=96)


@pytest.mark.slow
def test_pretrained_world_model_is_above_chance_and_far_from_perfect(heldout_accuracy: dict[str, float]) -> None:
    """Measured (pretrain docstring, 96 held-out captions): colour 0.91, background 1.0, shape 0.38 (chance 1/6,
    1/6, 1/3: shape is barely learned at 8x8 latent cells), every attribute right 0.10."""
    acc = heldout_accuracy
    assert acc["detected"] >= 0.9, acc
    assert 0.45 <= acc["color"] <= 0.98, acc
    assert acc["background"] >= 0.8, acc
    assert acc["all"] <= 0.5, acc  # far from perfect: RL has room


@pytest.mark.slow
def test_pretrained_world_model_moves_as_captioned(heldout_accuracy: dict[str, float]) -> None:
    """Motion direction (chance 1/5) clearly above chance, short of perfect. The build's direction depends on the
    machine's float summation order (0.45-0.49 on one machine, about 0.85 on another: astrolabe.world.pretrain), so
    the upper bound is loose; ``all`` <= 0.5 (the test above) is what keeps the model far from perfect."""
    assert 0.3 <= heldout_accuracy["direction"] <= 0.95, heldout_accuracy


def test_variety_summary_counts_unanimous_captions_and_the_two_spreads() -> None:
    """Caption 0's three readings agree (unanimous), caption 1's colour differs by seed; the alignment spreads are
    the mean within-caption std and the std of the caption means."""
    red, blue = parse_caption("a red circle staying still on a white background"), parse_caption(
        "a blue square moving left on a yellow background"
    )
    wrong_colour = parse_caption("a green square moving left on a yellow background")
    readings = [[red, red, red], [blue, wrong_colour, None]]
    scores = np.array([[0.5, 0.5, 0.5], [0.2, 0.4, 0.6]])
    got = variety_summary(readings, scores, [red, blue])
    assert got["unanimous/color"] == 0.5 and got["unanimous/background"] == 0.5  # None is a reading of its own
    assert got["right/color"] == pytest.approx(4 / 6) and got["right/direction"] == pytest.approx(5 / 6)
    assert "right/speed" not in got  # no caption names a speed
    within, between = np.std([0.2, 0.4, 0.6]) / 2, np.std([0.5, 0.4])
    assert got["alignment/within_std"] == pytest.approx(within)
    assert got["alignment/between_std"] == pytest.approx(between)
    assert got["alignment/within_share"] == pytest.approx(within / (within + between))
    with pytest.raises(ValueError, match="disagree"):
        variety_summary(readings, scores[:, :2], [red, blue])


def test_world_probe_command_reports_the_variety_of_a_build(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from flows.cli import app

    path = build_world_model(tmp_path, QUICK)
    out = tmp_path / "probe.json"
    res = CliRunner().invoke(app, ["world", "probe", "--dir", str(path), "--captions", "2", "--seeds", "2",
                                   "--json", str(out)])  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(out.read_text())
    assert {"right/color", "unanimous/shape", "alignment/within_std", "alignment/between_std"} <= set(result)
    assert "within a caption" in res.output
    res = CliRunner().invoke(app, ["world", "probe", "--dir", str(tmp_path / "missing")])
    assert res.exit_code == 1 and "astrolabe world build" in res.output  # a missing build says how to make it
