"""Rewards exactly as their authors run them (issue 12 point 1), on fakes in the real layouts."""

from __future__ import annotations

import argparse
import hashlib
import json

import numpy as np
import pytest
import torch

from astrolabe.models.checkpoints import CheckpointReadError, CheckpointNotFoundError
from astrolabe.rewards import RewardSpec, build_reward
from astrolabe.rewards.models import hpsv2, hpsv3, qwen2vl, videoalign
from fakes import reward_checkpoints as fakes

PROMPTS = ["a red cat", "a dog running"]


# ---- HPSv3 prompt ---------------------------------------------------------------------------------

# sha256 of hpsv3_prompt("a red car") = INSTRUCTION.format(text_prompt=...) + prompt_with_special_token, computed
# from the upstream strings of hpsv3 1.0.0 (PyPI wheel hpsv3-1.0.0-py3-none-any.whl), file
# hpsv3/dataset/data_collator_qwen.py (sha256 b0f936e89f8df652c67d470412e1d9afd27aa711dec85724c19989ac91e7a3e3),
# the collator MizzenAI/HPSv3 hpsv3/inference.py (commit 72b7ebaf0fe76bce636b3f4997aee319d0f65aef) imports.
HPSV3_PROMPT_SHA256 = "cd0dd357cea49773a964a17b9b3cd41d18ccd50f80a598cf9632c46513aa5d56"


def test_hpsv3_prompt_is_upstream_byte_for_byte() -> None:
    text = hpsv3.hpsv3_prompt("a red car")
    assert hashlib.sha256(text.encode("utf-8")).hexdigest() == HPSV3_PROMPT_SHA256
    # the four lines that end in spaces upstream (lost once, when an editor stripped them)
    for line in ("being the best. \n", "**Visual Quality:**  \n", "lowest possible. \n", "**Text Alignment:**  \n"):
        assert line in text
    chat = qwen2vl.render_qwen2vl_chat(text, "image")
    assert chat.endswith("Please provide the overall ratings of this image: <|Reward|>\n\nEND\n<|im_end|>\n<|im_start|>assistant\n")


# ---- HPSv2.1 --------------------------------------------------------------------------------------


def test_hpsv2_runs_in_float32_by_default() -> None:
    assert hpsv2.HPSv2Options(checkpoint_dir="x").dtype == "float32"


def test_hpsv2_loads_training_extras_safely_and_refuses_other_objects(tmp_path) -> None:
    extras = {"epoch": 10, "name": "hpsv2.1", "optimizer": {"state": {}, "param_groups": [{"lr": 1e-5, "betas": (0.9, 0.98)}]},
              "step": np.int64(4000)}
    fakes.write_hpsv2_checkpoint(tmp_path / "ok", extra=extras)
    opts = hpsv2.HPSv2Options(checkpoint_dir=str(tmp_path / "ok"), architecture="tiny-hps-test", image_size=32)
    loaded = hpsv2._LoadedHPSv2(opts, torch.device("cpu"), torch.float32)
    assert next(loaded.model.parameters()).dtype == torch.float32
    fakes.write_hpsv2_checkpoint(tmp_path / "bad", extra={"args": argparse.Namespace(lr=1e-5)})
    opts = opts.model_copy(update={"checkpoint_dir": str(tmp_path / "bad")})
    with pytest.raises(CheckpointReadError, match="weights_only=True"):
        hpsv2._LoadedHPSv2(opts, torch.device("cpu"), torch.float32)


# ---- VideoReward: frame sampling by fps -----------------------------------------------------------


def test_fps_frame_count_matches_videoalign_smart_nframes() -> None:
    # n = T / video_fps * fps, clamped to [4, floor_2(min(768, T))], rounded to a multiple of 2 (half to even)
    assert videoalign.fps_frame_count(81, 16.0, 2.0) == 10  # 10.125 -> 10
    assert videoalign.fps_frame_count(240, 16.0, 2.0) == 30
    assert videoalign.fps_frame_count(1921, 16.0, 2.0) == 240  # 240.1 -> 240 (the 2-minute video is not 10 frames)
    assert videoalign.fps_frame_count(88, 16.0, 2.0) == 12  # 11.0 -> round(5.5) = 6 (half to even) -> 12
    assert videoalign.fps_frame_count(5, 16.0, 2.0) == 4  # at least 4
    assert videoalign.fps_frame_count(3, 16.0, 2.0) == 2  # at most floor_2(T)
    with pytest.raises(ValueError, match="at least 2"):
        videoalign.fps_frame_count(1, 16.0, 2.0)


def test_videoalign_sampling_options_are_exclusive() -> None:
    base = {"checkpoint_dir": "c", "backbone_dir": "b"}
    assert videoalign.VideoAlignOptions(**base).num_frames == 10 and videoalign.VideoAlignOptions(**base).fps is None
    assert videoalign.VideoAlignOptions(**base, num_frames=None, fps=2.0).fps == 2.0
    for bad in ({"fps": 2.0}, {"num_frames": None}):
        with pytest.raises(ValueError, match="exactly one of num_frames"):
            videoalign.VideoAlignOptions(**base, **bad)


# ---- VideoReward: LoRA checkpoint over a sharded backbone -----------------------------------------


@pytest.fixture(scope="module")
def lora_dirs(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("videoreward_lora")
    merged = fakes.write_videoalign_lora_checkpoint(root / "ckpt", root / "qwen", fakes.qwen2vl_test_config())
    full = root / "full"
    (full / "checkpoint-1").mkdir(parents=True)
    torch.save(fakes.legacy_state_dict(merged), full / "checkpoint-1" / "model.pth")
    fakes.write_model_config(full, lora_r=2, lora_alpha=4)
    return root / "ckpt", root / "qwen", full


def _va(name, ckpt, qwen, **extra):
    opts = {"checkpoint_dir": str(ckpt), "backbone_dir": str(qwen), "num_frames": 4, "device": "cpu", **extra}
    return build_reward(RewardSpec(name=name, options=opts))


def test_videoalign_lora_layout_loads_sharded_backbone_through_index(lora_dirs) -> None:
    ckpt, qwen, full = lora_dirs
    index = json.loads((qwen / videoalign.BACKBONE_INDEX).read_text())
    assert len(set(index["weight_map"].values())) == 2 and not (qwen / videoalign.BACKBONE_SINGLE).exists()
    videos = np.random.default_rng(1).integers(0, 256, (2, 6, 40, 70, 3), dtype=np.uint8)
    lora = _va("videoalign_ta", ckpt, qwen)(videos, PROMPTS)
    reference = _va("videoalign_ta", full, qwen)(videos, PROMPTS)  # the merged weights in the full layout
    assert np.isfinite(lora.scores).all()
    np.testing.assert_allclose(lora.details["raw"], reference.details["raw"], rtol=1e-4, atol=1e-5)
    fps = _va("videoalign_vq", ckpt, qwen, num_frames=None, fps=2.0, video_fps=2.0)
    assert fps.frame_indices(6).tolist() == [0, 1, 2, 3, 4, 5]  # 6 frames at 2 fps, sampled at 2 fps: all
    assert np.isfinite(fps(videos, PROMPTS).scores).all()


def test_videoalign_missing_shard_is_named(lora_dirs, tmp_path) -> None:
    ckpt, qwen, _ = lora_dirs
    copy = tmp_path / "qwen"
    copy.mkdir()
    for f in qwen.iterdir():
        if not f.name.startswith("model-00002"):
            (copy / f.name).write_bytes(f.read_bytes())
    with pytest.raises(FileNotFoundError, match="model-00002-of-00002.safetensors"):
        _va("videoalign_vq", ckpt, copy)
    assert issubclass(CheckpointNotFoundError, FileNotFoundError)


def test_model_reward_benchmark_runs_on_named_checkpoints(tmp_path) -> None:
    from astrolabe.bench.rewards import benchmark_model_rewards

    fakes.write_hpsv2_checkpoint(tmp_path / "hpsv2")
    options = {"hpsv2": {"checkpoint_dir": str(tmp_path / "hpsv2"), "architecture": "tiny-hps-test", "image_size": 32}}
    rates = benchmark_model_rewards(options, num_videos=1, frames=2, height=16, width=16, repeats=1)
    assert set(rates) == {"hpsv2"} and rates["hpsv2"] > 0
