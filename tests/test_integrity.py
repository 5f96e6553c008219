"""Integrity and clear faults: damaged / deleted outputs are seen by ``status`` and ``verify`` and repaired by
``train``; disk full, read-only and permission errors are one line and leave nothing partial; the CLI
prints messages verbatim (no rich markup eaten), reads stores without creating them, fits 80 columns.

Pipeline tests work on copies of the small reference run (tests/pipeline_helpers.py), local engine.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

import pipeline_helpers as ph
from pipeline_helpers import base, ref  # noqa: F401  (shared fixtures)
from astrolabe.artifacts import atomic
from astrolabe.artifacts.manifest import verify
from astrolabe.artifacts.plan import NodeStatus, build_plan, plan_status
from astrolabe.artifacts.stagedir import DAMAGED_LABEL, stage_root
from astrolabe.sampling.scenes import ScenePromptError, parse_scene_prompt
from flows import cli, cli_bench, cli_common, cli_services, cli_summary, cli_world
from flows.cli_summary import eval_cell
from flows.run import CURVES_FILE, LATEST_DIR, eval_deltas, eval_margins, load_run_config, resolve_checkpoint, train_run
from flows.views import status_lines
from stages import STAGES


@pytest.fixture
def invoke(monkeypatch):
    """Run the CLI in-process with an 80-column console (what a person's terminal shows)."""
    wide = Console(stderr=True, width=80, color_system=None)
    for module in (cli, cli_common, cli_services, cli_summary, cli_world, cli_bench):  # every command module's console
        monkeypatch.setattr(module, "console", wide)
    monkeypatch.setitem(cli.OPTIONS, "debug", False)

    def run(*args: str):
        return CliRunner().invoke(cli.app, [str(a) for a in args], env={"COLUMNS": "80"})

    return run


def statuses(run):
    return {s.node.label: s for s in plan_status(load_run_config(run), run, STAGES)}


def grid_rows(output: str) -> dict[str, list[str]]:
    """``{iteration label: cells}`` of the status grid."""
    return {m[1]: line.split()[1:] for line in output.splitlines() if (m := re.match(r"^\s*(\d+(?:-\d+)?)\s", line))}


def lines_of(output: str) -> list[str]:
    return [ln for ln in output.splitlines() if ln.strip()]


# ----------------------------------------------------------------------------------- damage and repair


def test_same_size_corruption_and_deleted_file_are_detected_and_repaired(ref, base, invoke):
    run = ph.copy_run(ref, "damaged")
    (shard,) = ph.node_dir(run, "rollout", 0).glob("*.tar")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    score_dir = ph.node_dir(run, "score", 1)
    deleted = next(p for p in score_dir.rglob("*") if p.is_file() and p.name != "manifest.json")
    deleted.unlink()
    before = ph.created(run)

    st = statuses(run)
    assert st["rollout[0]"].status == "damaged" and "checksum changed" in st["rollout[0]"].problems[0]
    assert st["score[1]"].status == "damaged" and "missing" in st["score[1]"].problems[0]
    assert st["score[0]"].status == "done", "consumers keep their keys: they stay valid if the repair is identical"

    res = invoke("status", run)
    assert res.exit_code == 0, res.output
    rows = grid_rows(res.output)
    assert rows["0"] == ["damaged", "done", "done", "done", "done"], res.output
    assert rows["1"] == ["done", "damaged", "done", "done", "done"], res.output
    res = invoke("verify", run)
    assert res.exit_code == 1
    out = " ".join(res.output.split())
    assert "rollout[0]: damaged" in out and "score[1]: damaged" in out and "astrolabe train" in out, out

    with pytest.raises(Exception, match="refuses damaged inputs"):  # a stage never reads a damaged input
        from astrolabe.artifacts.engine import execute

        execute(STAGES["score"], load_run_config(run), run, {"rollout": ph.node_dir(run, "rollout", 0)}, 0, force=True)

    summary = train_run(load_run_config(run))
    assert summary.computed_nodes == 2, "only the two damaged stages are recomputed (their outputs are identical)"
    assert set(summary.stage_seconds) == {"rollout", "score"}
    after = ph.created(run)
    assert {k for k in before if after[k] != before[k]} == {k for k in before if k[:2] in {("rollout", 0), ("score", 1)}}
    assert all(s.status == "done" for s in statuses(run).values())
    assert invoke("verify", run).exit_code == 0
    aside = [p.name for p in stage_root(run, "rollout", 0).iterdir() if f".{DAMAGED_LABEL}-" in p.name]
    assert len(aside) == 1, "the damaged output is kept aside for inspection"
    assert shard.read_bytes() == (ph.node_dir(ref, "rollout", 0) / shard.name).read_bytes()


def test_repair_with_different_output_makes_consumers_stale(tmp_path):
    from astrolabe.artifacts.manifest import FileEntry, Manifest
    from astrolabe.artifacts.stagedir import repaired_instance

    old = Manifest(stage="score", key="k", files={"a": FileEntry(size=1, sha256="x")}, instance="")
    assert repaired_instance(old, {"a": FileEntry(size=1, sha256="x")}) == ""
    assert repaired_instance(old, {"a": FileEntry(size=1, sha256="y")}) not in ("", None)
    forced = old.model_copy(update={"instance": "abc"})
    assert repaired_instance(forced, {"a": FileEntry(size=1, sha256="x")}) == "abc"


# ----------------------------------------------------------------------------------- storage faults


def test_disk_full_inside_nft_update_is_one_line_and_leaves_nothing(ref, base, invoke, monkeypatch):
    import astrolabe.rl.state as state

    run = ph.copy_run(ref, "fullupd")
    before = ph.created(run)

    def full(obj, f, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(state.torch, "save", full)
    res = invoke("stage", "nft_update", "--run", run, "--iteration", "1", "--force")
    assert res.exit_code == 1, res.output
    text = " ".join(res.output.split())
    assert "Traceback" not in res.output and "nft_update (iteration 1)" in text, res.output
    assert "no space left on device" in text and "free disk space" in text
    assert str(stage_root(run, "nft_update", 1)) in "".join(res.output.split())  # the console may wrap a long path
    assert ph.temporary_dirs(run) == [], "the temporary directory was removed"
    assert ph.created(run) == before
    verify(ph.node_dir(run, "nft_update", 1))


@pytest.mark.parametrize("code, words", [(errno.EROFS, "read-only file system"), (errno.EACCES, "permission denied")])
def test_read_only_or_forbidden_run_dir_is_one_line(ref, base, invoke, monkeypatch, code, words):
    """Simulated (tests run as root, where chmod does not stop writes): the stage's directory cannot be made."""
    run = ph.copy_run(ref, f"ro{code}")

    def refuse(path):
        raise OSError(code, os.strerror(code), str(path))

    monkeypatch.setattr(atomic, "fresh_dir", refuse)
    res = invoke("stage", "score", "--run", run, "--iteration", "1", "--force")
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and words in " ".join(res.output.split()), res.output
    assert ph.temporary_dirs(run) == []


def test_atomic_writer_turns_storage_errors_into_one_line(tmp_path, monkeypatch):
    def full(path, data):
        with open(path, "wb"):
            pass
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic, "write_durable", full)
    with pytest.raises(atomic.StorageError) as info:
        atomic.write_text(tmp_path / "x.json", "{}")
    assert info.value.errno == errno.ENOSPC
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "x.json") in msg and "free disk space" in msg
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------- messages


def test_scene_syntax_error_prints_prompt_and_caret_unchanged(invoke):
    prompt = "a cat [abc] | dog [#]"
    with pytest.raises(ScenePromptError) as info:
        parse_scene_prompt(prompt)
    res = invoke("generate", "--prompt", prompt, "-o", "unused-never-created")
    assert res.exit_code == 2
    assert not Path("unused-never-created").exists()
    expected = str(info.value).splitlines()
    got = res.output.splitlines()
    assert expected[1] in got and expected[2] in got, res.output  # "  a cat [abc] | dog [#]" and its caret
    caret = got[got.index(expected[2])]
    assert caret.index("^") - 2 == info.value.pos


def test_debug_flag_shows_the_error_itself(invoke, tmp_path):
    res = invoke("status", tmp_path / "nope")
    assert res.exit_code == 2 and "Traceback" not in res.output
    res = invoke("--debug", "status", tmp_path / "nope")
    assert res.exit_code != 0 and res.exception is not None and "no run at" in str(res.exception)


def test_compare_without_a_store_creates_nothing(invoke, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    res = invoke("compare")
    assert res.exit_code == 1 and "no MLflow store" in " ".join(res.output.split()), res.output
    assert "Exit" not in res.output
    assert list(tmp_path.iterdir()) == []


def test_compare_plot_draws_the_runs_into_one_png(ref, base, invoke, tmp_path):
    out = tmp_path / "cmp.png"
    res = invoke("compare", "ref", "--metric", "eval/combined/mean", "--plot", out)
    assert res.exit_code == 0, res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----------------------------------------------------------------------------------- what a person reads


def fake_statuses(n: int) -> list[NodeStatus]:
    from astrolabe.config import load_config

    cfg = load_config(ph.TINY, [f"pipeline.iterations={n}", "pipeline.eval_every=1"])
    cycle = ["done"] * 7 + ["damaged", "stale", "missing"]
    nodes = build_plan(cfg)
    return [NodeStatus(node, "done" if i < len(nodes) // 2 else cycle[i % len(cycle)], None, None)
            for i, node in enumerate(nodes)]


@pytest.mark.parametrize("iterations", [24, 100])
def test_status_fits_80_columns(iterations):
    console = Console(width=80, record=True, color_system=None, file=open(os.devnull, "w"))
    from rich.text import Text

    for line in status_lines(fake_statuses(iterations), f"run-{iterations}: {iterations} iterations"):
        console.print(Text.assemble(*line), soft_wrap=True)
    text = console.export_text()
    assert max(len(ln) for ln in text.splitlines()) <= 80, text
    assert "damaged" in text and "iteration" in text
    rows = grid_rows(text)
    assert any("-" in k for k in rows), "identical consecutive iterations are folded into one row"
    assert len(text.splitlines()) < iterations + 10


def test_latest_links_curves_and_generate_checkpoint_from_a_run(ref):
    latest = ref / LATEST_DIR
    final = ph.node_dir(ref, "nft_update", 1) / "state"
    assert (latest / "checkpoint").resolve() == final.resolve()
    assert resolve_checkpoint(ref).resolve() == final.resolve()
    assert (latest / "eval").resolve() == ph.node_dir(ref, "evaluate", 2).resolve()
    assert (latest / "grid.png").is_file() and not os.path.isabs(os.readlink(latest / "grid.png"))
    assert (ref / CURVES_FILE).read_bytes()[:4] == b"\x89PNG"


def test_curves_are_written_after_the_first_evaluation(ref, tmp_path):
    from astrolabe.artifacts.manifest import Manifest
    from astrolabe.artifacts.plan import NodeResult, RunResults
    from astrolabe.tracking import Tracker, TrackingConfig
    from flows.run import RunLogger

    run = ph.copy_run(ref, "curves")
    (run / CURVES_FILE).unlink()
    cfg = load_run_config(run)
    logger = RunLogger(Tracker(TrackingConfig(enabled=False), run.parent), cfg, run)
    node = next(n for n in build_plan(cfg) if n.label == "evaluate[0]")
    path = ph.node_dir(run, "evaluate", 0)
    logger(NodeResult(node, Manifest.load(path), path, cached=False), RunResults())
    assert (run / CURVES_FILE).is_file(), "the plot exists after the first evaluation, before the run ends"


def test_margins_need_enough_eval_videos():
    few = {0: {"r/mean": 0.5, "r/std": 0.001, "n": 2.0}, 1: {"r/mean": 0.968, "r/std": 0.001, "n": 2.0}}
    assert eval_margins(few) == {}, "a std of 2 videos is no unit (it read +468 std)"
    assert eval_deltas(few)[1] == pytest.approx({"r": 0.468})
    assert eval_cell(0.968, None, 0.468) == "0.9680 (+0.4680)"
    many = {k: v | {"n": 8.0} for k, v in few.items()}
    assert eval_margins(many)[1] == pytest.approx({"r": 468.0})


def test_status_lists_the_arcopo_buffer_once_and_keeps_the_grid():
    from astrolabe.config import load_config

    cfg = load_config(ph.REPO / "configs" / "tiny-arcopo.yaml", ["pipeline.iterations=2"])
    assert cfg.arcopo.semi is not None
    lines = ["".join(t for t, _ in ln) for ln in status_lines([NodeStatus(n, "done", None, None)
                                                               for n in build_plan(cfg)], "run")]
    assert any(ln.startswith("arcopo_buffer") and ln.endswith("done") for ln in lines), lines
    header = next(ln for ln in lines if ln.startswith("iteration"))
    assert header.split()[1:] == ["rollout", "score", "labels", "update", "evaluate"]
