"""Stage ``arcopo_buffer``: the semi-on-policy replay buffer, rolled out once by the reference policy.

Inputs: ``prompts`` (the filter_prompts directory). Runs only with ``rl.algorithm: arcopo`` and
``arcopo.semi`` set (:mod:`astrolabe.rl.arcopo_semi`).

The buffer is ``arcopo.semi.parts`` parts of ``groups_per_part`` AR-CoPO pivot groups. Part ``j`` is the
chain ``rollout -> score -> label_uncertainty`` run as iteration ``j`` of a *buffer config*
(:func:`buffer_config`: the run's config with ``rollout.prompts_per_iteration = groups_per_part``,
``rollout.seed = semi.seed`` and the semi reward weights), with no checkpoint, i.e. sampled by the base
model = pi_ref. Each stage of the chain is executed by :func:`astrolabe.artifacts.engine.execute` under the shared root
:func:`buffer_root` (``<runs_root>/_shared/arcopo_buffer``), not under the run: its keys are content keys
(config subset + the prompts' identity, never the run name), so every run with the same key reuses the
buffer, and an interrupted build resumes at the first part that is not complete (a part in progress
restarts; published parts are never recomputed).

Output: ``parts.json`` listing each part's rollout and labels directories (absolute paths) and keys
(:func:`read_parts` reads it back). Every part is published by the run engine; the stage's own output is
published by the engine too (``parts.json`` is written into its temporary directory by the atomic writer).
Under torchrun every rank runs the same chain (the nested stages slice and publish as usual).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from astrolabe.artifacts.atomic import write_json
from astrolabe.artifacts.engine import execute
from astrolabe.artifacts.manifest import Manifest
from astrolabe.artifacts.stage import StageInfo, StageResult
from astrolabe.artifacts.stagedir import stage_root
from astrolabe.config import RunConfig, config_to_dict
from astrolabe.distributed import dist_rank_world
from astrolabe.rewards.spec import RewardSpec
from stages import label_uncertainty, rollout, score

log = logging.getLogger(__name__)

PARTS_FILE = "parts.json"
SHARED_DIR = "_shared"


def buffer_config(cfg: RunConfig) -> RunConfig:
    """The config the buffer's rollout/score/label stages run with (module docstring)."""
    semi = cfg.arcopo.semi
    if cfg.rl.algorithm != "arcopo" or semi is None:
        raise ValueError("the arcopo_buffer stage needs rl.algorithm: arcopo and an arcopo.semi section")
    rewards = cfg.rewards
    if semi.reward_weights is not None:
        unknown = sorted(set(semi.reward_weights) - {s.name for s in rewards.rewards})
        if unknown:
            raise KeyError(f"arcopo.semi.reward_weights names rewards {unknown} that are not in rewards.rewards")
        specs = tuple(RewardSpec.model_validate({**s.model_dump(), "weight": semi.reward_weights.get(s.name, 0.0)})
                      for s in rewards.rewards)
        rewards = rewards.model_copy(update={"rewards": specs})
    ro = cfg.rollout.model_copy(update={"prompts_per_iteration": semi.groups_per_part, "seed": semi.seed})
    return cfg.model_copy(update={"rollout": ro, "rewards": rewards})


def buffer_root(cfg: RunConfig) -> Path:
    """Where buffer parts live: shared by every run under ``pipeline.runs_root`` (no run name)."""
    return Path(cfg.pipeline.runs_root) / SHARED_DIR / "arcopo_buffer"


def _config_subset(cfg: RunConfig) -> dict[str, Any]:
    b = buffer_config(cfg)
    return {"seed": b.seed, "model": config_to_dict(b.model), "rollout": config_to_dict(b.rollout),
            "rewards": config_to_dict(b.rewards), "arcopo": cfg.arcopo.model_dump(mode="json", exclude={"merge"}),
            "advantage": config_to_dict(b.rl.advantage)}


STAGE = StageInfo(name="arcopo_buffer", code_version="1", config_subset=_config_subset, per_iteration=False,
                  distribution="sliced", rank_invariant_counts=("parts", "groups", "records"))


def _dir(root: Path, m: Manifest) -> Path:
    return stage_root(root, m.stage, m.iteration) / m.key


def build_part(cfg: RunConfig, root: Path, prompts: Path, part: int) -> dict[str, Any]:
    """Part ``part`` of the buffer (cached chain rollout -> score -> label); returns its directories and keys."""
    ro = execute(rollout, cfg, root, {"prompts": prompts}, iteration=part)
    sc = execute(score, cfg, root, {"rollout": _dir(root, ro)}, iteration=part)
    lab = execute(label_uncertainty, cfg, root, {"rollout": _dir(root, ro), "score": _dir(root, sc)}, iteration=part)
    return {"part": part, "rollout": str(_dir(root, ro).resolve()), "labels": str(_dir(root, lab).resolve()),
            "keys": {"rollout": ro.key, "score": sc.key, "labels": lab.key}, "records": ro.counts["candidates"]}


def run(cfg: RunConfig, inputs: Mapping[str, Path], out_dir: Path, iteration: int | None) -> StageResult:
    if "prompts" not in inputs:
        raise KeyError("the arcopo_buffer stage needs inputs['prompts'] (the filter_prompts directory)")
    bcfg, root = buffer_config(cfg), buffer_root(cfg)
    parts = []
    for j in range(cfg.arcopo.semi.parts):
        parts.append(build_part(bcfg, root, Path(inputs["prompts"]), j))
        log.info("arcopo_buffer: part %d/%d ready at %s", j + 1, cfg.arcopo.semi.parts, parts[-1]["rollout"])
    if dist_rank_world()[0] == 0:  # every rank built the same list
        write_json(out_dir / PARTS_FILE, {"root": str(root.resolve()), "parts": parts}, indent=2)
    return StageResult(counts={"parts": len(parts), "groups": cfg.arcopo.semi.groups,
                               "records": sum(p["records"] for p in parts)},
                       extra={"root": str(root.resolve()), "part_keys": [p["keys"] for p in parts]})


def read_parts(buffer: Path) -> list[dict[str, Any]]:
    """The parts listed in ``<buffer>/parts.json`` (the stage output): ``rollout`` / ``labels`` directories, keys."""
    path = Path(buffer) / PARTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; inputs['buffer'] must be an arcopo_buffer output directory")
    return json.loads(path.read_text(encoding="utf-8"))["parts"]
