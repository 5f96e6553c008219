"""The ``astrolabe`` command line (typer). Thin: parses options, builds from config, shows progress.

It lives in ``flows/`` because it drives the pipeline (stages and Prefect flows); the library
``astrolabe/`` never imports it. Pipeline commands import Prefect only when they run a flow.
"""

from __future__ import annotations

import dataclasses
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from astrolabe.artifacts.atomic import write_json
from astrolabe.config import ConfigError, config_to_dict, dump_config
from flows.cli_bench import bench_app
from flows.cli_common import (
    OPTIONS,
    ConfigOpt,
    EngineOpt,
    RootOpt,
    RunOpt,
    SetOpt,
    VerboseOpt,
    console,
    error,
    error_text,
    fail,
    load_cfg,
    progress_bar,
    setup_logging,
    user_errors,
)
from flows.cli_report import report_cmd
from flows.cli_services import compare, down_cmd, up_cmd
from flows.cli_summary import print_summary
from flows.cli_world import world_app

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Astrolabe: RL post-training of AR video models.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs.")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(world_app, name="world")


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
) -> None:
    """Astrolabe: RL post-training of AR video models."""
    OPTIONS["debug"] = debug


@config_app.command("show")
def config_show(
    preset: Annotated[Path | None, typer.Argument(help="YAML config, e.g. configs/self_forcing/hpsv3.yaml.")] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Print the resolved config as YAML (every key and its value), headed by what resources.gpus derives."""
    if preset is not None and config is not None:
        console.print("[red]give the config either as an argument or with --config, not both[/red]")
        raise typer.Exit(2)
    cfg = load_cfg(preset or config, set_)
    if cfg.resources.gpus is not None:
        from astrolabe.presets import describe, gpu_scale

        typer.echo("\n".join(f"# {line}" for line in describe(gpu_scale(cfg.model.base, cfg.resources.gpus))))
    typer.echo(dump_config(cfg))


@app.command()
def generate(
    output_dir: Annotated[Path, typer.Option("--output-dir", "-o", help="Where mp4s and JSON sidecars go.")],
    config: ConfigOpt = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="One prompt or scene prompt 'a[2s] | b'.")] = None,
    prompt_file: Annotated[Path | None, typer.Option("--prompt-file", help="One (scene) prompt per line.")] = None,
    num_frames: Annotated[int | None, typer.Option("--num-frames", help="Pixel frames, 1 + 4k (e.g. 81).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the first prompt; prompt i uses seed + i.")] = 0,
    checkpoint: Annotated[
        Path | None, typer.Option("--checkpoint", help="PEFT LoRA dir, a checkpoint dir containing lora/, or a "
                                  "run directory (runs/<name>: its last policy).")
    ] = None,
    set_: SetOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Generate one mp4 per prompt (+ a JSON sidecar with prompt, seeds, config and timing)."""
    setup_logging(verbose)
    from astrolabe.build import build_generation_stack
    from astrolabe.sampling.generation import check_plans, generate_video, latent_frames_for_pixels, warn_tiny_text

    if (prompt is None) == (prompt_file is None):
        error("give exactly one of --prompt TEXT or --prompt-file FILE")
        raise typer.Exit(2)
    if prompt_file is not None:
        if not prompt_file.is_file():
            error(f"prompt file {prompt_file} does not exist")
            raise typer.Exit(2)
        prompts = [ln.strip() for ln in prompt_file.read_text().splitlines() if ln.strip()]
        if not prompts:
            error(f"prompt file {prompt_file} has no prompts (one per line)")
            raise typer.Exit(2)
    else:
        prompts = [prompt]
    cfg = load_cfg(config, set_)
    try:
        if checkpoint is not None:
            from flows.run import resolve_checkpoint

            checkpoint = resolve_checkpoint(checkpoint)
        stack, base = build_generation_stack(cfg, lora=checkpoint)
        stack.stream = dataclasses.replace(stack.stream, rope=cfg.sampling.rope)
        requested = latent_frames_for_pixels(num_frames, stack.stream.block_frames) if num_frames is not None else None
        # every line's full scene plan, before any compute
        plans = check_plans(prompts, stack.fps, stack.stream.block_frames, requested, base.latent_frames)
        if base.text_encoder_kind == "tiny":
            warn_tiny_text(plans)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        fail(e, 2)
    output_dir.mkdir(parents=True, exist_ok=True)
    with progress_bar() as progress:
        for i, plan in enumerate(plans):
            p, latent = plan.prompt, plan.num_latent_frames
            task = progress.add_task(f"video {i + 1}/{len(prompts)}", total=latent // stack.stream.block_frames)
            out = output_dir / f"{i:04d}.mp4"
            res = generate_video(
                stack,
                p,
                seed + i,
                latent,
                out,
                on_block=lambda done, total: progress.update(task, completed=done),
                num_pixel_frames=num_frames,
            )
            sidecar = {
                "prompt": p,
                "seed": res.seed,
                "video": out.name,
                "num_latent_frames": res.num_latent_frames,
                "num_pixel_frames": res.num_pixel_frames,
                "fps": stack.fps,
                "scenes": [seg.__dict__ for seg in res.segments],
                "seconds": round(res.seconds, 3),
                "checkpoint": str(checkpoint) if checkpoint else None,
                "config": config_to_dict(cfg),
                "host": platform.node(),
            }
            write_json(output_dir / f"{i:04d}.json", sidecar, indent=2, default=str)
    console.print(f"wrote {len(prompts)} video(s) to {output_dir}")


# ----------------------------------------------------------------------------------- pipeline


@contextmanager
def _ranks(device: str, engine: str) -> Iterator[bool]:
    """Join the torchrun ranks (if launched by torchrun) for the block; yields whether this is rank 0.

    Prefect does not fan out ranks (its task launches a stage as one torchrun job: ``resources``), so
    ``--engine prefect`` is refused under torchrun.
    """
    from astrolabe.distributed import DistContext, init_distributed, shutdown_distributed

    if engine == "prefect" and DistContext.from_env().is_distributed:
        raise ConfigError(
            "--engine prefect cannot run under torchrun (WORLD_SIZE > 1): the flow launches each heavy stage as a "
            "torchrun job itself. Run it without torchrun: `astrolabe train CONFIG --set resources.nproc_per_node=N` "
            "(or, bypassing Prefect, `torchrun ... -m flows.cli train CONFIG --engine local`)."
        )
    ctx = init_distributed(device)
    try:
        yield ctx.is_main
    finally:
        shutdown_distributed()


def _signals_as_interrupt():
    """:func:`flows.signals.signals_as_interrupt` with the console line that says how to resume."""
    import signal

    from flows.signals import signals_as_interrupt

    def say(signum: int) -> None:
        console.print(f"[yellow]stopped by {signal.Signals(signum).name}: rerun the same command to resume[/yellow]")

    return signals_as_interrupt(on_stop=say)


def _train_prefect(config: Path, sets: list[str], nodes, iterations: int) -> dict:
    """The train flow on a Prefect API: ``astrolabe up``'s server, or a temporary one tied to this process."""
    from flows import progress
    from flows.server import prefect_api

    with prefect_api() as api:
        from flows.train import train as train_flow  # imports prefect while the server starts

        api.wait()
        with progress.display(nodes, iterations, console):
            return train_flow(str(config), None, sets)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/tiny.yaml.")],
    run_name: Annotated[str | None, typer.Option("--run-name", help="Run name (default: the config's name).")] = None,
    set_: SetOpt = None,
    engine: EngineOpt = "prefect",
    verbose: VerboseOpt = 0,
) -> None:
    """Train: all iterations of prompt filtering, rollout, scoring, labelling, NFT update, evaluation (resumes).

    ``--set resources.nproc_per_node=N`` runs each heavy stage as an N-rank torchrun job launched by the flow
    (``resources.launcher=slurm``: srun + torchrun inside an allocation); deploy/README.md.
    """
    setup_logging(verbose)
    sets = list(set_ or []) + ([f"name={run_name}"] if run_name else [])
    cfg = load_cfg(config, sets)
    if engine not in ("prefect", "local"):
        error(f"--engine {engine!r}: use 'prefect' or 'local'")
        raise typer.Exit(2)
    with user_errors(), _signals_as_interrupt(), _ranks(cfg.model.device, engine) as is_main:
        from astrolabe.artifacts.plan import build_plan
        from astrolabe.distributed import DistContext
        from flows import progress
        from flows.preflight import preflight
        from flows.run import cached_summary, train_run

        from flows.server import use_persistent_mlflow

        use_persistent_mlflow()  # log into the store of `astrolabe up`'s MLflow UI, if one runs
        run_path, statuses = preflight(cfg)  # every input checked before a server or model starts
        done = None if DistContext.from_env().is_distributed else cached_summary(cfg, run_path, statuses)
        nodes = build_plan(cfg)
        if done is not None:
            summary = done.to_json()
        elif engine == "prefect":
            summary = _train_prefect(config, sets, nodes, cfg.pipeline.iterations)
        else:
            with progress.display(nodes, cfg.pipeline.iterations, console, enabled=is_main) as shown:
                summary = train_run(cfg, on_start=shown.start if shown else None,
                                    on_done=shown.done if shown else None).to_json()
    if is_main:
        print_summary(summary)


@app.command()
def stage(
    name: Annotated[str, typer.Argument(help="filter_prompts, rollout, score, label_uncertainty, nft_update, evaluate")],
    run: RunOpt,
    iteration: Annotated[int | None, typer.Option("--iteration", help="Iteration (per-iteration stages).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Recompute even if done; its dependents become stale.")] = False,
    runs_root: RootOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Run one stage of a run from its current inputs (upstream is never touched)."""
    setup_logging(verbose)
    from astrolabe.artifacts.plan import run_stage
    from flows.launch import recorded, stage_lock
    from flows.run import load_run_config, resolve_run_path
    from stages import STAGES

    with user_errors(), _signals_as_interrupt():
        run_path = resolve_run_path(run, runs_root)
        cfg = load_run_config(run_path)
        if name in STAGES and STAGES[name].STAGE.per_iteration and iteration is None:
            raise ConfigError(f"{name} runs per iteration: pass --iteration K")
        with _ranks(cfg.model.device, "local") as is_main, stage_lock(run_path):
            res = recorded(run_stage)(cfg, run_path, STAGES, name, iteration, force)  # torchrun: traceback to report
    if not is_main:
        return
    what = "cached" if res.cached else f"computed in {res.manifest.timings.get('total', 0.0):.1f}s"
    console.print(f"{res.node.label}: {what} -> {res.path}")
    if force:
        console.print("its dependents are now stale; `astrolabe train` recomputes them (see `astrolabe status`)")


@app.command()
def rescore(
    run: RunOpt,
    reward: Annotated[list[str], typer.Option("--reward", help="NAME or NAME=WEIGHT (repeatable).")],
    runs_root: RootOpt = None,
    engine: EngineOpt = "prefect",
    verbose: VerboseOpt = 0,
) -> None:
    """Score every stored rollout of a run with another reward set, without regenerating anything."""
    setup_logging(verbose)
    from astrolabe.distributed import DistContext

    with user_errors(), _signals_as_interrupt():
        if DistContext.from_env().is_distributed:
            raise ConfigError("rescore runs in one process (scoring is not split over ranks): launch it without torchrun")
        from flows.rescore import rescore_configs, rescore_run
        from flows.preflight import check_unlocked
        from flows.run import resolve_run_path

        from flows.server import use_persistent_mlflow

        use_persistent_mlflow()
        run_path = resolve_run_path(run, runs_root)
        rescore_configs(run_path, reward)  # reward names and options checked before a server starts
        check_unlocked(run_path)
        if engine == "prefect":
            from flows.server import prefect_api

            with prefect_api() as api:
                from flows.train import rescore as rescore_flow

                api.wait()
                out = rescore_flow(str(run_path), reward)
        else:
            out = {str(k): v for k, v in rescore_run(run_path, reward).items()}
    from rich.table import Table

    names = sorted({k for m in out.values() for k in m if k.endswith("/mean")})
    table = Table("iteration", *names)
    for it in sorted(out, key=int):
        table.add_row(str(it), *[f"{out[it].get(n, float('nan')):.4f}" for n in names])
    Console().print(table)


@app.command()
def status(
    run: Annotated[str, typer.Argument(help="Run directory or name.")],
    runs_root: RootOpt = None,
    quick: Annotated[bool, typer.Option("--quick", help="Check file sizes only, not checksums.")] = False,
) -> None:
    """Iterations x stages: done / damaged / stale / missing (fits 80 columns for any number of iterations)."""
    from rich.text import Text

    from astrolabe.artifacts.plan import plan_status
    from flows.run import load_run_config, resolve_run_path
    from flows.views import status_lines
    from stages import STAGES

    with user_errors():
        run_path = resolve_run_path(run, runs_root)
        cfg = load_run_config(run_path)
        statuses = plan_status(cfg, run_path, STAGES, check_sha=not quick)
    from flows.preflight import mark_killed_if_dead

    mark_killed_if_dead(cfg, run_path)  # a SIGKILLed run left RUNNING in MLflow becomes KILLED
    out = Console()
    for line in status_lines(statuses, f"{run_path.name}: {cfg.pipeline.iterations} iterations"):
        out.print(Text.assemble(*line), soft_wrap=True)


@app.command()
def verify(
    run: Annotated[str, typer.Argument(help="Run directory or name.")],
    runs_root: RootOpt = None,
) -> None:
    """Check every stage output of a run against its manifest (sizes and checksums).

    Exit 0 when all are complete and intact; otherwise 1, listing damaged / missing / stale outputs and the
    command that recomputes them.
    """
    from astrolabe.artifacts.plan import plan_status
    from flows.run import load_run_config, resolve_run_path
    from flows.views import verify_report
    from stages import STAGES

    with user_errors():
        run_path = resolve_run_path(run, runs_root)
        ok, lines = verify_report(plan_status(load_run_config(run_path), run_path, STAGES), run_path)
    for line in lines:
        console.print(escape(line), soft_wrap=True, style=None if ok else "red")
    if not ok:
        raise typer.Exit(1)


# commands defined in their own modules, listed after the pipeline commands
app.command("up")(up_cmd)
app.command("down")(down_cmd)
app.command()(compare)
app.command("report")(report_cmd)


def main() -> None:  # pragma: no cover
    """The ``astrolabe`` entry point: an unexpected error is one line too (``--debug`` shows the traceback)."""
    try:
        app(standalone_mode=True)
    except Exception as e:  # noqa: BLE001 - the last line of defence of the command line
        if OPTIONS["debug"] or "--debug" in sys.argv:
            raise
        error(f"{error_text(e)} (an unexpected error: rerun with --debug for the traceback and report it)")
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
