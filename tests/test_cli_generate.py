import json

from typer.testing import CliRunner

from flows.cli import app
from astrolabe.data.video import decode_mp4


def test_generate_end_to_end_tiny(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball rolling\na red ball[1s#] | a blue cube spinning\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["generate", "--prompt-file", str(prompts), "--num-frames", "25", "-o", str(out)])
    assert res.exit_code == 0, res.output
    for i in range(2):
        frames = decode_mp4(out / f"{i:04d}.mp4")
        assert frames.shape == (25, 64, 64, 3)  # 7 latent frames, generated as 3 whole blocks, trimmed
        side = json.loads((out / f"{i:04d}.json").read_text())
        assert side["seed"] == i and side["num_pixel_frames"] == 25
    side = json.loads((out / "0001.json").read_text())
    assert side["scenes"][1]["hard_cut_before"] is True


def test_generate_same_seed_same_video(tmp_path):
    runner = CliRunner()
    for name in ("a", "b"):
        res = runner.invoke(app, ["generate", "--prompt", "a green kite", "--seed", "5", "-o", str(tmp_path / name)])
        assert res.exit_code == 0, res.output
    assert (tmp_path / "a/0000.mp4").read_bytes() == (tmp_path / "b/0000.mp4").read_bytes()


def test_generate_bad_inputs(tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["generate", "-o", str(tmp_path)])
    assert res.exit_code == 2 and "exactly one" in res.output
    res = runner.invoke(app, ["generate", "--prompt", "a[3x] | b", "-o", str(tmp_path)])
    assert res.exit_code == 2 and "expected a duration" in res.output
    res = runner.invoke(app, ["generate", "--prompt", "a", "--num-frames", "24", "-o", str(tmp_path)])
    assert res.exit_code == 2 and "1 + 4k" in res.output
    res = runner.invoke(app, ["generate", "--prompt", "a", "--set", "model.base=self_forcing", "-o", str(tmp_path)])
    assert res.exit_code == 2 and "checkpoint_dir" in res.output


def test_generate_with_lora_checkpoint(tmp_path):
    import torch

    from astrolabe.models.wan.config import tiny
    from astrolabe.models.wan.dit import WanDiT
    from astrolabe.rl.lora import LoRAConfig, apply_lora, save_adapter

    dit = WanDiT(tiny())
    dit.init_weights(torch.Generator().manual_seed(0))
    peft_model = apply_lora(dit, LoRAConfig(rank=4, alpha=4.0), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.5)
    save_adapter(peft_model, tmp_path / "ckpt" / "lora")
    runner = CliRunner()
    args = ["generate", "--prompt", "a red ball", "--num-frames", "9"]
    assert runner.invoke(app, [*args, "-o", str(tmp_path / "base")]).exit_code == 0
    res = runner.invoke(app, [*args, "--checkpoint", str(tmp_path / "ckpt"), "-o", str(tmp_path / "lora")])
    assert res.exit_code == 0, res.output
    a, b = decode_mp4(tmp_path / "base/0000.mp4"), decode_mp4(tmp_path / "lora/0000.mp4")
    assert a.shape == b.shape and (a != b).any()
    res = runner.invoke(app, [*args, "--checkpoint", str(tmp_path / "nope"), "-o", str(tmp_path / "x")])
    assert res.exit_code == 2 and "no LoRA adapter" in res.output


def test_generate_checks_every_plan_before_generating(tmp_path):
    """Tiny model: 16 fps, 3-frame blocks. 'a[5s] | b[5s] | c' needs 6 + 6 + 1 = 13 blocks = 39 latent frames
    = --num-frames 153; with --num-frames 25 nothing is generated, not even the first (fitting) line."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red ball\na red ball[5s] | a blue cube[5s] | a green kite\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["generate", "--prompt-file", str(prompts), "--num-frames", "25", "-o", str(out)])
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert "prompt 2" in text and "--num-frames 153 fits every prompt" in text
    assert not out.exists()


def test_generate_grows_to_fit_scenes_with_cache_relative_rope(tmp_path):
    """Without --num-frames the video grows from the tiny default (21 latent frames) to the plan's
    4 + 4 + 1 blocks = 27 latent frames; the release's RoPE variant is accepted through --set."""
    out = tmp_path / "out"
    args = ["generate", "--prompt", "a red ball[3s] | a blue cube[3s] | a kite", "-o", str(out)]
    res = CliRunner().invoke(app, [*args, "--set", "sampling.rope=cache_relative", "--set", "model.sink_frames=3",
                                   "--set", "model.local_attn_frames=9"])
    assert res.exit_code == 0, res.output
    side = json.loads((out / "0000.json").read_text())
    assert side["num_latent_frames"] == 27 and side["config"]["sampling"]["rope"] == "cache_relative"
    assert [(s["start_block"], s["end_block"]) for s in side["scenes"]] == [(0, 4), (4, 8), (8, 9)]
    assert decode_mp4(out / "0000.mp4").shape[0] == 1 + 4 * 26
