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
