"""The paper's three claims as tiny-world configs (issue 13 point 4): tiny-hacking / tiny-guarded (reward hacking
and its guard), tiny-long (streaming on long scene-prompt videos) with its late-window metric
``world_alignment_late``, the world's scene-prompt files, and ``astrolabe report RUN --vs OTHER``.

The end-to-end smoke runs train each config for one iteration in-process on a quick world model (the recipe of
tests/test_world_model.py, a few seconds) built under a tmp root: the ``world`` base model finds its weights
through :func:`astrolabe.world.pretrain.world_model_root`, patched to that build (and ``ensure_world_model``,
which ``train`` calls first, to return it).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import astrolabe.world.pretrain as pretrain
from astrolabe.artifacts.manifest import Manifest
from astrolabe.config import RunConfig, load_config
from astrolabe.data.prompts import PromptFilterConfig, filter_prompts, read_prompt_file
from astrolabe.data.shards import read_rollout_shards
from astrolabe.report import comparison_path
from astrolabe.rewards import RewardSpec, build_rewards, score_all
from astrolabe.sampling.scenes import parse_scene_prompt
from astrolabe.world.grammar import (
    heldout_captions,
    parse_caption,
    scene_prompts,
    train_captions,
    write_scene_prompt_files,
)
from astrolabe.world.pretrain import WorldModelRecipe, build_world_model
from astrolabe.world.render import render_scene_prompt
from flows import cli

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {n: REPO / "configs" / f"{n}.yaml" for n in ("tiny-world", "tiny-hacking", "tiny-guarded", "tiny-long")}
QUICK = WorldModelRecipe(steps=2, batch_size=2, warmup_steps=1)
SMOKE = [  # one iteration at the smallest batch; every other setting is the config's own
    "pipeline.iterations=1", "pipeline.eval_every=1", "pipeline.eval_max_prompts=1", "pipeline.eval_seeds=[1000]",
    "rl.epochs=1", "rollout.prompts_per_iteration=2", "rollout.group_size=2", "rl.lora.rank=4", "rl.lora.alpha=4",
]
A = "a red circle moving left slowly on a blue background"
B = "a blue square moving up slowly on a white background"
C = "a yellow triangle moving down quickly on a purple background"


# ----------------------------------------------------------------------------------- configs


def _cfg(name: str) -> RunConfig:
    return load_config(CONFIGS[name])


def _weights(cfg: RunConfig) -> dict[str, float]:
    return {r.name: r.weight for r in cfg.rewards.rewards}


def test_hacking_and_guarded_differ_only_in_rewards_kl_and_reference() -> None:
    hacking, guarded = _cfg("tiny-hacking"), _cfg("tiny-guarded")
    assert _weights(hacking) == {"colorfulness": 1.0, "world_alignment": 0.0, "world_quality": 0.0, "world_motion": 0.0}
    assert set(_weights(guarded)) == set(_weights(hacking)) and _weights(guarded)["colorfulness"] == 0.0
    assert min(_weights(guarded)[n] for n in ("world_alignment", "world_quality", "world_motion")) > 0
    assert hacking.rl.selective_kl is None and hacking.rl.reference == "base"
    skl = guarded.rl.selective_kl
    assert skl is not None and skl.main_reward == "world_alignment"
    assert set(skl.auxiliary_rewards) == {"world_quality", "world_motion"} and guarded.rl.reference == "lagging"
    a, b = hacking.model_dump(mode="json"), guarded.model_dump(mode="json")
    for key in ("seed", "model", "rollout", "data", "pipeline"):  # same prompts, held-out set, seed and budget
        assert a[key] == b[key], key
    for key in ("optim", "lora", "nft", "epochs", "advantage", "accumulation_steps", "micro_batch_size"):
        assert a["rl"][key] == b["rl"][key], key
    assert hacking.data.eval_prompts == Path("builtin:world/heldout.txt")


def test_long_config_streams_long_videos_in_windows_at_the_short_window_size() -> None:
    long, short = _cfg("tiny-long"), _cfg("tiny-world")
    assert long.rollout.num_latent_frames is not None and long.rollout.num_latent_frames >= 24
    assert long.rollout.num_latent_frames % 3 == 0 and long.rollout.window_start == "random"
    assert long.model.local_attn_frames is not None and long.model.local_attn_frames < long.rollout.num_latent_frames
    assert long.model.sink_frames and long.rl.update.mode == "window"
    assert long.rollout.window_blocks == short.rollout.window_blocks  # the update memory compares
    assert _weights(long)["world_alignment_late"] == 0.0 and _weights(long)["world_alignment"] > 0
    assert str(long.data.eval_prompts) == "builtin:world/heldout_scenes.txt"
    assert str(long.data.train_prompts) == "builtin:world/train_scenes.txt"


# ----------------------------------------------------------------------------------- scene prompts and late reward


def test_scene_prompts_chain_two_visibly_different_captions_of_one_set() -> None:
    held = heldout_captions()
    prompts = scene_prompts(held)
    assert prompts == scene_prompts(held) and prompts != scene_prompts(held, seed=1)  # deterministic from the seed
    texts = {c.text for c in held}
    for line, first in zip(prompts, held):
        scenes = parse_scene_prompt(line)
        assert [s.seconds for s in scenes] == [3.0, None] and scenes[0].prompt == first.text
        second = parse_caption(scenes[1].prompt)
        assert second.text in texts and second.color != first.color and second.direction != first.direction


def test_packaged_scene_prompt_files_are_the_generator_and_survive_the_filter(tmp_path: Path) -> None:
    written = write_scene_prompt_files(tmp_path)
    for name, path, captions in zip(("train", "heldout"), written, (train_captions(), heldout_captions())):
        lines = read_prompt_file(f"builtin:world/{name}_scenes.txt")
        assert [line.text for line in lines] == scene_prompts(captions)  # regenerate: write_scene_prompt_files
        assert path.read_text().splitlines() == scene_prompts(captions)
        assert filter_prompts(lines, PromptFilterConfig()).counts["kept"] == len(captions)


def _score(name: str, video: np.ndarray, prompt: str, **options) -> float:
    reward = build_rewards([RewardSpec(name=name, options=options)])
    return float(score_all(reward, video, [prompt])[name].scores[0])


def test_late_alignment_judges_only_the_last_frames() -> None:
    text = f"{A}[1s] | {B}"  # 16 frames of A, then 16 of B
    video = render_scene_prompt(text, np.random.default_rng(4), num_frames=32).frames.permute(0, 2, 3, 1).numpy()[None]
    wrong_first = f"{C}[1s] | {B}"
    assert _score("world_alignment_late", video, text) >= 0.99
    assert _score("world_alignment_late", video, wrong_first) >= 0.99  # the tail lies in the second scene only
    assert _score("world_alignment", video, wrong_first) < 0.8  # ... which the whole-video alignment does not
    assert _score("world_alignment_late", video, f"{B}[1s] | {A}") < 0.3
    whole = _score("world_alignment_late", video, wrong_first, late_fraction=1.0)
    assert math.isclose(whole, _score("world_alignment", video, wrong_first), abs_tol=1e-9)
    assert _score("world_alignment_late", video[:, 16:], B) >= 0.99  # a plain caption: its last third


# ----------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory):
    """``train(name) -> run path``: one-iteration runs of the claim configs on a quick world model, memoised."""
    root = tmp_path_factory.mktemp("claims")
    world = build_world_model(root / "world-root", QUICK)
    runs: dict[str, Path] = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", "sqlite:///" + str((root / "mlflow.db").resolve()))
        mp.setattr(pretrain, "world_model_root", lambda checkpoint_dir: world)
        mp.setattr(pretrain, "ensure_world_model", lambda checkpoint_dir, progress=None: world)

        def train(name: str, *extra: str) -> Path:
            if name not in runs:
                from flows.run import train_run

                cfg = load_config(CONFIGS[name], [*SMOKE, f"pipeline.runs_root={root / 'runs'}", *extra])
                summary = train_run(cfg)
                assert summary.computed_nodes > 0 and set(summary.eval) == {0, 1}
                runs[name] = summary.run_path
            return runs[name]

        yield train


def _manifest(run: Path, stage: str, iteration: int) -> Manifest:
    (path,) = (run / f"iter-{iteration:04d}" / stage).glob("*/manifest.json")
    return Manifest.load(path.parent)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny-hacking", "tiny-guarded"])
def test_hacking_pair_trains_end_to_end_and_logs_every_world_reward(smoke, name: str) -> None:
    run = smoke(name)
    for iteration in (0, 1):
        metrics = _manifest(run, "evaluate", iteration).metrics
        for reward in ("colorfulness", "world_alignment", "world_quality", "world_motion"):
            assert math.isfinite(metrics[f"eval/reward/{reward}/mean"]), (reward, metrics)
    assert (run / "report.html").is_file()


@pytest.mark.slow
def test_long_config_trains_a_late_window_of_a_long_video_and_scores_late_alignment(smoke) -> None:
    run = smoke("tiny-long")
    rollout = _manifest(run, "rollout", 0)
    assert rollout.counts["num_blocks_per_video"] == 10
    (shard, *_) = sorted((run / "iter-0000" / "rollout").glob("*/rollout-*.tar"))
    for rec in read_rollout_shards([shard]):  # the window is conditioned on, and judged by, its scene's caption
        meta = rec["meta"]
        first, second = (scene.prompt for scene in parse_scene_prompt(meta["prompt"]))
        assert [s[:3] for s in meta["scenes"]] == [[first, 0, 4], [second, 4, 10]]
        assert meta["window_prompt"] == (first if meta["window_start_frame"] < 12 else second)
    update = _manifest(run, "nft_update", 0)
    assert update.timings["peak_rss_mib"] > 0  # compared with tiny-world's in the report of issue 13
    evaluation = _manifest(run, "evaluate", 1)
    assert evaluation.counts["num_latent_frames"] == 30 and evaluation.counts["nan_scores"] == 0
    for name in ("world_alignment", "world_alignment_late"):  # a held-out scene prompt, both scenes a world caption
        assert 0.0 <= evaluation.metrics[f"eval/reward/{name}/mean"] <= 1.0


@pytest.mark.slow
def test_report_vs_puts_both_runs_on_one_page(smoke) -> None:
    hacking, guarded = smoke("tiny-hacking"), smoke("tiny-guarded")
    result = CliRunner().invoke(cli.app, ["report", str(hacking), "--vs", str(guarded)])
    assert result.exit_code == 0, result.output
    path = comparison_path(hacking, "tiny-guarded")
    assert f"wrote {path}" in result.output.replace("\n", "")
    html = path.read_text(encoding="utf-8")
    assert "Astrolabe comparison: tiny-hacking vs tiny-guarded" in html
    assert html.count("<section id=headline>") == 2  # the two results tables, next to each other
    assert re.search(r"<div class=pair><div><h3>tiny-hacking</h3><section id=headline>.*?</section></div>"
                     r"<div><h3>tiny-guarded</h3><section id=headline>", html)
    curves = re.search(r"<img class=plot alt='reward curves of both runs: ([^']*)' src='data:image/png;base64,", html)
    assert curves and curves[1].split(", ") == ["colorfulness", "world_alignment", "world_quality", "world_motion"]
    assert "<code>rl.reference</code></td><td class=l>base</td><td class=l>lagging</td>" in html
    assert "src='file:" not in html and "http" not in html.split("</style>")[1]  # self-contained
    out = hacking.parent / "pair.html"
    assert CliRunner().invoke(cli.app, ["report", str(hacking), "--vs", str(guarded), "--out", str(out)]).exit_code == 0
    assert out.read_text(encoding="utf-8").count("<section id=headline>") == 2


def test_pair_panels_put_both_runs_in_each_reward_panel(tmp_path: Path) -> None:
    from astrolabe.report import ReportData
    from astrolabe.report.render import pair_panels

    def data(name: str, level: float, root: str = "runs") -> ReportData:
        cfg = _cfg(name)
        evals = {k: {"reward/world_alignment/mean": level + k, "combined/mean": 5.0} for k in (0, 8)}
        return ReportData(name, tmp_path / root / name, "", cfg, [], {"world_alignment": 1.0},
                          {"world_alignment": [(0.0, level)]}, evals, {}, [])

    panels = pair_panels(data("tiny-hacking", 0.1), data("tiny-guarded", 0.2))
    assert list(panels) == ["world_alignment"]  # the combined sums weigh differently: not on shared axes
    assert panels["world_alignment"] == {
        "tiny-hacking: training rollouts": [(0.0, 0.1)], "tiny-hacking: held-out eval": [(0.0, 0.1), (8.0, 8.1)],
        "tiny-guarded: training rollouts": [(0.0, 0.2)], "tiny-guarded: held-out eval": [(0.0, 0.2), (8.0, 8.2)],
    }
    same = pair_panels(data("tiny-guarded", 0.1, "a"), data("tiny-guarded", 0.2, "b"))
    assert "tiny-guarded (b): held-out eval" in same["world_alignment"]  # equal names: told apart by their roots
    assert len(pair_panels(data("tiny-guarded", 0.1), data("tiny-guarded", 0.2))["world_alignment"]) == 4
