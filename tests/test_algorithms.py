"""The NFT / AR-CoPO comparison table (`astrolabe bench algorithms`): per-method gains and spreads over seeds."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from flows.algorithms import METHODS, WORLD_METHODS, MethodRun, summarize_methods
from astrolabe.config import load_config


def _run(method: str, seed: int, first: float, last: float, wall: float, scale: float | None = None) -> MethodRun:
    metrics = lambda v: {"reward/colorfulness/mean": v, "combined/mean": 2 * v, "merge/s0.5/x/mean": 9.0}  # noqa: E731
    return MethodRun(method, seed, Path("."), wall, 100.0 + seed, metrics(first), metrics(last), scale)


def test_summary_gives_mean_and_spread_of_gains_per_method():
    runs = [_run("nft", 0, 0.5, 0.7, 10), _run("nft", 1, 0.5, 0.6, 12), _run("arcopo+merge", 0, 0.5, 0.4, 20, 0.5)]
    s = summarize_methods(runs)
    assert list(s) == ["nft", "arcopo+merge"]
    g = s["nft"]["gain/reward/colorfulness/mean"]
    assert g["mean"] == pytest.approx(0.15) and g["min"] == pytest.approx(0.1) and g["max"] == pytest.approx(0.2)
    assert s["nft"]["gain/combined/mean"]["mean"] == pytest.approx(0.3)
    assert s["arcopo+merge"]["gain/reward/colorfulness/mean"]["mean"] == pytest.approx(-0.1)
    assert s["nft"]["wall_s"] == {"mean": 11.0, "min": 10.0, "max": 12.0}
    assert s["nft"]["peak_rss_mib"]["max"] == 101.0
    assert s["arcopo+merge"]["merge_scales"] == [0.5] and "merge_scales" not in s["nft"]
    assert not any(k.startswith("gain/merge/") for k in s["nft"])  # the sweep's per-scale metrics are not gains


def test_a_missing_metric_is_nan_not_an_error():
    a, b = _run("nft", 0, 0.5, 0.7, 10), _run("nft", 1, 0.5, 0.6, 12)
    assert math.isnan(a.gain("reward/nope/mean"))
    assert math.isnan(summarize_methods([a, b], ["reward/nope/mean"])["nft"]["gain/reward/nope/mean"]["mean"])


@pytest.mark.parametrize("method", [*METHODS, *WORLD_METHODS], ids=lambda m: f"{m.name}:{m.config}")
def test_every_method_config_loads_with_its_overrides(method):
    cfg = load_config(Path(method.config), list(method.overrides))
    assert cfg.rl.algorithm == ("nft" if method.name == "nft" else "arcopo")
    assert (cfg.arcopo.semi is not None) == (method.name == "arcopo+merge") or method.name == "nft"


@pytest.mark.parametrize("methods", [METHODS, WORLD_METHODS], ids=["tiny", "world"])
def test_the_arms_share_model_prompts_rewards_and_evaluation(methods):
    """Run for run: only the algorithm differs between the arms of one table."""
    cfgs = [load_config(Path(m.config), list(m.overrides)) for m in methods]
    for c in cfgs[1:]:
        assert c.model.base == cfgs[0].model.base and c.data == cfgs[0].data
        assert c.rewards.rewards == cfgs[0].rewards.rewards
        assert c.rollout.group_size == cfgs[0].rollout.group_size
        assert c.rollout.prompts_per_iteration == cfgs[0].rollout.prompts_per_iteration
        assert (c.pipeline.eval_seeds, c.pipeline.eval_max_prompts) == (cfgs[0].pipeline.eval_seeds,
                                                                        cfgs[0].pipeline.eval_max_prompts)
