import pytest
import yaml

from astrolabe.config import ConfigError, config_from_dict, dump_config, load_config


def test_defaults_and_tiny_preset_roundtrip(tmp_path):
    for cfg in (load_config(None), load_config("configs/tiny.yaml", ["rl.nft.beta=0.2", "rollout.group_size=3"])):
        text = dump_config(cfg)
        p = tmp_path / "resolved.yaml"
        p.write_text(text)
        assert load_config(p) == cfg
    cfg = load_config("configs/tiny.yaml", ["rl.nft.beta=0.2"])
    assert cfg.rl.nft.beta == 0.2 and cfg.rl.selective_kl.main_reward == "colorfulness"


@pytest.mark.parametrize(
    "override,path,hint",
    [
        (["model.foo=1"], "model.foo", "unknown key"),
        (["rl.nft.beta=abc"], "rl.nft.beta", "valid number"),
        (["rl.nft.beta=-1"], "rl.nft.beta", "greater than 0"),
        (["model.dtype=float64"], "model.dtype", "float32"),
        (["rollout.group_size=1"], "rollout.group_size", "at least 2 candidates per group"),
    ],
)
def test_errors_name_the_path(override, path, hint):
    with pytest.raises(ConfigError) as e:
        load_config(None, override)
    assert path in str(e.value) and hint in str(e.value)


def test_cross_checks_and_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="not in rewards.rewards"):
        load_config(None, ["rl.selective_kl.main_reward=hpsv3", "rl.selective_kl.auxiliary_rewards=[motion]"])
    with pytest.raises(ConfigError, match="adv_clip_max"):
        load_config(None, ["rl.nft.adv_clip_max=3"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["rl.nft.beta"])
    with pytest.raises(ConfigError, match="frozen|unknown"):
        config_from_dict(yaml.safe_load("name: x\nbogus: 1\n"))
