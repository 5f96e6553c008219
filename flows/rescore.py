"""``astrolabe rescore``: score every stored rollout of a run with another reward set, without regenerating
anything (a new score output per iteration next to the training one; ``rescore/<name>/...`` in MLflow)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

from astrolabe.artifacts.engine import execute
from astrolabe.artifacts.lock import RunLock
from astrolabe.artifacts.manifest import Manifest
from astrolabe.artifacts.plan import plan_status
from astrolabe.config import ConfigError, RunConfig, config_to_dict
from astrolabe.tracking import Tracker
from flows.run import in_namespace, load_run_config
from stages import STAGES


def parse_reward_args(items: list[str]) -> list[dict[str, Any]]:
    """``["hpsv2", "motion=0.5"]`` -> reward specs ``[{"name": "hpsv2", "weight": 1.0}, ...]``."""
    specs = []
    for item in items:
        name, _, w = item.partition("=")
        if not name.strip():
            raise ConfigError(f"--reward {item!r}: give NAME or NAME=WEIGHT, e.g. --reward hpsv2=1.0")
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise ConfigError(f"--reward {item!r}: weight {w!r} is not a number") from None
        specs.append({"name": name.strip(), "weight": weight})
    if not specs:
        raise ConfigError("give at least one --reward NAME[=WEIGHT]")
    return specs


def with_rewards(cfg: RunConfig, specs: list[dict[str, Any]]) -> RunConfig:
    """``cfg`` with its reward set replaced (validated; an unknown name fails when the rewards are built)."""
    data = config_to_dict(cfg)
    data["rewards"]["rewards"] = specs
    data["rl"]["selective_kl"] = None  # the new set may lack the KL rewards; rescoring does not train
    from astrolabe.config import config_from_dict

    return config_from_dict(data, "rescore")


ScoreRunner = Callable[[RunConfig, Path, Path, int], Manifest]


def direct_score(cfg: RunConfig, run_path: Path, rollout_dir: Path, iteration: int) -> Manifest:
    return execute(STAGES["score"], cfg, run_path, {"rollout": rollout_dir}, iteration)


def rescore_configs(run_path: Path, reward_args: list[str]) -> tuple[RunConfig, RunConfig]:
    """The run's config and the rescoring config; unknown reward names or bad options fail here, before any work."""
    cfg = load_run_config(run_path)
    new_cfg = with_rewards(cfg, parse_reward_args(reward_args))
    from astrolabe.rewards import build_rewards

    build_rewards(new_cfg.rewards.rewards)
    return cfg, new_cfg


def rescore_run(run_path: Path, reward_args: list[str], score_runner: ScoreRunner | None = None) -> dict[int, dict[str, float]]:
    """Score every stored rollout of a run with another reward set; nothing is regenerated.

    Each iteration gets a new score output next to the training one (its key holds the new rewards'
    identities); the run's MLflow run receives ``rescore/<name>/{mean,std,nan_fraction}`` at each
    iteration, next to the training ``reward/...`` curves, and a ``rescore_curves.png`` with both.
    """
    score_runner = score_runner or direct_score
    with RunLock(run_path):
        cfg, new_cfg = rescore_configs(run_path, reward_args)
        statuses = plan_status(cfg, run_path, STAGES)
        rollouts = [s for s in statuses if s.node.stage == "rollout" and s.status == "done"]
        if not rollouts:
            raise ValueError(f"{run_path} has no completed rollout to rescore; run `astrolabe train` first")
        tracker = Tracker(cfg.tracking, cfg.pipeline.runs_root)
        tracker.start_or_resume(cfg.name, run_path)
        out: dict[int, dict[str, float]] = {}
        history: dict[str, list[tuple[float, float]]] = defaultdict(list)
        try:
            for st in rollouts:
                k = st.node.iteration
                assert k is not None and st.path is not None
                m = score_runner(new_cfg, run_path, st.path, k)
                metrics = {f"rescore/{name}": v for name, v in in_namespace(m.metrics, "reward").items()}
                tracker.log_metrics(metrics, step=k)
                out[k] = metrics
                for key, v in metrics.items():
                    if key.endswith("/mean"):
                        history[key].append((k, v))
            old = [s for s in statuses if s.node.stage == "score" and s.status == "done"]
            for s in old:
                assert s.path is not None and s.node.iteration is not None
                for key, v in Manifest.load(s.path).metrics.items():
                    if key.startswith("reward/") and key.endswith("/mean"):
                        history[key].append((s.node.iteration, v))
            if history:
                tracker.log_curves(dict(history), name="rescore_curves.png", title=f"{cfg.name}: rescore")
        finally:
            tracker.end("FINISHED")
        return out
