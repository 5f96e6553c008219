"""End-to-end resume and rerun behaviour of ``astrolabe train`` (local engine) on the small tiny run.

Every test works on a copy of the reference run (tests/pipeline_helpers.py) with some outputs removed,
forced or locked, and checks what is recomputed, what stays cached (manifest ``created`` unchanged) and
that the final checkpoint equals the uninterrupted reference (stages are deterministic).
"""

from __future__ import annotations

import logging
import signal
import subprocess

import numpy as np
import pytest

import pipeline_helpers as ph
from pipeline_helpers import base, ref  # noqa: F401  (shared fixtures)
from astrolabe.artifacts.manifest import verify
from astrolabe.artifacts.stagedir import StageDir, stage_root
from astrolabe.config import load_config
from flows.run import HISTORY_DIR, load_run_config, record_config, train_run
from astrolabe.artifacts.keys import stage_key
from astrolabe.artifacts.plan import direct_runner, plan_status, run_stage
from stages import STAGES

ITER1 = [("rollout", 1), ("score", 1), ("label_uncertainty", 1), ("nft_update", 1), ("evaluate", 2)]



def statuses(run):
    return {s.node.label: s.status for s in plan_status(load_run_config(run), run, STAGES)}


def final_checkpoint(run):
    return ph.node_dir(run, "nft_update", 1)


# ----------------------------------------------------------------------------------- SIGKILL


def test_sigkill_in_rollout_then_in_nft_update_resumes_to_the_reference(ref, base, tmp_path):
    run = ph.copy_run(ref, "killed")
    ph.delete_nodes(run, ITER1)
    before = ph.created(run)  # iteration 0, evaluate[1], filter_prompts

    # 1) killed while rollout[1] is being written
    proc = ph.start_train(run, base, tmp_path / "a.log")
    tmp = ph.wait_for_tmp_dir(proc, run, "rollout", 1)
    ph.kill_group(proc)
    assert proc.returncode == -signal.SIGKILL
    assert tmp.is_dir(), "the dead writer's temporary directory is left behind (cleaned on the next begin)"
    assert ph.created(run) == before, "a completed stage was recomputed or a partial output was published"
    st = statuses(run)
    assert st["rollout[1]"] == "missing" and st["nft_update[0]"] == "done"

    # 2) rerun, killed while nft_update[1] is being written
    proc = ph.start_train(run, base, tmp_path / "b.log")
    tmp2 = ph.wait_for_tmp_dir(proc, run, "nft_update", 1)
    ph.kill_group(proc)
    assert not tmp.exists(), "the stale rollout temporary directory was not cleaned up"
    assert tmp2.is_dir()
    after_b = ph.created(run)
    assert {k: v for k, v in after_b.items() if k in before} == before
    assert {(s, i) for s, i, _ in set(after_b) - set(before)} == {("rollout", 1), ("score", 1),
                                                                 ("label_uncertainty", 1)}
    assert statuses(run)["nft_update[1]"] == "missing"

    # 3) rerun to completion: only nft_update[1] and evaluate[2] are computed
    summary = train_run(load_run_config(run))
    assert summary.computed_nodes == 2 and summary.cached_nodes == 10
    assert set(summary.stage_seconds) == {"nft_update", "evaluate"}
    final = ph.created(run)
    assert {k: v for k, v in final.items() if k in after_b} == after_b
    assert ph.temporary_dirs(run) == []
    assert set(statuses(run).values()) == {"done"}
    ref_keys = {k[:2]: k[2] for k in ph.manifests(ref)}
    assert {k[:2]: k[2] for k in final} == ref_keys  # same keys: same config and inputs as the reference
    # generation is deterministic: the regenerated rollout[1] latents equal the reference's exactly
    mine, theirs = ph.rollout_records(run, 1), ph.rollout_records(ref, 1)
    assert [r["__key__"] for r in mine] == [r["__key__"] for r in theirs]
    for a, b in zip(mine, theirs):
        np.testing.assert_array_equal(a["latents"], b["latents"])
        np.testing.assert_array_equal(a["prefix"], b["prefix"])
        assert a["video"] == b["video"]  # mp4 encoding is bit-reproducible (single-threaded x264)
    ph.assert_same_checkpoint(final_checkpoint(run), final_checkpoint(ref))


# ----------------------------------------------------------------------------------- forced rerun


def test_forced_score_rerun_makes_exactly_its_dependents_stale(ref, base):
    run = ph.copy_run(ref, "forced0")
    cfg = load_run_config(run)
    old = ph.node_dir(run, "score", 0)
    old_instance = ph.manifests(run)[("score", 0, old.name)].instance
    res = run_stage(cfg, run, STAGES, "score", 0, force=True)
    assert not res.cached and res.manifest.instance not in ("", old_instance)
    assert res.path == old  # same key (same config and inputs), new instance
    st = statuses(run)
    assert {k for k, v in st.items() if v == "done"} == {"filter_prompts", "evaluate[0]", "rollout[0]", "score[0]"}
    assert {k for k, v in st.items() if v == "stale"} == {
        "label_uncertainty[0]", "nft_update[0]", "evaluate[1]",
        "rollout[1]", "score[1]", "label_uncertainty[1]", "nft_update[1]", "evaluate[2]",
    }


def test_forced_rerun_then_train_recomputes_only_the_dependents(ref, base):
    run = ph.copy_run(ref, "forced1")
    cfg = load_run_config(run)
    before = ph.created(run)
    run_stage(cfg, run, STAGES, "score", 1, force=True)
    st = statuses(run)
    assert {k for k, v in st.items() if v == "stale"} == {"label_uncertainty[1]", "nft_update[1]", "evaluate[2]"}
    assert all(v == "done" for k, v in st.items() if k not in {"label_uncertainty[1]", "nft_update[1]", "evaluate[2]"})

    summary = train_run(cfg)
    assert summary.computed_nodes == 3 and set(summary.stage_seconds) == {"label_uncertainty", "nft_update",
                                                                          "evaluate"}
    after = ph.created(run)
    changed = {k[:2] for k in before if after[k] != before[k]}
    assert changed == {("score", 1)}  # the forced one (same key, new instance); upstream untouched
    assert {k[:2] for k in set(after) - set(before)} == {("label_uncertainty", 1), ("nft_update", 1), ("evaluate", 2)}
    assert set(statuses(run).values()) == {"done"}
    # the old consumers (made from the old score instance) stay on disk as stale outputs of another key
    assert len([p for p in (run / "iter-0001" / "nft_update").iterdir() if not p.name.startswith(".")]) == 2
    new_final = StageDir(run, "nft_update", plan_key(run, "nft_update", 1), 1).path
    ph.assert_same_checkpoint(new_final, final_checkpoint(ref))


def plan_key(run, stage, iteration):
    return next(s.expected_key for s in plan_status(load_run_config(run), run, STAGES) if s.node.id == (stage, iteration))


# ----------------------------------------------------------------------------------- lock


def test_second_train_process_is_refused_while_the_first_completes(ref, base, tmp_path):
    run = ph.copy_run(ref, "locked")
    ph.delete_nodes(run, [("evaluate", 2)])
    first = ph.start_train(run, base, tmp_path / "first.log")
    try:
        ph.wait_for_lock_holder(first, run)
        first.send_signal(signal.SIGSTOP)  # hold the lock for as long as the second process needs
        second = subprocess.run(
            [*ph.cli_command(), "train", str(run / "config.yaml"), "--engine", "local"],
            cwd=ph.REPO, env=ph.cli_env(base), capture_output=True, text=True, timeout=300,
        )
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 3, second.stderr[-2000:]
    err = " ".join(second.stderr.split())
    assert f"is locked by pid {first.pid}" in err and "RunLockedError" in err
    assert "Traceback" not in second.stderr
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-3000:]
    assert set(statuses(run).values()) == {"done"}
    assert ph.temporary_dirs(run) == []
    for stage, it, key in ph.manifests(run):
        verify(stage_root(run, stage, it) / key)  # every file matches its manifest's size and sha256


# ----------------------------------------------------------------------------------- config change


class _StopBeforeCompute(Exception):
    pass


def test_config_change_explains_what_is_recomputed_and_keeps_history(ref, base, caplog):
    run = ph.copy_run(ref, "changed")
    old_yaml = (run / "config.yaml").read_text()
    old_cfg = load_run_config(run)
    new_cfg = load_config(run / "config.yaml", ["rl.nft.beta=0.2"])
    assert old_cfg.rl.nft.beta != 0.2
    first_computed = []

    def stop_at_first_compute(cfg, run_path):
        inner = direct_runner(cfg, run_path, STAGES)

        def runner(node, inputs, force):
            key, _ = stage_key(STAGES[node.stage], cfg, inputs)
            if not StageDir(run_path, node.stage, key, node.iteration).is_complete():
                first_computed.append(node.label)
                raise _StopBeforeCompute
            return inner(node, inputs, force)

        return runner

    with caplog.at_level(logging.WARNING, logger="flows.run"), pytest.raises(_StopBeforeCompute):
        train_run(new_cfg, runner_factory=stop_at_first_compute)
    assert first_computed == ["nft_update[0]"]  # rollout[0], score[0], label[0] stayed cached
    text = caplog.text
    assert f"rl.nft.beta: {old_cfg.rl.nft.beta!r} -> 0.2" in text
    line = next(ln for ln in text.splitlines() if "completed stages that will be recomputed:" in ln)
    listed = set(line.split("recomputed:")[1].replace(" ", "").split(","))
    assert listed == {"nft_update[0]", "evaluate[1]", "rollout[1]", "score[1]", "label_uncertainty[1]",
                      "nft_update[1]", "evaluate[2]"}
    history = sorted((run / HISTORY_DIR).glob("*.yaml"))
    assert [p.name for p in history] == ["000.yaml"] and history[0].read_text() == old_yaml
    assert load_run_config(run).rl.nft.beta == 0.2
    st = statuses(run)
    assert {k for k, v in st.items() if v == "done"} == {"filter_prompts", "evaluate[0]", "rollout[0]", "score[0]",
                                                          "label_uncertainty[0]"}
    # the same config again: nothing to explain, no new history entry
    assert record_config(run, new_cfg) is None
    assert len(list((run / HISTORY_DIR).glob("*.yaml"))) == 1


# ----------------------------------------------------------------------------------- cached rerun


def test_fully_cached_rerun_computes_nothing(ref, base):
    run = ph.copy_run(ref, "cached")
    before = ph.created(run)
    summary = train_run(load_run_config(run))
    assert summary.computed_nodes == 0 and summary.cached_nodes == 12 and summary.stage_seconds == {}
    assert summary.config_change is None
    assert ph.created(run) == before
    assert summary.eval.keys() == {0, 1, 2}
