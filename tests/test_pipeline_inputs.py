"""End-to-end behaviour on bad inputs (prompts, rewards, checkpoints, shards, disk, NaN rewards), rescoring
and ``astrolabe status``, on copies of the small reference run (tests/pipeline_helpers.py)."""

from __future__ import annotations

import errno
import math
import re
from typing import ClassVar

import numpy as np
import pytest
from pydantic import Field
from rich.console import Console
from typer.testing import CliRunner

import pipeline_helpers as ph
from pipeline_helpers import base, ref  # noqa: F401  (shared fixtures)
from astrolabe.artifacts.manifest import ArtifactPublishError, verify
from astrolabe.artifacts.stagedir import stage_root
from astrolabe.config import config_from_dict, config_to_dict
from astrolabe.data.arrays import read_columns
from astrolabe.rewards import Reward, RewardOptions, RewardOutput, register_reward, registry
from flows import cli, cli_bench, cli_common, cli_services, cli_summary, cli_world
from flows.rescore import rescore_run
from flows.run import load_run_config
from stages import label_uncertainty, nft_update, score
from astrolabe.artifacts.engine import execute
from astrolabe.artifacts.plan import StageInputError, plan_status, run_stage
from stages import STAGES



@pytest.fixture
def invoke(monkeypatch):
    """Run the CLI in-process; error messages are printed unwrapped (wide console)."""
    wide = Console(stderr=True, width=10_000, color_system=None)
    for module in (cli, cli_common, cli_services, cli_summary, cli_world, cli_bench):  # every command module's console
        monkeypatch.setattr(module, "console", wide)

    def run(*args: str):
        return CliRunner().invoke(cli.app, [str(a) for a in args])

    return run


def flat(text: str) -> str:
    return " ".join(text.split())


def train_args(runs_root, name, *extra):
    sets = [*ph.SMALL_OVERRIDES, f"pipeline.runs_root={runs_root}", f"name={name}", *extra]
    return ["train", str(ph.TINY), "--engine", "local", *[a for s in sets for a in ("--set", s)]]


# ----------------------------------------------------------------------------------- prompts and rewards


@pytest.mark.parametrize(
    "content, expected",
    [
        ("", "file is empty"),
        ("red\nblue\na forbidden red ball rolling\n\n", "too_short"),  # 1-token lines and a blocklisted one
    ],
    ids=["empty", "all-filtered"],
)
def test_unusable_prompt_file_is_a_clear_error(tmp_path, base, invoke, content, expected):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    res = invoke(*train_args(tmp_path / "runs", "badprompts", f"data.train_prompts={prompts}",
                             "data.blocklist=[forbidden]"))
    out = flat(res.output)
    assert res.exit_code != 0
    assert f"prompt file {prompts} has no usable prompt" in out and "fix the file" in out, out
    assert expected in out
    assert "Traceback" not in res.output
    assert not (tmp_path / "runs" / "badprompts" / "iter-0000").exists()  # nothing heavy started


def test_unknown_reward_fails_before_any_heavy_work(tmp_path, base, invoke):
    res = invoke(*train_args(tmp_path / "runs", "badreward", "rewards.rewards=[{name: nope, weight: 1}]",
                             "rl.selective_kl=null"))
    out = flat(res.output)
    assert res.exit_code != 0
    assert "'nope'" in out and "text_color_match" in out and "colorfulness" in out, out  # lists the known names
    assert "Traceback" not in res.output
    run = tmp_path / "runs" / "badreward"
    assert not list(run.glob("iter-*/*/[!.]*")), "a per-iteration stage produced output before the error"


# ----------------------------------------------------------------------------------- missing inputs


def test_missing_checkpoint_is_named(ref, base, tmp_path):
    run = ph.copy_run(ref, "nockpt")
    ph.delete_nodes(run, [("nft_update", 0)])
    cfg = load_run_config(run)
    with pytest.raises(StageInputError, match=r"input 'checkpoint' of rollout\[1\] \(nft_update\[0\]\) is missing"):
        run_stage(cfg, run, STAGES, "rollout", 1, force=False)
    inputs = {"rollout": ph.node_dir(run, "rollout", 1), "labels": ph.node_dir(run, "label_uncertainty", 1)}
    with pytest.raises(FileNotFoundError, match=r"nft_update at iteration 1 needs inputs\['checkpoint'\]"):
        nft_update.run(cfg, inputs, tmp_path, 1)
    assert not (tmp_path / "state").exists()


def test_corrupt_shard_fails_and_keeps_the_completed_score(ref, base, invoke):
    run = ph.copy_run(ref, "corrupt")
    (shard,) = ph.node_dir(run, "rollout", 0).glob("*.tar")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    score_dir = ph.node_dir(run, "score", 0)
    before = ph.created(run)
    res = invoke("stage", "score", "--run", run, "--iteration", "0", "--force")
    out = flat(res.output)
    assert res.exit_code == 1, out
    # caught by the input check before the shard is read (CorruptShardError is the reader's own last line)
    assert "is damaged" in out and shard.name in out and "astrolabe train" in out, out
    assert "Traceback" not in res.output
    verify(score_dir)  # the previous output is still there, every file intact
    assert ph.created(run) == before and ph.temporary_dirs(run) == []


def test_disk_full_while_publishing_then_rerun(ref, base, monkeypatch):
    from astrolabe.artifacts import atomic

    run = ph.copy_run(ref, "diskfull")
    ph.delete_nodes(run, [("score", 1)])
    before = ph.created(run)
    cfg = load_run_config(run)
    real = atomic.write_durable

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(atomic, "write_durable", full)
    with pytest.raises(ArtifactPublishError, match="no space left on device") as info:
        run_stage(cfg, run, STAGES, "score", 1, force=False)
    assert "free disk space" in str(info.value)
    assert list(stage_root(run, "score", 1).iterdir()) == []  # no partial final directory, no temporary one
    assert ph.created(run) == before
    for stage, it, key in ph.manifests(run):
        verify(stage_root(run, stage, it) / key)

    monkeypatch.setattr(atomic, "write_durable", real)  # space freed
    res = run_stage(cfg, run, STAGES, "score", 1, force=False)
    assert not res.cached and res.path == stage_root(run, "score", 1) / ph.node_dir(ref, "score", 1).name
    keys, cols, _ = read_columns(res.path / score.REWARDS_FILE)
    ref_keys, ref_cols, _ = read_columns(ph.node_dir(ref, "score", 1) / score.REWARDS_FILE)
    assert keys == ref_keys
    np.testing.assert_array_equal(cols["text_color_match"], ref_cols["text_color_match"])
    assert {s.node.label: s.status for s in plan_status(cfg, run, STAGES)}["nft_update[1]"] == "done"


# ----------------------------------------------------------------------------------- NaN rewards


class NanOptions(RewardOptions):
    prompt: str = Field("", description="candidates of this prompt score NaN; '*' = every candidate")


class NanForPromptReward(Reward):
    """``0.25 + candidate-dependent mean pixel``; NaN for every candidate of one prompt (or all)."""

    name: ClassVar[str] = "nan_group_test"
    version: ClassVar[str] = "1"
    Options: ClassVar[type[NanOptions]] = NanOptions

    def score_batch(self, batch, prompts):
        means = batch.float01.mean(axis=(1, 2, 3, 4)) + 0.25
        bad = np.array([self.options.prompt in ("*", p) for p in prompts])
        return RewardOutput(np.where(bad, np.nan, means).astype(np.float32))


@pytest.fixture
def nan_reward():
    saved = dict(registry._REGISTRY)
    register_reward("nan_group_test")(NanForPromptReward)
    yield
    registry._REGISTRY.clear()
    registry._REGISTRY.update(saved)


def with_nan_reward(cfg, prompt):
    data = config_to_dict(cfg)
    data["rewards"]["rewards"].append({"name": "nan_group_test", "weight": 1.0, "options": {"prompt": prompt}})
    return config_from_dict(data)


def test_nan_rewards_for_one_group_are_counted_and_skipped(ref, base, nan_reward):
    run = ph.copy_run(ref, "nangroup")
    records = ph.rollout_records(run, 0)
    groups = {r["meta"]["group"]: r["meta"]["prompt"] for r in records}
    assert len(groups) == 2 and len(set(groups.values())) == 2
    bad_group, bad_prompt = sorted(groups.items())[0]
    per_group = sum(r["meta"]["group"] == bad_group for r in records)
    cfg = with_nan_reward(load_run_config(run), bad_prompt)
    rollout = ph.node_dir(run, "rollout", 0)

    s = execute(score, cfg, run, {"rollout": rollout}, 0)
    assert s.counts["nan/nan_group_test"] == per_group
    score_dir = stage_root(run, "score", 0) / s.key
    lab = execute(label_uncertainty, cfg, run, {"rollout": rollout, "score": score_dir}, 0)
    assert lab.counts["nan_groups"] == 1 and lab.counts["nan_excluded"] == per_group
    label_dir = stage_root(run, "label_uncertainty", 0) / lab.key
    keys, cols, _ = read_columns(label_dir / label_uncertainty.LABELS_FILE)
    bad = np.array([k.startswith(bad_group + "-") for k in keys])
    assert np.isnan(cols["r"][bad]).all() and np.isfinite(cols["r"][~bad]).all()

    upd = execute(nft_update, cfg, run, {"rollout": rollout, "labels": label_dir}, 0)
    assert upd.counts["skipped_nan_r"] == per_group and upd.counts["trained"] == len(records) - per_group
    assert upd.counts["optimizer_steps"] >= 1 and np.isfinite(upd.metrics["loss/total"])


def test_reward_nan_for_every_record_is_a_clear_error(ref, base, nan_reward):
    run = ph.copy_run(ref, "nanall")
    cfg = with_nan_reward(load_run_config(run), "*")
    rollout = ph.node_dir(run, "rollout", 0)
    s = execute(score, cfg, run, {"rollout": rollout}, 0)
    with pytest.raises(ValueError, match=r"rewards \['nan_group_test'\] are NaN for every one of the 8 records"):
        execute(label_uncertainty, cfg, run, {"rollout": rollout, "score": stage_root(run, "score", 0) / s.key}, 0)
    assert ph.temporary_dirs(run) == []


# ----------------------------------------------------------------------------------- rescore and MLflow


def test_rescore_adds_a_reward_without_regenerating_and_logs_to_the_run(ref, base):
    from mlflow.tracking import MlflowClient

    run = ph.copy_run(ref, "rescored", keep_mlflow=True)
    before = ph.created(run)
    out = rescore_run(run, ["colorfulness=1.0"])
    assert set(out) == {0, 1} and all("rescore/colorfulness/mean" in m for m in out.values())
    after = ph.created(run)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing recomputed
    new = set(after) - set(before)
    assert {(s, i) for s, i, _ in new} == {("score", 0), ("score", 1)}  # no new rollout, one score per iteration
    for s, i, key in new:
        _, cols, _ = read_columns(stage_root(run, s, i) / key / score.REWARDS_FILE)
        assert "colorfulness" in cols and "text_color_match" not in cols
        assert out[i]["rescore/colorfulness/mean"] == pytest.approx(float(np.nanmean(cols["colorfulness"])))

    client = MlflowClient(tracking_uri=ph.mlflow_uri(base))
    run_id = (run / "mlflow_run_id.txt").read_text().strip()

    def steps(metric):
        return sorted(m.step for m in client.get_metric_history(run_id, metric))

    assert steps("reward/text_color_match/mean") == [0, 1]
    assert steps("rescore/colorfulness/mean") == [0, 1]
    for metric in ("loss/total", "time/rollout", "memory/rollout_peak_rss_mib"):
        assert steps(metric) == [0, 1], metric
    # logged by label_uncertainty (flagged / records) and again by nft_update's metrics at the same step
    assert sorted(set(steps("kl/flagged_fraction"))) == [0, 1]
    assert steps("eval/combined/mean") == [0, 1, 2]
    params = client.get_run(run_id).data.params
    assert params["rl.nft.beta"] == str(load_run_config(run).rl.nft.beta)

    def files(path):
        return {f.path for f in client.list_artifacts(run_id, path)}

    assert "config/config.yaml" in files("config")
    assert {"plots/reward_curves.png", "plots/rescore_curves.png"} <= files("plots")
    assert {"eval/iter-0000/grid.mp4", "eval/iter-0000/grid.png", "eval/iter-0000/metrics.json"} <= files(
        "eval/iter-0000")


# ----------------------------------------------------------------------------------- status


def test_status_prints_done_stale_missing(ref, base, invoke):
    run = ph.copy_run(ref, "statusrun")
    cfg = load_run_config(run)
    run_stage(cfg, run, STAGES, "score", 1, force=True)  # label[1], nft_update[1], evaluate[2] become stale
    ph.delete_nodes(run, [("evaluate", 2)])  # ... and evaluate[2] missing
    res = invoke("status", run)
    assert res.exit_code == 0, res.output
    assert "filter_prompts: done" in res.output
    header = next(line.split() for line in res.output.splitlines() if line.startswith("iteration"))
    assert header == ["iteration", "rollout", "score", "labels", "update", "evaluate"]
    rows = {m[1]: line.split()[1:] for line in res.output.splitlines() if (m := re.match(r"^\s*(\d+)\s", line))}
    assert rows == {"0": ["done", "done", "done", "done", "done"],  # iteration k: its stages and evaluate[k]
                    "1": ["done", "done", "stale", "stale", "done"],
                    "2": ["-", "-", "-", "-", "missing"]}
    assert "stage calls: 12 (9 done, 0 damaged, 2 stale, 1 missing)" in res.output


def test_eval_margins_are_in_units_of_the_baseline_std():
    from flows.cli_summary import eval_cell
    from flows.run import eval_margins

    evals = {
        0: {"reward/a/mean": 0.5, "reward/a/std": 0.1, "combined/mean": 1.0, "combined/std": 0.0, "n": 8},
        4: {"reward/a/mean": 0.7, "reward/a/std": 0.3, "combined/mean": 1.2, "combined/std": 0.2, "n": 8},
    }
    margins = eval_margins(evals)
    assert margins[0] == {"reward/a": 0.0}
    assert margins[4] == pytest.approx({"reward/a": 2.0})  # (0.7 - 0.5) / 0.1: the baseline's std, not iteration 4's
    assert "combined" not in margins[4]  # zero baseline std: no margin rather than inf
    assert eval_margins({}) == {}
    assert eval_cell(0.7, 2.0) == "0.7000 (+2.00 sd)"
    assert eval_margins({k: v | {"n": 2} for k, v in evals.items()}) == {}  # too few videos for std units
    assert eval_cell(None, None) == "-"


# ----------------------------------------------------------------------------------- bench noise


def test_bench_noise_measures_both_noise_settings_on_a_run_without_touching_it(ref, base, invoke, tmp_path):
    import json

    before = ph.created(ref)
    out = tmp_path / "noise.json"
    res = invoke("bench", "noise", ref, "--iteration", "1", "--draws", "2", "--json", out)
    assert res.exit_code == 0, res.output
    got = json.loads(out.read_text())
    cfg = load_run_config(ref)
    assert got["iteration"] == 1 and got["draws"] == 2
    assert got["sample"]["micro_batch_size"] == cfg.rl.micro_batch_size
    assert got["micro_batch"]["micro_batch_size"] == max(cfg.rl.micro_batch_size, cfg.rollout.group_size)
    for mode in ("sample", "micro_batch"):
        assert -1.0 <= got[mode]["agreement"] <= 1.0 and got[mode]["grad_norm"] > 0
    shared, alone = got["micro_batch"]["agreement"], got["sample"]["agreement"]
    assert got["agreement_ratio"] == pytest.approx(shared / alone) if alone > 0 else math.isnan(got["agreement_ratio"])
    # the shared draw really reached the update: its noise part cancels (measured 0.0011 against 0.0020)
    assert got["micro_batch"]["grad_norm"] < 0.8 * got["sample"]["grad_norm"]
    assert "agreement ratio" in res.output and "micro_batch" in res.output
    assert ph.created(ref) == before  # measured, nothing written into the run

    missing = invoke("bench", "noise", ref, "--iteration", "7")
    assert missing.exit_code == 2 and "iteration 7" in flat(missing.output) and "astrolabe status" in flat(missing.output)
    one = invoke("bench", "noise", ref, "--draws", "1")
    assert one.exit_code == 2 and "at least 2" in flat(one.output)
