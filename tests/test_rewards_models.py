"""Model rewards: tiny random checkpoints in the real on-disk layout, loaded through the real code."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from astrolabe.rewards import RewardSpec, build_reward
from astrolabe.rewards.models import common, hpsv2, hpsv3, qwen2vl, videoalign
from astrolabe.rewards.models.common import MissingCheckpointError
from fakes import reward_checkpoints as fakes

PROMPTS = ["a red cat", "a dog running", "sunset over the sea"]


@pytest.fixture(scope="module")
def videos() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (3, 5, 40, 70, 3), dtype=np.uint8)


# ---- pure helpers ---------------------------------------------------------------------------------


def test_smart_resize_and_frame_indices_match_reference() -> None:
    assert qwen2vl.smart_resize(480, 832, 28, 256 * 28 * 28, 256 * 28 * 28) == (336, 588)
    assert common.linspace_frame_indices(81, 10).tolist() == [0, 9, 18, 27, 36, 44, 53, 62, 71, 80]


def test_top_fraction_mean_by_hand() -> None:
    scores = torch.tensor([[1.0, 5.0, 3.0, 2.0, 4.0, 0.0, 6.0]])  # int(0.3*7)=2 -> (6+5)/2
    assert common.top_fraction_mean(scores, 0.3).item() == pytest.approx(5.5)
    assert common.top_fraction_mean(scores[:, :2], 0.3).item() == pytest.approx(5.0)  # k >= 1


def test_patchify_matches_hand_loop() -> None:
    g = torch.Generator().manual_seed(0)
    frames = torch.randn(1, 3, 3, 56, 84, generator=g)  # T=3 -> padded to 4
    patches, (t, h, w) = qwen2vl.patchify_qwen2vl(frames, 14, 2, 2)
    assert (t, h, w) == (2, 4, 6)
    padded = torch.cat([frames, frames[:, -1:]], dim=1)[0]  # (4, 3, 56, 84)
    rows = []
    for ti in range(t):
        for bh in range(h // 2):
            for bw in range(w // 2):
                for mh in range(2):
                    for mw in range(2):
                        y, x = (bh * 2 + mh) * 14, (bw * 2 + mw) * 14
                        block = padded[ti * 2 : ti * 2 + 2, :, y : y + 14, x : x + 14]  # (tp, C, p, p)
                        rows.append(block.permute(1, 0, 2, 3).reshape(-1))
    torch.testing.assert_close(patches[0], torch.stack(rows))


def test_lora_merge_matches_peft() -> None:
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(0)
    base = torch.nn.ModuleDict({"model": torch.nn.ModuleDict({"q": torch.nn.Linear(6, 5), "embed_tokens": torch.nn.Embedding(7, 6)})})
    state = {f"language_model.{k}": v.clone() for k, v in base["model"].state_dict().items()}
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=6, target_modules=["q", "embed_tokens"], init_lora_weights=False))
    saved = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    lora = {k: v for k, v in saved.items() if qwen2vl.split_lora_key(k) is not None}
    assert len(lora) == 4
    qwen2vl.merge_lora_into(state, lora, 6 / 2)
    x, ids = torch.randn(4, 6), torch.tensor([0, 3, 6])
    with torch.no_grad():
        torch.testing.assert_close(x @ state["language_model.q.weight"].T + state["language_model.q.bias"], base["model"]["q"](x))
        torch.testing.assert_close(state["language_model.embed_tokens.weight"][ids], base["model"]["embed_tokens"](ids))


# ---- HPSv2 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hps2_dir(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hpsv2")
    fakes.write_hpsv2_checkpoint(root)
    return root


def _hps2(root, **extra):
    opts = {"checkpoint_dir": str(root), "architecture": "tiny-hps-test", "image_size": 32, "device": "cpu", **extra}
    return build_reward(RewardSpec(name="hpsv2", options=opts))


def test_hpsv2_matches_independent_open_clip(hps2_dir, videos) -> None:
    import open_clip

    out = _hps2(hps2_dir, batch_size=4)(videos, PROMPTS)
    assert out.scores.shape == (3,) and out.scores.dtype == np.float32
    model = open_clip.create_model("tiny-hps-test", pretrained=None)
    model.load_state_dict(torch.load(hps2_dir / hpsv2.CHECKPOINT_FILE)["state_dict"])
    model.eval()
    x = torch.from_numpy(videos).reshape(-1, 40, 70, 3).permute(0, 3, 1, 2).float() / 255
    x = torch.nn.functional.interpolate(x, size=(18, 32), mode="bicubic", antialias=True).clamp(0, 1)  # 40x70 -> 18x32
    x = torch.nn.functional.pad(x, (0, 0, 7, 7))
    x = (x - torch.tensor(common.OPENAI_CLIP_MEAN).view(1, 3, 1, 1)) / torch.tensor(common.OPENAI_CLIP_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(x), dim=-1).view(3, 5, -1)
        txt = torch.nn.functional.normalize(model.encode_text(open_clip.get_tokenizer("tiny-hps-test")(PROMPTS)), dim=-1)
    sims = (img * txt[:, None]).sum(-1)  # (3, 5); top int(1.5)=1 frame
    np.testing.assert_allclose(out.scores, sims.max(dim=1).values.numpy(), atol=1e-5)
    np.testing.assert_allclose(out.details["all_frames_mean"], sims.mean(1).numpy(), atol=1e-5)
    np.testing.assert_array_equal(_hps2(hps2_dir, batch_size=4)(videos, PROMPTS).scores, out.scores)  # determinism
    np.testing.assert_allclose(_hps2(hps2_dir, batch_size=1)(videos, PROMPTS).scores, out.scores, atol=1e-6)


def test_hpsv2_bad_sample_is_nan_via_contract(hps2_dir, videos, monkeypatch) -> None:
    reward = _hps2(hps2_dir)
    good = reward(videos, PROMPTS).scores
    original = hpsv2.HPSv2Reward.score_batch

    def flaky(self, batch, prompts):
        if "boom" in prompts:
            raise RuntimeError("boom")
        return original(self, batch, prompts)

    monkeypatch.setattr(hpsv2.HPSv2Reward, "score_batch", flaky)
    out = reward(videos, ["a red cat", "boom", "sunset over the sea"])
    assert np.isnan(out.scores[1]) and 1 in out.errors
    np.testing.assert_allclose(out.scores[[0, 2]], good[[0, 2]], atol=1e-6)


def test_hpsv2_missing_file_and_identity(hps2_dir, tmp_path) -> None:
    with pytest.raises(MissingCheckpointError, match="HPS_v2.1_compressed.pt.*xswu/HPSv2"):
        _hps2(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in hps2_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    before = _hps2(copy).identity_hash()
    assert _hps2(copy, device="cpu", batch_size=3).identity_hash() == before  # execution-only options
    data = bytearray((copy / hpsv2.CHECKPOINT_FILE).read_bytes())
    data[-1] ^= 1
    (copy / hpsv2.CHECKPOINT_FILE).write_bytes(bytes(data))
    assert _hps2(copy).identity_hash() != before


# ---- HPSv3 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hps3_dirs(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("hpsv3")
    fakes.write_hpsv3_checkpoint(root / "ckpt", root / "qwen", fakes.qwen2vl_test_config())
    return root / "ckpt", root / "qwen"


def _hps3(dirs, **extra):
    opts = {"checkpoint_dir": str(dirs[0]), "backbone_dir": str(dirs[1]), "min_pixels": 28 * 28,
            "max_pixels": 56 * 84, "device": "cpu", **extra}
    return build_reward(RewardSpec(name="hpsv3", options=opts))


def test_hpsv3_round_trip_determinism_and_bad_prompt(hps3_dirs, videos) -> None:
    reward = _hps3(hps3_dirs, batch_size=3)
    out = reward(videos, PROMPTS)
    assert out.scores.shape == (3,) and out.scores.dtype == np.float32 and np.isfinite(out.scores).all()
    alone = [_hps3(hps3_dirs, batch_size=5)(videos[i : i + 1], [PROMPTS[i]]).scores[0] for i in range(3)]
    np.testing.assert_allclose(out.scores, alone, atol=1e-5)  # padding/batching does not change scores
    assert len(set(out.scores.tolist())) == 3
    bad = reward(videos, ["a red cat", "trick <|Reward|>", "sunset over the sea"])
    assert np.isnan(bad.scores[1]) and 1 in bad.errors
    np.testing.assert_allclose(bad.scores[[0, 2]], out.scores[[0, 2]], atol=1e-5)


def test_hpsv3_missing_files(hps3_dirs, tmp_path) -> None:
    with pytest.raises(MissingCheckpointError, match="HPSv3.safetensors.*MizzenAI/HPSv3"):
        _hps3((tmp_path, hps3_dirs[1]))
    with pytest.raises(MissingCheckpointError, match="preprocessor_config.json"):
        _hps3((hps3_dirs[0], tmp_path))


# ---- VideoReward ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def va_dirs(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("videoalign")
    fakes.write_videoalign_checkpoint(root / "ckpt", root / "qwen", fakes.qwen2vl_test_config())
    return root / "ckpt", root / "qwen"


def _va(name, dirs, **extra):
    opts = {"checkpoint_dir": str(dirs[0]), "backbone_dir": str(dirs[1]), "num_frames": 4, "device": "cpu", **extra}
    return build_reward(RewardSpec(name=name, options=opts))


def test_videoalign_three_dims_share_model_and_normalize(va_dirs, videos) -> None:
    vq, mq, ta = (_va(n, va_dirs) for n in ("videoalign_vq", "videoalign_mq", "videoalign_ta"))
    assert vq._model() is mq._model() is ta._model()
    stats = {"VQ": (0.5, 2.0), "MQ": (-0.25, 0.5), "TA": (0.0, 4.0)}
    for reward, dim in ((vq, "VQ"), (mq, "MQ"), (ta, "TA")):
        out = reward(videos, PROMPTS)
        assert out.scores.dtype == np.float32 and out.scores.shape == (3,)
        mean, std = stats[dim]
        np.testing.assert_allclose(out.scores, (out.details["raw"] - mean) / std, rtol=1e-5)
    # MQ sees torchvision grayscale: feeding pre-grayed frames gives the same MQ
    v = videos.astype(np.float32)
    gray = np.floor(0.2989 * v[..., 0] + 0.587 * v[..., 1] + 0.114 * v[..., 2]).astype(np.uint8)
    gray3 = np.repeat(gray[..., None], 3, axis=-1)
    from astrolabe.rewards import VideoBatch

    raw_gray_input, _ = mq._model().logits(mq, VideoBatch(gray3), PROMPTS, gray=False)
    np.testing.assert_allclose(raw_gray_input[:, 1], mq(videos, PROMPTS).details["raw"], atol=1e-5)
    assert not np.allclose(vq(gray3, PROMPTS).scores, vq(videos, PROMPTS).scores)


def test_videoalign_missing_files(va_dirs, tmp_path) -> None:
    (tmp_path / "model_config.json").write_text("{}")
    (tmp_path / "checkpoint-7").mkdir()
    with pytest.raises(MissingCheckpointError, match="adapter_model.safetensors.*KwaiVGI/VideoReward"):
        _va("videoalign_vq", (tmp_path, va_dirs[1]))
