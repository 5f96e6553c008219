"""``astrolabe report RUN``: the self-contained HTML report of the small reference run (tests/pipeline_helpers.py),
checked as text (what each section holds, against the run's manifests) and rendered in headless Chromium
(videos load and play, the screenshot is not blank; skipped without a chromium binary on PATH)."""

from __future__ import annotations

import base64
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import pipeline_helpers as ph
from pipeline_helpers import base, ref  # noqa: F401  (shared fixtures)
from astrolabe.data.video import decode_mp4, encode_mp4
from astrolabe.report import REPORT_FILE, collect
from astrolabe.report.media import browser_video
from astrolabe.report.render import curve_panels
from flows import cli
from flows.run import load_run_config

VIDEO_RE = re.compile(r"<video ([^>]*)src='data:video/mp4;base64,([A-Za-z0-9+/=]+)'")
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
needs_chromium = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")


@pytest.fixture
def report(base, ref):  # noqa: F811
    """A copy of the reference run (its config: tiny.yaml with the small run's overrides and ``name=reported``)
    reported by the CLI once per process: ``(run dir, html)``."""
    run = ref.parent / "reported"
    if not run.exists():
        ph.copy_run(ref, run.name, keep_mlflow=True)
        result = CliRunner().invoke(cli.app, ["report", str(run)])
        assert result.exit_code == 0, result.output
        assert re.search(rf"wrote {run / REPORT_FILE} \(and to MLflow run [0-9a-f]+\)", result.output)
    return run, (run / REPORT_FILE).read_text(encoding="utf-8")


def _outputs(run: Path):
    from astrolabe.artifacts.plan import plan_status
    from astrolabe.artifacts.manifest import Manifest
    from astrolabe.report import StageOutput
    from stages import STAGES

    return [StageOutput(s.node.stage, s.node.iteration, s.path, Manifest.load(s.path))
            for s in plan_status(load_run_config(run), run, STAGES, check_sha=False) if s.status == "done"]


def test_train_writes_the_report_logs_it_and_names_it(ref, base):  # noqa: F811
    assert (ref / REPORT_FILE).is_file()
    summary = json.loads((ref / "run-summary.json").read_text())
    assert summary["locations"]["report"] == str(ref / REPORT_FILE)
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=ph.mlflow_uri(base))
    run_id = (ref / "mlflow_run_id.txt").read_text().strip()
    assert [a.path for a in client.list_artifacts(run_id, "report")] == [f"report/{REPORT_FILE}"]


def test_report_is_self_contained_with_playable_videos(report):
    run, html = report
    assert not re.search(r"""(src|href)\s*=\s*['"]?(https?:|//|file:)""", html, re.I)
    assert not re.search(r"<(link|script)\b", html, re.I)  # CSS inline, no script
    assert all(v.startswith("data:") for v in re.findall(r"""\bsrc=['"]([^'"]*)""", html))
    videos = VIDEO_RE.findall(html)
    d = collect(run, load_run_config(run), _outputs(run))
    assert len(videos) == len(d.grid) * len(d.grid_columns) == 1 * 3  # 1 held-out sample x evaluations 0, 1, 2
    for attrs, b64 in videos:
        assert {"controls", "loop", "muted", "autoplay"} <= set(attrs.split())
        data = base64.b64decode(b64)
        assert data[4:8] == b"ftyp"
        assert decode_mp4(data).shape == (21, 64, 64, 3)


def test_report_sections_hold_the_runs_numbers(report):
    run, html = report
    cfg = load_run_config(run)
    outputs = _outputs(run)
    d = collect(run, cfg, outputs)
    assert re.search(rf"<h1>Astrolabe report: {cfg.name}</h1><p>\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d UTC", html)
    # headline: every eval reward, first -> last evaluation, from the evaluate manifests
    ev = {o.iteration: o.manifest.metrics for o in outputs if o.stage == "evaluate"}
    for r in cfg.rewards.rewards:
        first, last = ev[0][f"eval/reward/{r.name}/mean"], ev[2][f"eval/reward/{r.name}/mean"]
        assert re.search(rf"<td class=l>{r.name}</td><td>[^<]*</td><td>{first:.4g}</td><td>{last:.4g}</td>", html)
    # a curve per reward: training rollouts (score manifests) and held-out (evaluate manifests)
    panels = curve_panels(d)
    scores = {o.iteration: o.manifest.metrics for o in outputs if o.stage == "score"}
    for r in cfg.rewards.rewards:
        assert panels[r.name]["training rollouts"] == [(float(k), scores[k][f"reward/{r.name}/mean"]) for k in (0, 1)]
        assert [k for k, _ in panels[r.name]["held-out eval"]] == [0.0, 1.0, 2.0]
        assert r.name in re.search(r"alt='reward curves: ([^']*)'", html)[1]
    # the grid row's caption is its held-out prompt
    prompts_dir = next(o.path for o in outputs if o.stage == "filter_prompts")
    caption = (prompts_dir / "heldout.txt").read_text().splitlines()[0].strip()
    assert f"<td class=caption>{caption}<div class=muted>p000-s1000</div>" in html
    # selective KL: the flagged fraction per iteration, from label_uncertainty
    assert "<section id=kl>" in html and "Selective KL is on" in html
    labels = {o.iteration: o.manifest.metrics["labels/flagged_fraction"] for o in outputs if o.stage == "label_uncertainty"}
    assert d.kl["flagged fraction (selective KL)"] == [(0.0, labels[0]), (1.0, labels[1])]
    assert [k for k, _ in d.kl["KL loss"]] == [0.0, 1.0]
    # stage table: each stage's calls, summed seconds and peak RSS from the manifests
    stages_html = html[html.index("<section id=stages>"):html.index("<section id=config>")]
    for stage in ("filter_prompts", "rollout", "score", "label_uncertainty", "nft_update", "evaluate"):
        ms = [o.manifest for o in outputs if o.stage == stage]
        total, peak = sum(m.timings["total"] for m in ms), max(m.timings["peak_rss_mib"] for m in ms)
        assert f"<td class=l>{stage}</td><td>{len(ms)}</td><td>{total:.4g}</td>" in stages_html
        assert f"<td>{peak:.4g}</td>" in stages_html and peak > 10
    # config differences from the defaults: the small run's overrides (default -> value)
    config_html = html[html.index("<section id=config>"):]
    assert re.search(r"<code>pipeline\.iterations</code></td><td class=l>\d+</td><td class=l>2</td>", config_html)
    assert re.search(r"<code>rl\.lora\.rank</code></td><td class=l>\d+</td><td class=l>4</td>", config_html)
    assert "<code>name</code></td><td class=l>tiny</td><td class=l>reported</td>" in config_html


def test_browser_video_reencodes_lossless_h264_for_every_browser(tmp_path):
    import av

    frames = np.random.default_rng(0).integers(0, 255, (5, 16, 16, 3), dtype=np.uint8)
    src = tmp_path / "lossless.mp4"
    src.write_bytes(encode_mp4(frames, fps=8, crf=0))
    mp4, poster = browser_video(src, fps=8)
    with av.open(io.BytesIO(mp4)) as c:
        assert c.streams.video[0].codec_context.profile == "High"  # not "High 4:4:4 Predictive" (crf 0)
    from PIL import Image

    assert Image.open(io.BytesIO(poster)).size == (16, 16)


def _chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           f"--user-data-dir={tmp_path / 'profile'}", *args], capture_output=True, timeout=120)


PROBE = """<script>addEventListener('load', () => { const vs = [...document.querySelectorAll('video')];
Promise.all(vs.map(v => v.readyState >= 2 ? 0 : new Promise(r => { v.onloadeddata = r; v.onerror = r; })))
.then(() => document.body.dataset.videos = vs.map(v => v.readyState + ':' + v.videoWidth).join(',')); });</script>"""


@needs_chromium
def test_report_renders_in_headless_chromium(report, tmp_path):
    run, html = report
    shot = tmp_path / "report.png"
    _chromium(tmp_path, f"--screenshot={shot}", "--window-size=1200,2000", (run / REPORT_FILE).as_uri())
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"))  # (2000, 1200, 3)
    assert pixels.shape[:2] == (2000, 1200)
    colours = len(np.unique(pixels.reshape(-1, 3), axis=0))
    non_white = float((pixels.min(axis=2) < 240).mean())
    assert colours > 500 and non_white > 0.1, (colours, non_white)  # plots, videos' posters, tables: not blank
    # every video decodes in the browser (readyState >= 2: HAVE_CURRENT_DATA; its frames 64 pixels wide)
    probe = tmp_path / "probe.html"
    probe.write_text(html.replace("</body>", PROBE + "</body>"), encoding="utf-8")
    dom = _chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()).stdout.decode()
    states = re.search(r'data-videos="([^"]*)"', dom)[1].split(",")
    assert len(states) == 3 and all(int(s.split(":")[0]) >= 2 and s.endswith(":64") for s in states), states


def test_grid_shows_first_last_and_spaced_evaluations_distinct_prompts_first():
    from astrolabe.report.collect import _seed_major, grid_iterations

    assert grid_iterations([0, 8, 16, 24]) == [0, 8, 16, 24]
    assert grid_iterations([0, 1, 2, 3, 4, 5, 6]) == [0, 2, 4, 6]
    assert grid_iterations([0, 3, 6, 9, 12], max_columns=2) == [0, 12]
    videos = [Path(f"p{i:03d}-s{s}.mp4") for i in range(3) for s in (1000, 1001)]
    assert [v.stem for v in sorted(videos, key=_seed_major)][:4] == ["p000-s1000", "p001-s1000", "p002-s1000",
                                                                       "p000-s1001"]


def test_a_run_without_outputs_yet_gets_a_report_saying_so(tmp_path):
    from astrolabe.config import RunConfig
    from astrolabe.report import write_report

    html = write_report(tmp_path, RunConfig(name="fresh"), []).read_text(encoding="utf-8")
    assert "Astrolabe report: fresh" in html and "No evaluation yet" in html and "No evaluation videos yet" in html
    assert "<code>name</code></td><td class=l>tiny</td><td class=l>fresh</td>" in html
