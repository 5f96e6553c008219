"""Real-model presets, the ``resources`` section and the GPU scale table (issue 11 points 4-5)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from astrolabe.config import ConfigError, config_from_dict, dump_config, load_config
from astrolabe.presets import GPU_SCALES, gpu_scale
from flows.cli import app

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PRESETS = sorted(CONFIGS.rglob("*.yaml"))
REAL = [p for p in PRESETS if p.parent.name != "_base" and not p.name.startswith("tiny")]
# The release's NFT presets: 8 GPUs by default, batch layout derived from resources.gpus. The AR-CoPO preset
# sets its own layout (the paper's G = 12 on 24 GPUs is not a row of the release's table).
RELEASE = [p for p in REAL if p.stem != "arcopo"]

# The release's table (reference 2.5): (family, GPUs) -> (bsz, K, num_groups, test_bsz, batches/epoch, videos/epoch)
RELEASE_TABLE = {
    ("wan", 8): (3, 24, 16, 3, 16, 384),
    ("wan", 16): (2, 16, 16, 2, 8, 256),
    ("wan", 24): (4, 24, 48, 4, 12, 1152),
    ("wan", 48): (4, 24, 48, 4, 6, 1152),
    ("krea14b", 8): (1, 8, 8, 1, 8, 64),
    ("krea14b", 16): (1, 16, 16, 1, 16, 256),
    ("krea14b", 24): (1, 24, 24, 1, 24, 576),
    ("krea14b", 48): (1, 16, 48, 1, 16, 768),
}


def test_the_expected_presets_exist():
    names = {str(p.relative_to(CONFIGS)) for p in REAL}
    for model in ("self_forcing", "longlive", "causal_forcing_chunk", "causal_forcing_frame", "krea14b"):
        assert {f"{model}/hpsv3.yaml", f"{model}/multi_reward.yaml"} <= names
    assert {"longlive/hpsv3_lora_init.yaml", "longlive/long_streaming.yaml"} <= names


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_preset_validates_and_round_trips(path, tmp_path):
    cfg = load_config(path)
    again = tmp_path / "resolved.yaml"
    again.write_text(dump_config(cfg))
    assert load_config(again) == cfg
    if path in REAL:
        # real checkpoint directories are named, not required to exist at validation
        assert cfg.model.checkpoint_dir is not None and cfg.model.base != "tiny"
        assert cfg.name == f"{path.parent.name}_{path.stem}"
    if path in RELEASE:
        assert cfg.resources.gpus == 8


@pytest.mark.parametrize("family,gpus", sorted(RELEASE_TABLE))
def test_derived_batch_sizes_match_the_release_table(family, gpus):
    bsz, k, groups, test_bsz, batches, videos = RELEASE_TABLE[(family, gpus)]
    preset = CONFIGS / ("krea14b/hpsv3.yaml" if family == "krea14b" else "self_forcing/hpsv3.yaml")
    cfg = load_config(preset, [f"resources.gpus={gpus}"])
    assert cfg.rl.micro_batch_size == bsz
    assert cfg.rollout.group_size == k
    assert cfg.rollout.prompts_per_iteration == groups
    assert cfg.rl.accumulation_steps == groups * k // bsz  # every micro-batch of the iteration: one optimizer step
    assert cfg.resources.nproc_per_node * cfg.resources.nnodes == gpus
    scale = gpu_scale(cfg.model.base, gpus)
    assert (scale.family, scale.eval_batch, scale.batches_per_epoch, scale.videos_per_iteration) == (
        family, test_bsz, batches, videos)


def test_every_1_3b_model_uses_the_wan_rows():
    for path in RELEASE:
        cfg = load_config(path)
        expected = 8 if cfg.model.base == "krea14b" else 24
        assert cfg.rollout.group_size == expected, path


def test_presets_parallelise_by_model_size():
    """Issue 11 point 1: the 14B model is sharded (FSDP2), the 1.3B ones replicated (DDP); both checkpoint."""
    for path in REAL:
        cfg = load_config(path)
        expected = "fsdp" if cfg.model.base == "krea14b" else "ddp"
        assert (cfg.parallel.strategy, cfg.parallel.activation_checkpointing) == (expected, True), path


def test_arcopo_preset_keeps_the_papers_layout():
    """AR-CoPO on Self-Forcing: G = 12, 24 groups, 24 GPUs as 3 nodes x 8, no derived NFT table."""
    cfg = load_config(CONFIGS / "self_forcing/arcopo.yaml")
    assert (cfg.rl.algorithm, cfg.rollout.group_size, cfg.rollout.prompts_per_iteration) == ("arcopo", 12, 24)
    assert cfg.resources.gpus is None and cfg.resources.world_size() == 24
    assert cfg.rl.reference == "base" and cfg.rl.selective_kl is None
    # 2 policy-update steps per iteration: every group in one optimizer step, 2 passes
    assert cfg.rl.epochs * -(-cfg.rollout.prompts_per_iteration // cfg.rl.accumulation_steps) == 2
    with pytest.raises(ConfigError, match="rollout.group_size=12 conflicts with resources.gpus=24"):
        load_config(CONFIGS / "self_forcing/arcopo.yaml", ["resources.gpus=24"])


@pytest.mark.parametrize("gpus", [12, 0, 7, 64])
def test_bad_gpus_gives_the_clear_error(gpus):
    with pytest.raises(ConfigError, match="resources.gpus must be one of 8, 16, 24, 48"):
        load_config(CONFIGS / "self_forcing/hpsv3.yaml", [f"resources.gpus={gpus}"])
    assert tuple(GPU_SCALES) == (8, 16, 24, 48)


def test_derived_keys_conflict_and_layout_rules():
    with pytest.raises(ConfigError, match=r"rollout.group_size=4 conflicts with resources.gpus=16, which derives 16"):
        load_config("configs/tiny.yaml", ["resources.gpus=16"])
    # a layout other than 8 per node is fine when the product is the GPU count
    cfg = load_config(CONFIGS / "krea14b/hpsv3.yaml", ["resources.gpus=16", "resources.nproc_per_node=4",
                                                       "resources.nnodes=4"])
    assert (cfg.resources.nproc_per_node, cfg.resources.nnodes) == (4, 4)
    with pytest.raises(ConfigError, match="nproc_per_node x nnodes"):
        load_config(CONFIGS / "krea14b/hpsv3.yaml", ["resources.gpus=16", "resources.nnodes=3"])
    free = load_config(CONFIGS / "self_forcing/hpsv3.yaml", ["resources.gpus=null", "rollout.group_size=6"])
    assert free.rollout.group_size == 6 and free.resources.nproc_per_node == 1


def test_resources_defaults_and_stage_overrides():
    res = load_config(None).resources
    assert (res.gpus, res.nproc_per_node, res.nnodes, res.launcher, res.rdzv_endpoint) == (
        None, 1, 1, "torchrun", "127.0.0.1:29500")
    res = load_config(None, ["resources.nproc_per_node=8", "resources.launcher=slurm",
                             "resources.stages.score.nproc_per_node=2", "resources.stages.evaluate.nnodes=1"]).resources
    assert res.for_stage("score") == (2, 1) and res.for_stage("nft_update") == (8, 1)
    assert res.world_size("score") == 2 and res.world_size() == 8
    with pytest.raises(ConfigError, match="unknown stages"):
        load_config(None, ["resources.stages.scoring.nproc_per_node=2"])
    with pytest.raises(ConfigError, match="resources.launcher"):
        load_config(None, ["resources.launcher=mpirun"])
    with pytest.raises(ConfigError, match="resources.rdzv_endpoint"):
        load_config(None, ["resources.rdzv_endpoint=no-port"])


def test_extends_merges_and_detects_loops(tmp_path):
    (tmp_path / "base.yaml").write_text(
        "seed: 3\nrl: {nft: {beta: 0.2}, epochs: 2}\nrewards: {rewards: [{name: motion}]}\n"
    )
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nrl: {epochs: 5}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.seed, cfg.rl.nft.beta, cfg.rl.epochs) == (3, 0.2, 5)
    assert [s.name for s in cfg.rewards.rewards] == ["motion"]
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="loops back"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "orphan.yaml").write_text("extends: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "orphan.yaml")


def test_config_show_prints_the_derived_values():
    res = CliRunner().invoke(app, ["config", "show", str(CONFIGS / "self_forcing/hpsv3.yaml"),
                                   "--set", "resources.gpus=16"])
    assert res.exit_code == 0, res.output
    head = [line for line in res.output.splitlines() if line.startswith("#")]
    text = "\n".join(head)
    assert "resources.gpus=16" in text
    for label, value in [("per-GPU batch", "2"), ("samples per prompt", "16"), ("prompt groups", "16"),
                         ("batches per GPU per iteration", "8"), ("videos per iteration / per GPU", "256 / 16")]:
        line = next(h for h in head if label in h)
        assert line.split()[-1] == value.split()[-1] and value in line, line
    body = yaml.safe_load(res.output)  # the comment lines keep the output valid YAML
    cfg = config_from_dict(body)
    assert (cfg.rollout.group_size, cfg.rl.micro_batch_size, cfg.resources.nnodes) == (16, 2, 2)
    bad = CliRunner().invoke(app, ["config", "show", str(CONFIGS / "self_forcing/hpsv3.yaml"), "--set",
                                   "resources.gpus=12"])
    assert bad.exit_code == 2 and "must be one of 8, 16, 24, 48" in bad.output
