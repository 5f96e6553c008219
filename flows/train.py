"""Prefect flows: ``train``, ``rescore``, ``evaluate``, ``generate``; thin wiring over :mod:`flows.run`.

Flows pass paths and names, never tensors. Every stage call is one task run named
``<stage>-it<k>``, whatever its world size: a stage that ``resources`` gives N > 1 processes runs as one
torchrun (or srun + torchrun) job launched by its task (:mod:`flows.launch`), the job's output in the task's
log. The ``score`` stage is retried on transient errors (``SCORE_RETRIES``). Caching is
Astrolabe's own (content-keyed stage directories), so Prefect's task cache is off.

Local mode (default): the CLI starts a temporary local server tied to its process, or uses the one of
``astrolabe up`` (:mod:`flows.server`), quiet and offline (:func:`flows.prefect_env.configure`). Set
``PREFECT_API_URL`` to run against another server (UI, deployments in ``deploy/prefect.yaml``, workers).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from flows.prefect_env import configure

configure()

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from astrolabe.artifacts.atomic import write_text  # noqa: E402
from astrolabe.artifacts.engine import execute  # noqa: E402
from astrolabe.artifacts.lock import RunLock  # noqa: E402
from astrolabe.artifacts.manifest import Manifest  # noqa: E402
from astrolabe.artifacts.plan import Node, Runner, run_stage  # noqa: E402
from astrolabe.config import RunConfig, load_config  # noqa: E402
from flows import progress  # noqa: E402
from flows import run as run_mod  # noqa: E402
from flows import signals  # noqa: E402
from flows.launch import run_node  # noqa: E402
from stages import STAGES  # noqa: E402

signals.record_prefect_sigterm()  # a SIGTERM inside a flow is recorded even if Prefect's exception is lost

SCORE_RETRIES = 2
SCORE_RETRY_DELAY_S = 5.0


def not_interrupted(task: object, task_run: object, state: object) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task only if no termination signal arrived (a SIGTERM
    inside a task may surface as an ordinary failure; it must stop the run, not be retried)."""
    return not signals.RECEIVED


@task(cache_policy=NO_CACHE, persist_result=False)
def stage_task(config_path: str, run_path: str, stage: str, iteration: int | None, inputs: dict[str, str],
               force: bool = False, launch: bool = True) -> dict[str, Any]:  # fmt: skip
    """Run one stage from the run's recorded config; returns its manifest as a dict.

    ``launch``: where ``resources`` gives the stage more than one process, run it as a torchrun (or srun)
    job whose output goes to this task's log (:func:`flows.launch.run_node`); else in this process.
    """
    cfg = load_config(config_path)
    paths = {k: Path(v) for k, v in inputs.items()}
    if not launch:
        return execute(STAGES[stage], cfg, Path(run_path), paths, iteration, force=force).model_dump(mode="json")
    m = run_node(cfg, Path(run_path), stage, iteration, paths, force, log_line=job_log_line())
    return m.model_dump(mode="json")


def job_log_line() -> Callable[[str], None]:
    """Where a launched job's output lines go: this task run's log (the UI) at INFO, even though Prefect's own
    level is WARNING (:mod:`flows.prefect_env`), and the console only where INFO is shown (``astrolabe -v``)."""
    run_logger = get_run_logger()
    job = logging.getLogger("prefect.task_runs.job")
    job.setLevel(logging.INFO)
    job.propagate = False
    root = logging.getLogger()
    job.handlers = [*logging.getLogger("prefect.task_runs").handlers,
                    *(root.handlers if root.isEnabledFor(logging.INFO) else [])]  # fmt: skip
    adapter = logging.LoggerAdapter(job, dict(run_logger.extra))  # the task and flow run ids the API handler needs
    return lambda line: adapter.info("%s", line)


def task_name(stage: str, iteration: int | None) -> str:
    return stage if iteration is None else f"{stage}-it{iteration}"


def prefect_runner(cfg: RunConfig, run_path: Path) -> Runner:
    """Each node as a Prefect task run (score retried); the config is read from ``<run>/config.yaml``."""
    config_path = str(run_path / run_mod.CONFIG_FILE)

    def run(node: Node, inputs: Mapping[str, Path], force: bool) -> Manifest:
        retries = SCORE_RETRIES if node.stage == "score" else 0
        t = stage_task.with_options(name=task_name(node.stage, node.iteration), retries=retries,
                                    retry_delay_seconds=SCORE_RETRY_DELAY_S, retry_condition_fn=not_interrupted)
        out = t(config_path, str(run_path), node.stage, node.iteration, {k: str(v) for k, v in inputs.items()}, force)
        return Manifest.model_validate(out)

    return run


def resources_overrides(nproc_per_node: int | None = None, nnodes: int | None = None,
                        launcher: str | None = None) -> list[str]:  # fmt: skip
    """``resources.<key>=<value>`` overrides of the parameters given (None: the config's value)."""
    given = {"nproc_per_node": nproc_per_node, "nnodes": nnodes, "launcher": launcher}
    return [f"resources.{k}={v}" for k, v in given.items() if v is not None]


@flow(name="train")
def train(config: str, run_name: str | None = None, overrides: list[str] | None = None,
          nproc_per_node: int | None = None, nnodes: int | None = None, launcher: str | None = None) -> dict[str, Any]:
    """All iterations of a run (resumes: completed stages are skipped). Returns the run summary.

    ``nproc_per_node`` / ``nnodes`` / ``launcher`` (torchrun | slurm) override ``resources``: each heavy stage
    then runs as one job of that many processes, launched by its task.
    """
    sets = list(overrides or []) + resources_overrides(nproc_per_node, nnodes, launcher)
    sets += [f"name={run_name}"] if run_name else []
    cfg = load_config(config, sets)
    shown = progress.current()  # the CLI's progress display, when called from `astrolabe train`
    return run_mod.train_run(cfg, runner_factory=prefect_runner, on_start=shown.start if shown else None,
                             on_done=shown.done if shown else None).to_json()


@flow(name="rescore")
def rescore(run: str, rewards: list[str], runs_root: str | None = None) -> dict[str, Any]:
    """Score every stored rollout of ``run`` with another reward set (no regeneration)."""
    from astrolabe.config import dump_config

    run_path = run_mod.resolve_run_path(run, Path(runs_root) if runs_root else None)
    config_path = run_path / ".rescore-config.yaml"  # the tasks read the rescoring config from a path

    def score_runner(cfg: RunConfig, rp: Path, rollout_dir: Path, iteration: int) -> Manifest:
        if not config_path.is_file() or load_config(config_path) != cfg:
            write_text(config_path, dump_config(cfg))
        t = stage_task.with_options(name=task_name("score", iteration), retries=SCORE_RETRIES,
                                    retry_delay_seconds=SCORE_RETRY_DELAY_S, retry_condition_fn=not_interrupted)
        out = t(str(config_path), str(rp), "score", iteration, {"rollout": str(rollout_dir)}, launch=False)
        return Manifest.model_validate(out)  # in this process: the stage command reads the run's own config

    from flows.rescore import rescore_run

    out = rescore_run(run_path, rewards, score_runner)
    return {str(k): v for k, v in out.items()}


@flow(name="evaluate")
def evaluate(run: str, iteration: int | None = None, runs_root: str | None = None, force: bool = False) -> dict[str, Any]:
    """Evaluate one policy version of a run (default: the last one planned); returns its ``eval/`` metrics."""
    run_path = run_mod.resolve_run_path(run, Path(runs_root) if runs_root else None)
    with RunLock(run_path):
        cfg = run_mod.load_run_config(run_path)
        k = cfg.pipeline.iterations if iteration is None else iteration
        res = run_stage(cfg, run_path, STAGES, "evaluate", k, force, runner=prefect_runner(cfg, run_path))
    return run_mod.in_namespace(res.manifest.metrics, "eval")


@flow(name="generate")
def generate(config: str, prompts: list[str], output_dir: str, checkpoint: str | None = None, seed: int = 0,
             overrides: list[str] | None = None) -> list[str]:  # fmt: skip
    """Generate one mp4 per prompt with the base model or a checkpoint's trained LoRA."""
    from astrolabe.build import build_generation_stack
    from astrolabe.sampling.generation import generate_video

    cfg = load_config(config, overrides)
    stack, base = build_generation_stack(cfg, lora=Path(checkpoint) if checkpoint else None)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    frames = cfg.rollout.num_latent_frames or base.latent_frames
    return [str(generate_video(stack, p, seed + i, frames, out / f"{i:04d}.mp4").path) for i, p in enumerate(prompts)]
