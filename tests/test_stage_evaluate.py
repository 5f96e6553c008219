"""evaluate stage on the tiny model: videos, scores, metrics, determinism, checkpoint policy, grid."""

from __future__ import annotations

import json
import logging
import shutil
import types
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from astrolabe.artifacts.engine import execute
from astrolabe.artifacts.stage import StageInfo, StageResult
from astrolabe.artifacts.stagedir import stage_root
from astrolabe.build import build_generation_stack
from astrolabe.config import config_from_dict
from astrolabe.data.arrays import read_columns
from astrolabe.data.grid import SEPARATOR_VALUE, GridLayout, background, compose_frame, header_height
from astrolabe.data.video import decode_mp4
from astrolabe.rewards import build_rewards, score_all
from astrolabe.sampling.generation import generate_video
from stages import evaluate

HELDOUT = ["a red fox runs in snow", "a boat on a calm lake"]
SEEDS = (1000, 1001)
KEYS = ["p000-s1000", "p000-s1001", "p001-s1000", "p001-s1001"]
EVAL_REWARDS = [{"name": "motion", "weight": 2.0}, {"name": "smoothness", "weight": 0.5},
                {"name": "sharpness", "weight": 0.0}]
FRAMES = 9  # 3 latent frames -> 1 + 4 * 2 pixel frames


def _cfg():
    return config_from_dict({
        "rollout": {"num_latent_frames": 3},
        "eval_rewards": {"rewards": EVAL_REWARDS, "batch_size": 3},
        "pipeline": {"eval_seeds": list(SEEDS)},
    })


def _stage(name: str, write, per_iteration: bool = False) -> types.SimpleNamespace:
    info = StageInfo(name=name, code_version="test", config_subset=lambda c: {}, per_iteration=per_iteration)
    return types.SimpleNamespace(STAGE=info, run=lambda cfg, inputs, out, it: (write(out), StageResult())[1])


def _publish(run: Path, name: str, write, iteration: int | None = None) -> Path:
    mod = _stage(name, write, per_iteration=iteration is not None)
    m = execute(mod, _cfg(), run, {}, iteration)
    return stage_root(run, name, iteration) / m.key


def _write_heldout(out: Path) -> None:
    (out / "train.txt").write_text("a train prompt only\n", encoding="utf-8")
    (out / "heldout.txt").write_text("\n".join(HELDOUT) + "\n\n", encoding="utf-8")


def _write_checkpoint(out: Path) -> None:
    """A fake nft_update output: ``state/lora/`` holds a non-identity PEFT adapter of the tiny DiT."""
    from astrolabe.build import build_dit
    from astrolabe.models.registry import get_base_model
    from astrolabe.rl.lora import LoRAConfig, adapter_parameters, apply_lora, save_adapter

    g = torch.Generator().manual_seed(0)
    peft = apply_lora(build_dit(_cfg().model, get_base_model("tiny")), LoRAConfig(rank=4, alpha=4.0), generator=g)
    with torch.no_grad():
        for key, p in adapter_parameters(peft, "default").items():
            if key.endswith("lora_B.weight"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    save_adapter(peft, evaluate.checkpoint_state_dir(out) / "lora")


def _out(run: Path, iteration: int, key: str) -> Path:
    return stage_root(run, "evaluate", iteration) / key


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cfg = _cfg()
    a = tmp_path_factory.mktemp("runA")
    prompts = _publish(a, "filter_prompts", _write_heldout)
    m0 = execute(evaluate, cfg, a, {"prompts": prompts}, iteration=0)
    ckpt = _publish(a, "nft_update", _write_checkpoint, iteration=0)
    m1 = execute(evaluate, cfg, a, {"prompts": prompts, "checkpoint": ckpt, "baseline": _out(a, 0, m0.key)},
                 iteration=1)
    return types.SimpleNamespace(cfg=cfg, run=a, prompts=prompts, m0=m0, m1=m1, ckpt=ckpt,
                                 d0=_out(a, 0, m0.key), d1=_out(a, 1, m1.key))


def _reference_metrics(cols: dict[str, np.ndarray]) -> dict:
    """Independent recomputation of metrics.json from the stored columns."""
    ref: dict = {"n": len(cols["motion"])}
    combined = np.zeros(ref["n"])
    for reward in EVAL_REWARDS:
        x = cols[reward["name"]].astype(np.float64)
        ref[f"reward/{reward['name']}/mean"] = float(np.nanmean(x))
        ref[f"reward/{reward['name']}/std"] = float(np.nanstd(x))
        ref[f"reward/{reward['name']}/nan"] = int(np.isnan(x).sum())
        if reward["weight"]:
            combined += reward["weight"] * x
    ref["combined/mean"] = sum(s["weight"] * ref[f"reward/{s['name']}/mean"] for s in EVAL_REWARDS)
    ref["combined/std"] = float(np.std(combined))
    return ref


def _eval_metrics(m) -> dict[str, float]:
    return {k: v for k, v in m.metrics.items() if k.startswith("eval/")}


def test_scores_and_metrics(runs):
    d, m = runs.d0, runs.m0
    keys, cols, attrs = read_columns(d / evaluate.REWARDS_FILE)
    assert keys == KEYS
    assert {c for c in cols if "." not in c} == {"motion", "smoothness", "sharpness"}
    assert set(attrs["rewards"]) == {"motion", "smoothness", "sharpness"}
    assert m.counts["prompts"] == 2 and m.counts["videos"] == 4 and m.counts["nan_scores"] == 0
    assert sorted(p.name for p in (d / "videos").iterdir()) == [f"{k}.mp4" for k in KEYS]
    # independent: decode the mp4s and score them in one call with freshly built rewards
    videos = np.stack([decode_mp4(d / "videos" / f"{k}.mp4") for k in KEYS])  # (4, F, H, W, 3)
    assert videos.shape == (4, FRAMES, 64, 64, 3)
    ref = score_all(build_rewards(runs.cfg.eval_rewards.rewards), videos, [HELDOUT[0]] * 2 + [HELDOUT[1]] * 2, 4)
    for name in ("motion", "smoothness", "sharpness"):
        np.testing.assert_allclose(cols[name], ref[name].scores, rtol=1e-6)
    metrics = json.loads((d / evaluate.METRICS_FILE).read_text())
    # the manifest's typed metrics: metrics.json under eval/, without the count n and the null means
    assert _eval_metrics(m) == {f"eval/{k}": float(v) for k, v in metrics.items() if k != "n" and v is not None}
    assert {"time/evaluate", "memory/evaluate_peak_rss_mib"} <= set(m.metrics)  # added by the engine
    assert m.reports == {name: "eval/iter-0000" for name in ("grid.mp4", "grid.png", evaluate.METRICS_FILE)}
    expected = _reference_metrics(cols)
    assert set(metrics) == set(expected)
    for k, v in expected.items():
        assert metrics[k] == pytest.approx(v, rel=1e-9, abs=1e-12), k
    assert metrics["combined/std"] > 0  # different prompts / seeds give different videos


def test_video_equals_direct_generation(runs, tmp_path):
    stack, _ = build_generation_stack(runs.cfg)
    path = generate_video(stack, HELDOUT[1], 1001, 3, tmp_path / "x.mp4", crf=runs.cfg.rollout.video_crf).path
    np.testing.assert_array_equal(decode_mp4(path), decode_mp4(runs.d0 / "videos" / "p001-s1001.mp4"))


def test_deterministic_and_cached(runs, tmp_path, monkeypatch):
    b = tmp_path / "runB"
    prompts_b = _publish(b, "filter_prompts", _write_heldout)
    mb = execute(evaluate, runs.cfg, b, {"prompts": prompts_b}, iteration=0)
    assert mb.key == runs.m0.key
    assert _eval_metrics(mb) == _eval_metrics(runs.m0)
    _, cols_a, _ = read_columns(runs.d0 / evaluate.REWARDS_FILE)
    _, cols_b, _ = read_columns(_out(b, 0, mb.key) / evaluate.REWARDS_FILE)
    for c in cols_a:
        np.testing.assert_array_equal(cols_a[c], cols_b[c])
    for k in KEYS:
        assert mb.files[f"videos/{k}.mp4"].sha256 == runs.m0.files[f"videos/{k}.mp4"].sha256

    monkeypatch.setattr(evaluate, "run", lambda *a, **k: pytest.fail("a cached evaluate must not run again"))
    again = execute(evaluate, runs.cfg, runs.run, {"prompts": runs.prompts}, iteration=0)
    assert again.created == runs.m0.created


def _cell(grid: np.ndarray, layout: GridLayout, r: int, c: int) -> np.ndarray:
    y0, x0 = layout.origin(r, c)
    return grid[y0 : y0 + layout.height, x0 : x0 + layout.width]


def _png(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def test_grid_without_baseline(runs):
    png = _png(runs.d0 / evaluate.GRID_PNG)
    layout = GridLayout(4, 1, 64, 64, header=header_height(64))
    assert png.shape == (*layout.shape, 3) == (header_height(64) + 2 + 4 * 64 + 3 * 2, 64, 3)
    assert (runs.m0.counts["grid_rows"], runs.m0.counts["grid_cols"]) == (4, 1)
    for r, k in enumerate(KEYS):
        np.testing.assert_array_equal(_cell(png, layout, r, 0), decode_mp4(runs.d0 / "videos" / f"{k}.mp4")[FRAMES // 2])


def test_checkpoint_policy_and_grid_with_baseline(runs):
    assert runs.m1.key != runs.m0.key and runs.m1.extra["policy"] == str(runs.ckpt / "state")
    for k in KEYS:
        base = decode_mp4(runs.d0 / "videos" / f"{k}.mp4").astype(int)
        trained = decode_mp4(runs.d1 / "videos" / f"{k}.mp4").astype(int)
        assert np.abs(base - trained).mean() > 1.0, k  # the adapter changed the policy
    layout = GridLayout(4, 2, 64, 64, header=header_height(64))
    png = _png(runs.d1 / evaluate.GRID_PNG)
    assert png.shape == (*layout.shape, 3)
    for r, k in enumerate(KEYS):
        for c, d in enumerate((runs.d0, runs.d1)):
            np.testing.assert_array_equal(_cell(png, layout, r, c), decode_mp4(d / "videos" / f"{k}.mp4")[FRAMES // 2])
    assert (png[layout.top :, 64:66] == SEPARATOR_VALUE).all()  # vertical separator between the columns
    assert png[: layout.header].max() > 0  # column labels drawn
    grid_video = decode_mp4(runs.d1 / evaluate.GRID_MP4)
    assert grid_video.shape == (FRAMES, *layout.shape, 3)


def test_missing_baseline_video_is_black(runs, tmp_path, caplog):
    baseline = tmp_path / "baseline"
    (baseline / "videos").mkdir(parents=True)
    shutil.copy(runs.d0 / "videos" / "p000-s1000.mp4", baseline / "videos")
    paths = [runs.d1 / "videos" / f"{k}.mp4" for k in KEYS[:2]]
    out = tmp_path / "out"
    out.mkdir()
    with caplog.at_level(logging.WARNING, logger="stages.evaluate"):
        size = evaluate.write_comparison_grid(out, paths, baseline, iteration=1, fps=16)
    assert size == {"grid_rows": 2, "grid_cols": 2}
    assert any("p000-s1001.mp4 is missing" in r.message for r in caplog.records)
    png = _png(out / evaluate.GRID_PNG)
    layout = GridLayout(2, 2, 64, 64, header=header_height(64))
    np.testing.assert_array_equal(_cell(png, layout, 0, 0), decode_mp4(baseline / "videos" / "p000-s1000.mp4")[4])
    assert _cell(png, layout, 1, 0).max() == 0
    np.testing.assert_array_equal(_cell(png, layout, 1, 1), decode_mp4(paths[1])[4])


def test_missing_or_empty_heldout(tmp_path):
    cfg = _cfg()
    with pytest.raises(FileNotFoundError, match="heldout_fraction > 0 or data.eval_prompts"):
        evaluate.run(cfg, {"prompts": tmp_path}, tmp_path / "o1", 0)
    (tmp_path / "heldout.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="heldout_fraction > 0 or data.eval_prompts"):
        evaluate.run(cfg, {"prompts": tmp_path}, tmp_path / "o2", 0)
    (tmp_path / "heldout.txt").write_text("a prompt\n")
    with pytest.raises(FileNotFoundError, match="nft_update output directory"):
        evaluate.run(cfg, {"prompts": tmp_path, "checkpoint": tmp_path / "nope"}, tmp_path / "o3", 0)


def test_summarize_nan_aware(caplog):
    nan = float("nan")
    cols = {"a": np.array([1.0, nan, 3.0], np.float32), "b": np.array([nan, nan, nan], np.float32)}
    with caplog.at_level(logging.WARNING, logger="stages.evaluate"):
        m = evaluate.summarize(cols, {"a": 2.0, "b": 0.0})
    assert any("'b' is NaN on all 3" in r.message for r in caplog.records)
    # a: mean 2, population std 1; combined = 2a (b has weight 0): [2, nan, 6] -> std 2
    assert m == {"reward/a/mean": 2.0, "reward/a/std": 1.0, "reward/a/nan": 1, "reward/b/mean": None,
                 "reward/b/std": None, "reward/b/nan": 3, "combined/mean": 4.0, "combined/std": 2.0, "n": 3}
    m2 = evaluate.summarize(cols, {"a": 2.0, "b": 1.0})
    assert m2["combined/mean"] is None and m2["combined/std"] is None
    json.dumps(m2, allow_nan=False)  # JSON-safe


def test_grid_layout_and_frame_hold():
    layout = GridLayout(2, 3, 4, 6, header=0, sep=1)
    assert layout.shape == (2 * 4 + 1, 3 * 6 + 2) and layout.origin(1, 2) == (5, 14)
    base = background(layout)
    assert (base[4] == SEPARATOR_VALUE).all() and (base[:, 6] == SEPARATOR_VALUE).all() and base[0, 0].max() == 0
    short = np.full((2, 4, 6, 3), 7, np.uint8)
    short[1] = 9
    long = np.arange(5, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 6, 3), np.uint8)
    frame = compose_frame(layout, base, [[short, None, long], [None, long, None]], t=3)
    assert (_cell(frame, layout, 0, 0) == 9).all()  # short video holds its last frame
    assert (_cell(frame, layout, 0, 2) == 3).all() and (_cell(frame, layout, 1, 1) == 3).all()
    assert _cell(frame, layout, 0, 1).max() == 0  # missing cell stays black


def test_eval_rewards_default_to_rewards():
    cfg = config_from_dict({})
    assert evaluate.eval_rewards_config(cfg) is cfg.rewards
    assert evaluate.eval_plan(2, (5, 6)) == [(0, 5), (0, 6), (1, 5), (1, 6)]
    with pytest.raises(ValueError, match="eval_seeds"):
        evaluate.eval_plan(2, ())



# ----------------------------------------------------------------------------------- 2 gloo ranks


def _rank_worker(rank: int, port: int, run: str, inputs: dict, result: str) -> None:
    import os

    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    from astrolabe.distributed import init_distributed

    torch.set_num_threads(1)
    init_distributed("cpu")
    try:
        m = execute(evaluate, _cfg(), Path(run), inputs, iteration=1)
        Path(result, f"r{rank}.json").write_text(json.dumps({"key": m.key, "world_size": m.world_size,
                                                              "counts": m.counts, "metrics": m.metrics,
                                                              "reports": m.reports, "seeds": m.seeds}))
    finally:
        torch.distributed.destroy_process_group()


def test_two_ranks_equal_one_process(runs, tmp_path):
    """Each rank generates and scores 2 of the 4 videos; rank 0 merges: same table, metrics, grid as one process."""
    from spawn_helpers import free_port, run_ranks

    port = free_port()
    inputs = {"prompts": runs.prompts, "checkpoint": runs.ckpt, "baseline": runs.d0}
    codes = run_ranks(_rank_worker, lambda r: (r, port, str(tmp_path / "run"), inputs, str(tmp_path)), timeout=240)
    assert codes == [0, 0]
    m0, m1 = (json.loads((tmp_path / f"r{r}.json").read_text()) for r in range(2))
    assert m0 == m1 and m0["key"] == runs.m1.key and m0["world_size"] == 2
    d = _out(tmp_path / "run", 1, m0["key"])
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in runs.d1.iterdir())  # no rank parts left
    (k2, c2, a2), (k1, c1, a1) = read_columns(d / evaluate.REWARDS_FILE), read_columns(runs.d1 / evaluate.REWARDS_FILE)
    assert k2 == k1 == KEYS and c2.keys() == c1.keys() and a2 == a1
    worst = max(float(np.abs(c2[c] - c1[c]).max()) for c in c1)
    print(f"evaluate 2 ranks vs 1 process: max abs diff {worst:.3g}")
    assert worst <= 1e-5
    assert json.loads((d / evaluate.METRICS_FILE).read_text()) == pytest.approx(
        json.loads((runs.d1 / evaluate.METRICS_FILE).read_text()), rel=1e-6)
    assert m0["counts"] == runs.m1.counts and m0["reports"] == runs.m1.reports and m0["seeds"] == runs.m1.seeds
    assert _eval_metrics(types.SimpleNamespace(metrics=m0["metrics"])) == pytest.approx(_eval_metrics(runs.m1), rel=1e-6)
    assert np.array_equal(cv2.imread(str(d / "grid.png")), cv2.imread(str(runs.d1 / "grid.png")))
