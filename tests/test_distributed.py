"""The pipeline under torchrun: rank context, merging of rank results, execute() on N gloo ranks, the CLI.

* unit: :class:`DistContext` env parsing, the missing-rendezvous error, no-op collectives at world size 1,
  :func:`astrolabe.artifacts.engine.merge_results` against hand-merged values.
* two gloo processes (``torch.multiprocessing`` spawn) calling :func:`astrolabe.artifacts.engine.execute` with fake
  stages: a sliced stage writes one file per rank into ONE published directory, a main stage runs on
  rank 0 only, a cached stage is not rerun, a failure on one rank makes every rank raise naming it
  (nothing published, process exits non-zero), and a held run lock stops every rank.
* end to end: ``torchrun --nproc_per_node 2 -m flows.cli train`` (1 iteration) against the single-process
  reference run of tests/pipeline_helpers.py (iteration 0 keys do not depend on the iteration count).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import pipeline_helpers as ph
from spawn_helpers import free_port, run_ranks
from pipeline_helpers import base, ref  # noqa: F401  (shared fixtures)
from astrolabe.artifacts.lock import RunLock
from astrolabe.artifacts.manifest import MANIFEST_NAME
from astrolabe.artifacts.ranks import rank_filename
from astrolabe.artifacts.stagedir import stage_root
from astrolabe.distributed import (
    DistContext,
    DistributedSetupError,
    backend_for,
    barrier,
    broadcast_object,
    current_context,
    dist_rank_world,
    gather_objects,
    init_distributed,
    rank0_run_lock,
)
from astrolabe.artifacts.engine import merge_results, merge_values
from astrolabe.artifacts.stage import StageInfo, StageResult

# ----------------------------------------------------------------------------------- DistContext


def test_dist_context_from_env():
    assert DistContext.from_env({}) == DistContext(0, 1, 0)
    ctx = DistContext.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (3, 4, 1)
    assert ctx.is_distributed and not ctx.is_main
    assert DistContext.from_env({"WORLD_SIZE": "1"}).is_main
    with pytest.raises(DistributedSetupError, match=r"RANK='x' is not an integer.*torchrun"):
        DistContext.from_env({"RANK": "x", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedSetupError, match=r"RANK must be in \[0, WORLD_SIZE=2\)"):
        DistContext.from_env({"RANK": "2", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedSetupError, match="WORLD_SIZE must be >= 1"):
        DistContext.from_env({"WORLD_SIZE": "0"})


def test_dist_rank_world_reads_env_and_rollout_uses_it(monkeypatch):
    import stages.rollout

    assert stages.rollout.dist_rank_world is dist_rank_world
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "3")
    assert dist_rank_world() == (1, 3)


def test_init_distributed_needs_master_addr_and_port():
    env = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    with pytest.raises(DistributedSetupError, match=r"MASTER_ADDR and MASTER_PORT are not set: launch with torchrun"):
        init_distributed("cpu", env)
    with pytest.raises(DistributedSetupError, match=r"WORLD_SIZE=2 but MASTER_PORT is not set"):
        init_distributed("cpu", {**env, "MASTER_ADDR": "127.0.0.1"})
    assert not torch.distributed.is_initialized()
    assert init_distributed("cpu", {}) == DistContext()  # single process: no process group
    assert not torch.distributed.is_initialized()


def test_single_process_collectives_are_no_ops(monkeypatch):
    barrier()
    assert broadcast_object({"a": 1}) == {"a": 1}
    assert gather_objects("x") == ["x"]
    assert current_context() == DistContext()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedSetupError, match="process group is not initialised"):
        current_context()
    assert backend_for("cuda:1") == "nccl" and backend_for("cpu") == "gloo"


# ----------------------------------------------------------------------------------- merging


def _rollout_like(rank: int, groups: dict) -> StageResult:
    """The shape of what stages/rollout.py returns for one rank."""
    return StageResult(
        counts={"prompts": len(groups), "candidates": 4 * len(groups), "shards": 1, "num_blocks_per_video": 5},
        seeds={"run_seed": 0, "rank": rank, "world_size": 2, "prompt_indices": [7, 3, 9], "groups": groups},
        timings={"total": 2.0 + rank, "build": 0.5 - 0.25 * rank, "peak_rss_mib": 100.0 * (rank + 1)},
        metrics={"rollout/candidates": 4.0 * len(groups), "rollout/window_blocks": 1.0},
        extra={"rank": rank, "world_size": 2, "shard_prefix": "rollout", "policy": "base"},
    )


def test_merge_results_of_two_rollout_ranks():
    g0 = {"it0-p0": {"prompt_index": 7, "prefix_seed": 11}, "it0-p1": {"prompt_index": 3, "prefix_seed": 12}}
    g1 = {"it0-p2": {"prompt_index": 9, "prefix_seed": 13}}
    m = merge_results([_rollout_like(0, g0), _rollout_like(1, g1)], invariant_counts=("num_blocks_per_video",),
                      summed_metrics=("rollout/candidates",))
    assert m.counts == {"prompts": 3, "candidates": 12, "shards": 2, "num_blocks_per_video": 5}
    assert m.metrics == {"rollout/candidates": 12.0, "rollout/window_blocks": 1.0}  # summed / equal on every rank
    assert m.timings == {"total": 3.0, "build": 0.5, "peak_rss_mib": 200.0}
    assert m.seeds == {"run_seed": 0, "rank": [0, 1], "world_size": 2, "prompt_indices": [7, 3, 9],
                       "groups": {**g0, **g1}}
    assert list(m.seeds["groups"]) == ["it0-p0", "it0-p1", "it0-p2"]  # rank order = slot order
    assert m.extra == {"rank": [0, 1], "world_size": 2, "shard_prefix": "rollout", "policy": "base"}


def test_merge_results_edge_cases():
    one = _rollout_like(0, {"g": {"s": 1}})
    m = merge_results([one], invariant_counts=("num_blocks_per_video",))
    assert (m.counts, m.seeds, m.timings, m.extra) == (one.counts, one.seeds, one.timings, one.extra)
    bad = _rollout_like(1, {})
    bad.counts["num_blocks_per_video"] = 6
    with pytest.raises(ValueError, match="'num_blocks_per_video' must be equal on every rank"):
        merge_results([one, bad], invariant_counts=("num_blocks_per_video",))
    assert merge_results([one, bad], summed_metrics=("rollout/candidates",)).counts["num_blocks_per_video"] == 11
    with pytest.raises(ValueError, match="'rollout/candidates' differs between ranks"):  # not declared summed
        merge_results([one, bad])
    with pytest.raises(ValueError, match="at least one rank"):
        merge_results([])
    # a key present on one rank only; a nested leaf that differs becomes the per-rank list
    assert merge_values([{"a": {"x": 1}, "b": 2}, {"a": {"x": 3}}]) == {"a": {"x": [1, 3]}, "b": 2}


def test_stage_distribution_declarations():
    from stages import STAGES

    assert {n: m.STAGE.distribution for n, m in STAGES.items()} == {
        "filter_prompts": "main", "rollout": "sliced", "score": "sliced", "label_uncertainty": "main",
        "nft_update": "sliced", "evaluate": "sliced", "arcopo_buffer": "sliced",
    }
    with pytest.raises(ValueError, match="distribution must be one of"):
        StageInfo(name="x", code_version="1", config_subset=lambda c: {}, distribution="fanout")  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------- execute on 2 gloo ranks


def _fake_stage(name: str, distribution: str, fail_rank: int | None = None) -> SimpleNamespace:
    """A stage whose ``run`` writes ``part-rNNN.txt`` (its rank) and returns rank-dependent results."""

    def run(cfg, inputs, out_dir: Path, iteration):
        rank = dist_rank_world()[0]
        if rank == fail_rank:
            raise ValueError(f"boom on rank {rank}")
        (out_dir / rank_filename("part", rank, ".txt")).write_text(f"{rank} {os.getpid()}")
        return StageResult(counts={"items": rank + 1, "per_video": 7}, seeds={"groups": {f"g{rank}": rank}, "seed": 3},
                           timings={"work": 0.5 + rank}, extra={"rank": rank})

    info = StageInfo(name=name, code_version="t", config_subset=lambda c: {}, per_iteration=True,
                     distribution=distribution, rank_invariant_counts=("per_video",))  # type: ignore[arg-type]
    return SimpleNamespace(STAGE=info, run=run)


def _manifest_json(m) -> dict:
    return {"key": m.key, "created": m.created, "counts": m.counts, "seeds": m.seeds, "world_size": m.world_size,
            "timings": m.timings, "extra": m.extra, "files": sorted(m.files)}


def _worker(rank: int, port: int, root: str, locked_run: str) -> None:
    """One of two gloo ranks: runs the scenarios in order, records each outcome; the last one fails for real."""
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import astrolabe  # noqa: F401
    from astrolabe.artifacts.engine import StageRankError, execute

    torch.set_num_threads(1)
    init_distributed("cpu")
    run_path, out = Path(root) / "run", {}

    def attempt(label, fn):
        try:
            out[label] = {"ok": fn()}
        except Exception as e:
            out[label] = {"error": type(e).__name__, "message": str(e)}

    attempt("sliced", lambda: _manifest_json(execute(_fake_stage("sliced", "sliced"), None, run_path, {}, 0)))
    attempt("cached", lambda: _manifest_json(execute(_fake_stage("sliced", "sliced", fail_rank=1), None, run_path,
                                                     {}, 0)))
    attempt("main", lambda: _manifest_json(execute(_fake_stage("main", "main"), None, run_path, {}, 0)))
    attempt("main_fails", lambda: _manifest_json(execute(_fake_stage("mainfail", "main", fail_rank=0), None,
                                                         run_path, {}, 0)))

    def locked():
        with rank0_run_lock(Path(locked_run)):
            return "entered"

    attempt("locked", locked)
    Path(root, f"result-r{rank}.json").write_text(json.dumps(out))
    try:
        execute(_fake_stage("slicedfail", "sliced", fail_rank=1), None, run_path, {}, 0)
    except StageRankError as e:
        Path(root, f"fail-r{rank}.txt").write_text(str(e))
        traceback.print_exc()
        raise SystemExit(1) from None
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run :func:`_worker` on 2 spawned gloo processes while this process holds the lock of ``locked``."""
    root = tmp_path_factory.mktemp("ranks")
    locked = root / "locked"
    with RunLock(locked):
        port = free_port()
        exitcodes = run_ranks(_worker, lambda r: (r, port, str(root), str(locked)), timeout=120)
    results = {r: json.loads((root / f"result-r{r}.json").read_text()) for r in range(2)}
    return SimpleNamespace(root=root, run=root / "run", results=results, exitcodes=exitcodes)


def _published(run: Path, stage: str) -> list[Path]:
    sroot = stage_root(run, stage, 0)
    return sorted(p for p in sroot.iterdir() if (p / MANIFEST_NAME).is_file()) if sroot.is_dir() else []


def _leftovers(run: Path, stage: str) -> list[str]:
    sroot = stage_root(run, stage, 0)
    return sorted(p.name for p in sroot.iterdir() if p.name.startswith(".")) if sroot.is_dir() else []


def test_sliced_stage_publishes_every_rank_into_one_directory(two_ranks):
    r0, r1 = (two_ranks.results[r]["sliced"]["ok"] for r in range(2))
    assert r0 == r1, "every rank returns the one published manifest"
    [out] = _published(two_ranks.run, "sliced")
    assert out.name == r0["key"] and _leftovers(two_ranks.run, "sliced") == []
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "part-r000.txt", "part-r001.txt"]
    pids = {int((out / f"part-r00{r}.txt").read_text().split()[1]) for r in range(2)}
    assert len(pids) == 2 and os.getpid() not in pids  # written by the two rank processes
    assert r0["files"] == ["part-r000.txt", "part-r001.txt"]
    assert r0["counts"] == {"items": 3, "per_video": 7} and r0["world_size"] == 2
    assert r0["seeds"] == {"groups": {"g0": 0, "g1": 1}, "seed": 3} and r0["extra"] == {"rank": [0, 1]}
    assert r0["timings"]["work"] == 1.5 and r0["timings"]["total"] > 0


def test_cached_stage_is_not_rerun_on_any_rank(two_ranks):
    # the second call's run would fail on rank 1: it is cached, so no rank runs it
    for r in range(2):
        assert two_ranks.results[r]["cached"]["ok"] == two_ranks.results[r]["sliced"]["ok"]


def test_main_stage_runs_on_rank0_only(two_ranks):
    r0, r1 = (two_ranks.results[r]["main"]["ok"] for r in range(2))
    assert r0 == r1 and r0["files"] == ["part-r000.txt"] and r0["world_size"] == 1
    assert r0["counts"] == {"items": 1, "per_video": 7} and r0["extra"] == {"rank": 0}


def test_failure_on_one_rank_raises_on_every_rank_and_publishes_nothing(two_ranks):
    for r in range(2):
        res = two_ranks.results[r]["main_fails"]
        assert res["error"] == "StageRankError"
        assert "mainfail (iteration 0) failed on rank 0 of 2" in res["message"] and "boom on rank 0" in res["message"]
    assert _published(two_ranks.run, "mainfail") == [] and _leftovers(two_ranks.run, "mainfail") == []
    # the last scenario is not caught: both processes exit non-zero, both name rank 1
    assert two_ranks.exitcodes == [1, 1]
    for r in range(2):
        msg = (two_ranks.root / f"fail-r{r}.txt").read_text()
        assert "slicedfail (iteration 0) failed on rank 1 of 2" in msg and "ValueError: boom on rank 1" in msg
    assert _published(two_ranks.run, "slicedfail") == [] and _leftovers(two_ranks.run, "slicedfail") == []


def test_run_lock_held_elsewhere_stops_every_rank(two_ranks):
    for r in range(2):
        res = two_ranks.results[r]["locked"]
        assert res["error"] == "RunLockedError" and f"locked by pid {os.getpid()}" in res["message"]


# ----------------------------------------------------------------------------------- torchrun end to end


def test_torchrun_two_ranks_matches_the_single_process_run(ref, base, tmp_path):
    name = "torchrun2"
    sets = [*ph.SMALL_OVERRIDES, "pipeline.iterations=1", f"pipeline.runs_root={base / 'runs'}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "flows.cli", "train", str(ph.TINY), "--engine", "local", "-v", "--run-name", name,
           *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(cmd, cwd=ph.REPO, env=ph.cli_env(base), capture_output=True, text=True, timeout=300)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    run = base / "runs" / name

    # one rollout directory, shards of both ranks, same key as the single-process run
    out = ph.node_dir(run, "rollout", 0)
    assert out.name == ph.node_dir(ref, "rollout", 0).name
    shards = sorted(p.name for p in out.glob("*.tar"))
    assert any("-r000-" in s for s in shards) and any("-r001-" in s for s in shards)
    assert ph.temporary_dirs(run) == []
    mine, theirs = ph.rollout_records(run, 0), ph.rollout_records(ref, 0)
    assert [r["__key__"] for r in mine] == [r["__key__"] for r in theirs] and len(mine) == 8
    for a, b in zip(mine, theirs):
        assert (a["latents"] == b["latents"]).all() and (a["prefix"] == b["prefix"]).all()

    # score and evaluate sliced: one merged table, equal to the single-process one, no rank parts left
    from astrolabe.data.arrays import read_columns

    for stage, table, its in (("score", "rewards.zarr", [0]), ("evaluate", "eval_rewards.zarr", [0, 1])):
        for it in its:
            mine_dir, ref_dir = ph.node_dir(run, stage, it), ph.node_dir(ref, stage, it)
            assert mine_dir.name == ref_dir.name
            assert json.loads((mine_dir / MANIFEST_NAME).read_text())["world_size"] == 2
            assert not list(mine_dir.glob("*-r0*.zarr"))
            (k1, c1, _), (k2, c2, _) = read_columns(mine_dir / table), read_columns(ref_dir / table)
            assert k1 == k2 and c1.keys() == c2.keys()
            worst = max(float(np.nanmax(np.abs(c1[c] - c2[c]))) if np.isfinite(c1[c]).any() else 0.0 for c in c1)
            print(f"torchrun 2 ranks vs 1 process: {stage} it{it} max abs diff {worst:.3g}")
            assert worst <= 1e-5 and all((np.isnan(c1[c]) == np.isnan(c2[c])).all() for c in c1)
    m_eval, r_eval = (json.loads((ph.node_dir(x, "evaluate", 1) / MANIFEST_NAME).read_text()) for x in (run, ref))
    assert m_eval["counts"] == r_eval["counts"]
    assert m_eval["metrics"].keys() == r_eval["metrics"].keys()
    assert all(abs(m_eval["metrics"][k] - r_eval["metrics"][k]) <= 1e-5 for k in r_eval["metrics"] if k.startswith("eval/"))

    # both ranks trained their share of every step (sample-weighted all-reduce): the same LoRA
    nft = json.loads((ph.node_dir(run, "nft_update", 0) / MANIFEST_NAME).read_text())
    assert nft["world_size"] == 2 and len(nft["extra"]["samples_per_rank"]) == 2
    ph.assert_same_checkpoint(ph.node_dir(run, "nft_update", 0), ph.node_dir(ref, "nft_update", 0), atol=1e-6)

    # bookkeeping by rank 0 only: one MLflow run, one summary, one final table
    from astrolabe.tracking import compare_runs

    rows = compare_runs([name], ph.mlflow_uri(base))
    assert len(rows) == 1 and rows[0]["status"] == "FINISHED"
    summary = json.loads((run / "run-summary.json").read_text())
    assert summary["computed_nodes"] == 7 and summary["cached_nodes"] == 0
    assert log.count(f"run {run}:") == 1
    assert "[rank 1] stages.rollout" in log and "[rank 0] stages.rollout" in log
    assert "[rank 1] astrolabe.tracking" not in log


def test_cli_refuses_prefect_and_a_missing_rendezvous_under_world_size_2(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from flows.cli import app

    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "COLUMNS": "300"}
    args = ["train", str(ph.TINY), "--set", f"pipeline.runs_root={tmp_path}"]
    res = CliRunner().invoke(app, [*args, "--engine", "prefect"], env=env)
    assert res.exit_code == 2 and "--engine prefect cannot run under torchrun" in res.output
    res = CliRunner().invoke(app, [*args, "--engine", "local"], env=env)
    assert res.exit_code == 1 and "MASTER_ADDR and MASTER_PORT are not set" in res.output
    assert not (tmp_path / "tiny").exists() and not torch.distributed.is_initialized()
