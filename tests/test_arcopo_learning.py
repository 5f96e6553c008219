"""The tiny AR-CoPO run raises its reward above its seed noise (issue 14's learning test).

configs/tiny-arcopo.yaml, on-policy adapter only (``arcopo.semi: null``), shortened (fewer groups per iteration,
fewer iterations, fewer held-out prompts), is trained from three run seeds (``seed=K``: other prompts, pivots and
noise); the held-out evaluation uses the same prompts and eval seeds throughout, so the base model's score is
one number. The gain of every seed (final minus base colourfulness) must be positive, and the mean gain must
exceed twice the spread of the final scores over the seeds (their population std): learning, not luck.
Flipping the advantage sign in ``label_uncertainty`` makes this test fail (checked when it was written).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest

from astrolabe.artifacts.engine import execute
from astrolabe.artifacts.manifest import Manifest
from astrolabe.artifacts.stagedir import stage_root
from astrolabe.config import load_config
from stages import evaluate, filter_prompts, label_uncertainty, nft_update, rollout, score

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 4
SHORT = [
    "arcopo.semi=null", "rollout.prompts_per_iteration=4", "pipeline.eval_max_prompts=4",
    f"pipeline.iterations={ITERATIONS}",
]
METRIC = "eval/reward/colorfulness/mean"
SEEDS = (0, 1, 2)

pytestmark = pytest.mark.slow


def _dir(run: Path, m: Manifest) -> Path:
    return stage_root(run, m.stage, m.iteration) / m.key


def train_and_evaluate(cfg, run: Path, prompts: Path) -> Manifest:
    """``ITERATIONS`` iterations of rollout -> score -> label -> update, then the evaluation of the last policy."""
    ckpt: dict[str, Path] = {}
    for it in range(ITERATIONS):
        r = _dir(run, execute(rollout, cfg, run, {"prompts": prompts, **ckpt}, it))
        s = _dir(run, execute(score, cfg, run, {"rollout": r}, it))
        lab = _dir(run, execute(label_uncertainty, cfg, run, {"rollout": r, "score": s}, it))
        ckpt = {"checkpoint": _dir(run, execute(nft_update, cfg, run, {"rollout": r, "labels": lab, **ckpt}, it))}
    return execute(evaluate, cfg, run, {"prompts": prompts, **ckpt}, ITERATIONS)


def test_tiny_arcopo_run_raises_its_reward_above_its_seed_noise(tmp_path):
    cfg0 = load_config(REPO / "configs" / "tiny-arcopo.yaml", [*SHORT, f"pipeline.runs_root={tmp_path}"])
    run0 = tmp_path / "base"
    prompts = _dir(run0, execute(filter_prompts, cfg0, run0, {}))
    base = execute(evaluate, cfg0, run0, {"prompts": prompts}, 0).metrics[METRIC]  # the same for every seed
    final = []
    for k in SEEDS:
        cfg = cfg0.model_copy(update={"seed": k})
        final.append(train_and_evaluate(cfg, tmp_path / f"seed{k}", prompts).metrics[METRIC])
    gains = np.asarray(final) - base
    noise = float(np.std(final))
    log.info("tiny AR-CoPO: base %.4f, final %s, gains %s, seed noise (std) %.4f", base, final, gains, noise)
    print(f"tiny AR-CoPO colourfulness: base {base:.4f}, final {np.round(final, 4)}, seed std {noise:.4f}")
    assert (gains > 0).all(), f"a seed did not learn: gains {gains}"
    assert gains.mean() > 2 * noise, f"mean gain {gains.mean():.4f} within the seed noise {noise:.4f}"
