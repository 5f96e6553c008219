"""The ``evaluate`` stage with AR-CoPO's two adapters: the merge sweep ``W0 + dW_semi + s dW_on``.

Dispatched from :func:`stages.evaluate.run` when ``rl.algorithm: arcopo``, ``arcopo.semi`` is set and a
checkpoint is evaluated. For each ``s`` of ``arcopo.merge.scales`` the full evaluation (same prompts and
seeds) is written to ``merge/s<s>/`` (videos, ``eval_rewards.zarr``, ``metrics.json``); the paper's rule
(:func:`astrolabe.rl.arcopo_semi.choose_merge_scale`) picks the largest ``s`` that beats the base model
(the ``baseline`` input, evaluate[0]) on both ``arcopo.merge.in_domain_metric`` and ``held_out_metric``.
The chosen scale's outputs are copied to the stage's top level, so ``reward/*`` metrics, the grid and
``astrolabe compare`` read the merged model like any other evaluation. When no scale qualifies (or there is
no baseline) the reported model is ``s = 0`` (the semi adapter alone; assumption, see the module above).

Metrics added: ``merge/s`` (reported), ``merge/s_rule`` (the rule's choice, null when none),
``merge/s<s>/<metric>`` for both metrics and every scale.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from astrolabe.config import RunConfig
from astrolabe.models.factory import build_generation_stack
from astrolabe.rl.arcopo_semi import SEMI_STATE_SUBDIR, choose_merge_scale, merge_adapters
from stages.evaluate import METRICS_FILE, REWARDS_FILE, VIDEOS_DIR, evaluate_policy

log = logging.getLogger(__name__)

MERGE_DIR = "merge"


def scale_dirname(s: float) -> str:
    return f"s{s:g}"


def merge_sweep(cfg: RunConfig, inputs: Mapping[str, Path], state: Path, prompts: Sequence[str],
                plan: Sequence[tuple[int, int]], out_dir: Path, iteration: int):  # fmt: skip
    """Evaluate every merge scale, choose, publish the chosen one at the top level (module docstring)."""
    semi_state = Path(state).parent / SEMI_STATE_SUBDIR
    if not semi_state.is_dir():
        raise FileNotFoundError(f"{semi_state} is missing: the checkpoint was trained without arcopo.semi")
    mc = cfg.arcopo.merge
    results: dict[float, tuple] = {}
    for s in mc.scales:
        dest = out_dir / MERGE_DIR / scale_dirname(s)
        dest.mkdir(parents=True)

        def build(s: float = s) -> tuple[Any, Any]:
            stack, spec = build_generation_stack(cfg)
            stack.dit = merge_adapters(stack.dit, [(semi_state, 1.0), (Path(state), s)])
            return stack, spec

        results[s] = evaluate_policy(cfg, build, prompts, plan, dest, iteration)
        log.info("evaluate it%d merge s=%g: %s %s, %s %s", iteration, s, mc.in_domain_metric,
                 results[s][1].get(mc.in_domain_metric), mc.held_out_metric, results[s][1].get(mc.held_out_metric))
    table = {s: r[1] for s, r in results.items()}
    baseline = inputs.get("baseline")
    base = json.loads((Path(baseline) / METRICS_FILE).read_text(encoding="utf-8")) if baseline is not None else None
    chosen = choose_merge_scale(table, base, mc.in_domain_metric, mc.held_out_metric) if base is not None else None
    reported = chosen if chosen is not None else (0.0 if 0.0 in table else min(table))
    if chosen is None:
        log.warning("evaluate it%d: no merge scale beats the base on both %s and %s; reporting s=%g", iteration,
                    mc.in_domain_metric, mc.held_out_metric, reported)
    src = out_dir / MERGE_DIR / scale_dirname(reported)
    shutil.copytree(src / VIDEOS_DIR, out_dir / VIDEOS_DIR)
    shutil.copytree(src / REWARDS_FILE, out_dir / REWARDS_FILE)
    paths, metrics, counts, _, spec = results[reported]
    metrics = {**metrics, "merge/s": reported, "merge/s_rule": chosen}
    for s, m in table.items():
        for name in dict.fromkeys((mc.in_domain_metric, mc.held_out_metric)):
            metrics[f"merge/{scale_dirname(s)}/{name}"] = m.get(name)
    (out_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str) + "\n",
                                        encoding="utf-8")
    timings = {k: sum(r[3].get(k, 0.0) for r in results.values()) for k in ("build", "generation", "scoring")}
    return [out_dir / VIDEOS_DIR / p.name for p in paths], metrics, counts, timings, spec
