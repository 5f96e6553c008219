"""The ``astrolabe`` command line (typer). Thin: parses options, builds from config, shows progress.

It lives in ``flows/`` because it drives the pipeline (stages and Prefect flows); the library
``astrolabe/`` never imports it. Pipeline commands import Prefect only when they run a flow.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
import platform
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from astrolabe.artifacts.atomic import write_json
from astrolabe.config import ConfigError, config_to_dict, dump_config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Astrolabe: RL post-training of AR video models.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (ratios measured in one run).")
world_app = typer.Typer(no_args_is_help=True, help="The tiny procedural world and its pretrained model.")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
app.add_typer(world_app, name="world")
console = Console(stderr=True)

_OPTIONS = {"debug": False}  # global options (app callback)


@app.callback()
def _global_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show the full traceback of an error.")] = False,
) -> None:
    """Astrolabe: RL post-training of AR video models."""
    _OPTIONS["debug"] = debug


def _error(message: str) -> None:
    """Print ``message`` in red, verbatim: rich markup in it (``[abc]``, ``[#]`` of a scene prompt) is escaped."""
    console.print(f"[red]{escape(message)}[/red]")


VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="-v: progress details (INFO); -vv: everything, HTTP requests included.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: tiny CPU run).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set rl.nft.beta=0.2 (repeatable).")]


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr``, so log lines go above a live progress display (rich swaps it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "alembic", "prefect")  # their INFO lines only with -vv


def _setup_logging(verbose: int) -> None:
    """Warnings and errors only by default (progress is shown by the display); ``-v`` adds Astrolabe's INFO
    lines, ``-vv`` everything (HTTP requests included). Under torchrun every line names its rank."""
    from astrolabe.distributed import dist_rank_world

    rank, world = dist_rank_world()
    prefix = f"[rank {rank}] " if world > 1 else ""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter(f"%(levelname)s {prefix}%(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel({0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG))
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose >= 2 else logging.WARNING)


def _load(config: Path | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        _error(f"{e}")
        raise typer.Exit(2) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


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
    cfg = _load(preset or config, set_)
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
    _setup_logging(verbose)
    from astrolabe.build import build_generation_stack
    from astrolabe.sampling.generation import check_plans, generate_video, latent_frames_for_pixels, warn_tiny_text

    if (prompt is None) == (prompt_file is None):
        _error("give exactly one of --prompt TEXT or --prompt-file FILE")
        raise typer.Exit(2)
    if prompt_file is not None:
        if not prompt_file.is_file():
            _error(f"prompt file {prompt_file} does not exist")
            raise typer.Exit(2)
        prompts = [ln.strip() for ln in prompt_file.read_text().splitlines() if ln.strip()]
        if not prompts:
            _error(f"prompt file {prompt_file} has no prompts (one per line)")
            raise typer.Exit(2)
    else:
        prompts = [prompt]
    cfg = _load(config, set_)
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
        _fail(e, 2)
    output_dir.mkdir(parents=True, exist_ok=True)
    with _progress() as progress:
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

EngineOpt = Annotated[
    str, typer.Option("--engine", help="'prefect' (flows, local temporary server unless PREFECT_API_URL) or 'local'.")
]
RunOpt = Annotated[str, typer.Option(
    "--run", "--run-dir", help="Run directory, or run name under runs/ (under torchrun write --run-dir: torchrun "
    "would take --run for its own --run-path).")]
RootOpt = Annotated[Path | None, typer.Option("--runs-root", help="Where run names are looked up (default runs/).")]
_USER_ERRORS = (ValueError, KeyError, FileNotFoundError, RuntimeError, OSError)


def error_text(e: BaseException) -> str:
    """``<type>: <message>`` of an error the CLI explains; a storage failure (disk full, read-only, no
    permission) anywhere in its chain becomes its one-line explanation."""
    from astrolabe.artifacts.atomic import StorageError, storage_error

    se = storage_error(e)
    if se is not None:
        return str(se) if isinstance(e, StorageError) or se.context else f"{type(e).__name__}: {se}"
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return f"{type(e).__name__}: {msg}"


def _fail(e: BaseException, code: int = 1) -> None:
    if _OPTIONS["debug"]:
        raise e
    _error(error_text(e))
    raise typer.Exit(code) from None


@contextmanager
def _user_errors() -> Iterator[None]:
    """Known failures become one red line and an exit code: 3 run locked, 2 bad config/input, 1 stage error
    (``--debug`` raises them with their traceback instead)."""
    from astrolabe.artifacts.lock import RunLockedError

    try:
        yield
    except typer.Exit:  # a RuntimeError too: an exit already decided is no error to explain
        raise
    except RunLockedError as e:
        _fail(e, 3)
    except ConfigError as e:
        _fail(e, 2)
    except _USER_ERRORS as e:
        _fail(e)


@contextmanager
def _ranks(device: str, engine: str) -> Iterator[bool]:
    """Join the torchrun ranks (if launched by torchrun) for the block; yields whether this is rank 0.

    Prefect does not fan out ranks (it launches a torchrun job as one task), so ``--engine prefect`` is
    refused under torchrun.
    """
    from astrolabe.distributed import DistContext, init_distributed, shutdown_distributed

    if engine == "prefect" and DistContext.from_env().is_distributed:
        raise ConfigError(
            "--engine prefect cannot run under torchrun (WORLD_SIZE > 1): Prefect launches a torchrun job as one "
            "task and does not fan out ranks. Use `torchrun ... -m flows.cli train CONFIG --engine local`."
        )
    ctx = init_distributed(device)
    try:
        yield ctx.is_main
    finally:
        shutdown_distributed()


@contextmanager
def _signals_as_interrupt() -> Iterator[None]:
    """SIGTERM (like SIGINT) raises KeyboardInterrupt in the block, so every cleanup runs (the MLflow run is
    marked KILLED, the temporary Prefect server stopped); then this process dies of that signal (143 / 130)."""
    import signal

    received: list[int] = []

    def handler(signum, frame) -> None:
        from flows.run import SIGNALS_RECEIVED

        received.append(signum)
        SIGNALS_RECEIVED.append(signum)  # the MLflow run ends KILLED whatever exception the interrupt becomes
        raise KeyboardInterrupt(signal.Signals(signum).name)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    except KeyboardInterrupt:
        signum = received[0] if received else signal.SIGINT
        console.print(f"[yellow]stopped by {signal.Signals(signum).name}: rerun the same command to resume[/yellow]")
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
        raise typer.Exit(128 + signum) from None  # not reached: the default action ends the process
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _train_prefect(config: Path, sets: list[str], nodes, iterations: int) -> dict:
    """The train flow on a Prefect API: ``astrolabe up``'s server, or a temporary one tied to this process."""
    from flows import progress
    from flows.server import prefect_api

    with prefect_api() as api:
        from flows.train import train as train_flow  # imports prefect while the server starts

        api.wait()
        with progress.display(nodes, iterations, console):
            return train_flow(str(config), None, sets)


def _print_summary(summary: dict) -> None:
    from rich.table import Table

    from flows.run import stage_times

    console.print(f"run {summary['run_path']}: {summary['wall_seconds']:.1f}s wall, "
                  f"{summary['computed_nodes']} stages computed, {summary['cached_nodes']} cached")
    if summary["stage_seconds"]:
        console.print("stage time: " + stage_times(summary["stage_seconds"]))
        if summary.get("overhead_fraction") is not None:
            console.print(f"overhead (Prefect + MLflow + bookkeeping) / stage compute: {summary['overhead_fraction']:.1%}")
    evals = summary.get("eval") or {}
    if evals:
        margins = summary.get("eval_margin_std") or {}
        deltas = summary.get("eval_delta") or {}
        names = sorted({k for m in evals.values() for k in m if k.endswith("/mean")})
        videos = min((m["n"] for m in evals.values() if "n" in m), default=None)
        caption = ("(change since the first eval, in units of its std)" if any(margins.values()) else
                   "(absolute change since the first eval"
                   + ("" if videos is None else f"; {videos:.0f} videos per eval, too few for std units") + ")")
        table = Table("eval iteration", *names, caption=caption)
        for it in sorted(evals, key=int):
            table.add_row(str(it), *[_eval_cell(evals[it].get(n), margins.get(it, {}).get(n[: -len("/mean")]),
                                                deltas.get(it, {}).get(n[: -len("/mean")])) for n in names])
        Console().print(table)
    _print_locations(summary.get("locations") or {})


def _short(path: str) -> str:
    """``path`` relative to the working directory when it is under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return path


def _print_locations(locations: dict[str, str]) -> None:
    """Where the results are, and how to open the MLflow UI."""
    from flows.server import prefect_home, read_up_state

    if not locations:
        return
    width = max(len(k) for k in locations)
    for what, where in locations.items():
        console.print(f"  {what:<{width}}  {where if '://' in where else _short(where)}", markup=False,
                      highlight=False, soft_wrap=True)
    ui = ((read_up_state(prefect_home()) or {}).get("mlflow") or {}).get("url")
    if ui:
        console.print(f"MLflow UI: {ui}", highlight=False)
    elif "mlflow store" in locations:
        console.print("MLflow UI: `astrolabe up` (needs the ui extra: pip install -e '.[ui]'), or "
                      f"`mlflow ui --backend-store-uri {locations['mlflow store']}`", markup=False, highlight=False,
                      soft_wrap=True)


def _eval_cell(mean: float | None, margin: float | None, delta: float | None = None) -> str:
    """``0.7906 (+1.81 sd)`` with a margin, ``0.7906 (+0.0123)`` with an absolute change; ``-`` when missing."""
    if mean is None:
        return "-"
    if margin is not None:
        return f"{mean:.4f} ({margin:+.2f} sd)"
    return f"{mean:.4f}" if delta is None else f"{mean:.4f} ({delta:+.4f})"


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config, e.g. configs/tiny.yaml.")],
    run_name: Annotated[str | None, typer.Option("--run-name", help="Run name (default: the config's name).")] = None,
    set_: SetOpt = None,
    engine: EngineOpt = "prefect",
    verbose: VerboseOpt = 0,
) -> None:
    """Train: all iterations of prompt filtering, rollout, scoring, labelling, NFT update, evaluation (resumes).

    Under torchrun (``torchrun --nproc_per_node=N -m flows.cli train CONFIG --engine local``) the rollout is
    split over the ranks; rank 0 runs the other stages, holds the run lock and logs (deploy/README.md).
    """
    _setup_logging(verbose)
    sets = list(set_ or []) + ([f"name={run_name}"] if run_name else [])
    cfg = _load(config, sets)
    if engine not in ("prefect", "local"):
        _error(f"--engine {engine!r}: use 'prefect' or 'local'")
        raise typer.Exit(2)
    with _user_errors(), _signals_as_interrupt(), _ranks(cfg.model.device, engine) as is_main:
        from astrolabe.artifacts.plan import build_plan
        from astrolabe.distributed import DistContext
        from flows import progress
        from flows.run import cached_summary, preflight, train_run

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
        _print_summary(summary)


@world_app.command("build")
def world_build(
    root: Annotated[Path, typer.Option("--root", help="Cache root: the model lands in ROOT/world/<key>/.")] = Path("runs"),
    steps: Annotated[int | None, typer.Option("--steps", help="Override the recipe's training steps.")] = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Pretrain the world model (DiT + text encoder) unless already built; prints its directory."""
    from astrolabe.world.pretrain import WorldModelRecipe, build_world_model, world_model_built

    _setup_logging(verbose)
    recipe = WorldModelRecipe() if steps is None else WorldModelRecipe(steps=steps)
    if world_model_built(root, recipe):
        console.print("world model already built (cached)")
        typer.echo(str(build_world_model(root, recipe)))
        return
    with _user_errors(), _progress() as progress:
        task = progress.add_task("world pretraining", total=recipe.steps)

        def advance(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, description=f"world pretraining (loss {loss:.3f})")

        path = build_world_model(root, recipe, advance)
    typer.echo(str(path))


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
    _setup_logging(verbose)
    from astrolabe.distributed import rank0_run_lock
    from astrolabe.artifacts.plan import run_stage
    from flows.run import load_run_config, resolve_run_path
    from stages import STAGES

    with _user_errors():
        run_path = resolve_run_path(run, runs_root)
        cfg = load_run_config(run_path)
        if name in STAGES and STAGES[name].STAGE.per_iteration and iteration is None:
            raise ConfigError(f"{name} runs per iteration: pass --iteration K")
        with _ranks(cfg.model.device, "local") as is_main, rank0_run_lock(run_path):
            res = run_stage(cfg, run_path, STAGES, name, iteration, force)
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
    _setup_logging(verbose)
    from astrolabe.distributed import DistContext

    with _user_errors(), _signals_as_interrupt():
        if DistContext.from_env().is_distributed:
            raise ConfigError("rescore runs in one process (scoring is not split over ranks): launch it without torchrun")
        from flows.run import check_unlocked, rescore_configs, rescore_run, resolve_run_path

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

    with _user_errors():
        run_path = resolve_run_path(run, runs_root)
        cfg = load_run_config(run_path)
        statuses = plan_status(cfg, run_path, STAGES, check_sha=not quick)
    from flows.run import mark_killed_if_dead

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

    with _user_errors():
        run_path = resolve_run_path(run, runs_root)
        ok, lines = verify_report(plan_status(load_run_config(run_path), run_path, STAGES), run_path)
    for line in lines:
        console.print(escape(line), soft_wrap=True, style=None if ok else "red")
    if not ok:
        raise typer.Exit(1)


def _default_store() -> str:
    """``$MLFLOW_TRACKING_URI``, else ``runs/mlflow.db`` (absolute)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///" + str(Path("runs/mlflow.db").resolve())


@app.command("up")
def up_cmd(
    prefect_port: Annotated[int | None, typer.Option("--prefect-port", help="Default: a free port.")] = None,
    mlflow_port: Annotated[int | None, typer.Option("--mlflow-port", help="Default: a free port.")] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="The MLflow store the UI shows (default: "
                                                     "$MLFLOW_TRACKING_URI or sqlite:///runs/mlflow.db).")] = None,
) -> None:
    """Start a persistent local Prefect server and MLflow UI on 127.0.0.1; later commands use them."""
    from flows.server import ServerStartError, mlflow_server_available, prefect_home, up

    store = tracking_uri or _default_store()
    if not mlflow_server_available():
        console.print("the MLflow UI needs the full mlflow package (pip install -e '.[ui]'): starting Prefect only",
                      style="yellow", markup=False, soft_wrap=True)
    try:
        state = up(prefect_home(), store, prefect_port, mlflow_port)
    except ServerStartError as e:
        _fail(e)
    lines = [f"Prefect UI: {state['prefect']['url']}  (API {state['prefect']['api_url']})"]
    if state.get("mlflow"):
        lines.append(f"MLflow UI:  {state['mlflow']['url']}  (store {state['mlflow']['store']})")
    lines.append("train, rescore and compare now use them; `astrolabe down` stops them")
    for line in lines:
        console.print(line, markup=False, highlight=False, soft_wrap=True)


@app.command("down")
def down_cmd() -> None:
    """Stop the servers started by `astrolabe up` (nothing else)."""
    from flows.server import down, prefect_home

    stopped = down(prefect_home())
    console.print("stopped " + ", ".join(stopped) if stopped else "no server of `astrolabe up` was running",
                  highlight=False, soft_wrap=True)


@app.command()
def compare(
    runs: Annotated[list[str] | None, typer.Argument(help="Run names (default: all runs of the experiment).")] = None,
    tracking_uri: Annotated[str | None, typer.Option("--tracking-uri", help="Default: $MLFLOW_TRACKING_URI or "
                                                     "sqlite:///runs/mlflow.db")] = None,
    experiment: str = "astrolabe",
    metric: Annotated[list[str] | None, typer.Option("--metric", help="Metrics to show (default: eval means).")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="Also draw the runs' curves of these metrics into "
                                              "one PNG.")] = None,
) -> None:
    """A table of runs from MLflow: status, and the last value of each chosen metric (creates nothing)."""
    from rich.table import Table

    from astrolabe.tracking import compare_runs, metric_histories, missing_store, plot_runs

    from flows.server import use_persistent_mlflow

    use_persistent_mlflow()
    uri = tracking_uri or _default_store()
    with _user_errors():
        if (absent := missing_store(uri)) is not None:
            _error(f"no MLflow store at {absent}: train a run first, or pass --tracking-uri")
            raise typer.Exit(1)
        rows = compare_runs(runs or None, uri, experiment)
        if not rows:
            console.print(escape(f"no runs in experiment {experiment!r} at {uri}"))
            raise typer.Exit(1)
        names = metric or sorted({k for r in rows for k in r["metrics"] if k.startswith("eval/") and k.endswith("/mean")})
        table = Table("run", "status", "started", *names)
        for r in rows:
            table.add_row(escape(r["run_name"]), r["status"], r["start_time"],
                          *[f"{r['metrics'][n]:.4f}" if n in r["metrics"] else "-" for n in names])
        Console().print(table)
        if plot is not None:
            ids = {f"{r['run_name']} ({r['run_id'][:6]})": r["run_id"] for r in rows}
            plot_runs(metric_histories(ids, names, uri), plot, title=f"{experiment}: {len(rows)} runs")
            console.print(escape(f"wrote {plot}"))


def _bench_output(result: dict, table, json_out: Path | None) -> None:
    Console().print(table)
    if json_out is not None:
        write_json(json_out, result, indent=2, default=str)


JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the raw results as JSON.")]
GpuOpt = Annotated[bool, typer.Option("--gpu", help="Wan 1.3B, random weights, bf16 at 480x832 (needs CUDA).")]


@bench_app.command("rollout")
def bench_rollout(gpu: GpuOpt = False, json_out: JsonOpt = None) -> None:
    """Streaming rollout: memory and time per block as the video grows; KV cache and fork speed-ups."""
    from astrolabe.bench import rollout

    result = rollout.run_gpu() if gpu else rollout.run()
    _bench_output(result, rollout.format_table(result), json_out)


@bench_app.command("update")
def bench_update(
    gpu: GpuOpt = False,
    json_out: JsonOpt = None,
    world_size: Annotated[int | None, typer.Option(
        "--world-size", help="Instead: data-parallel scaling, samples/s at world size 1 and N (N spawned ranks).")] = None,
) -> None:
    """Clip-window update vs whole-sequence update as the prefix grows (or, with --world-size, DDP scaling)."""
    from astrolabe.bench import update

    if world_size is not None:
        setup = update.GPU_SETUP if gpu else update.StreamSetup(latent_hw=(4, 4), window=6)
        result = update.run_scaling(world_size, setup=setup)
        _bench_output(result, update.format_scaling_table(result), json_out)
        return
    result = update.run_gpu() if gpu else update.run()
    _bench_output(result, update.format_table(result), json_out)


@bench_app.command("gpu")
def bench_gpu(
    json_out: Annotated[Path, typer.Option("--json", help="Where the results JSON goes.")] = Path("bench-gpu.json"),
    tiny: Annotated[bool, typer.Option("--tiny", help="Tiny sizes on CPU (automatic without CUDA).")] = False,
    attention_backend: Annotated[str, typer.Option("--attention-backend", help="auto | sdpa | flash")] = "auto",
    compile_blocks: Annotated[bool, typer.Option("--compile", help="torch.compile every DiT block.")] = False,
    budget_s: Annotated[float | None, typer.Option("--budget-s", help="Skip sections starting later.")] = None,
    verbose: VerboseOpt = 0,
) -> None:
    """One CUDA device, one JSON: 1.3B 480x832 4-step rollout fps (denoise only and with streamed VAE decode)
    and peak memory at 240 latent frames (window 12 + sink 3), a LoRA-256 clip-window vs whole-clip update
    step, and the 14B rollout if memory allows. About 5 minutes on one H200."""
    _setup_logging(verbose)
    from astrolabe.bench import gpu

    if attention_backend not in ("auto", "sdpa", "flash"):
        _error(f"--attention-backend must be auto, sdpa or flash, got {attention_backend!r}")
        raise typer.Exit(2)
    if not tiny and not torch_cuda_available():
        console.print("[yellow]no CUDA device: running the tiny CPU variant (--tiny)[/yellow]")
        tiny = True
    overrides = {"attention_backend": attention_backend, "compile_blocks": compile_blocks}
    if budget_s is not None:
        overrides["budget_s"] = budget_s
    plan = gpu.tiny_plan(**overrides) if tiny else gpu.gpu_plan(**overrides)
    with _user_errors():
        result = gpu.run(plan)
    _bench_output(result, gpu.format_table(result), json_out)
    console.print(f"wrote {json_out}")


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


@bench_app.command("rewards")
def bench_rewards(
    num_videos: int = 32, frames: int = 16, size: int = 64, json_out: JsonOpt = None
) -> None:
    """Videos/s of each weight-free reward at the tiny default's video size."""
    from rich.table import Table

    from astrolabe.bench.rewards import benchmark_signal_rewards

    result = benchmark_signal_rewards(num_videos=num_videos, frames=frames, height=size, width=size)
    table = Table("reward", "videos/s")
    for name, v in result.items():
        table.add_row(name, f"{v:.1f}")
    _bench_output(result, table, json_out)


def main() -> None:  # pragma: no cover
    """The ``astrolabe`` entry point: an unexpected error is one line too (``--debug`` shows the traceback)."""
    try:
        app(standalone_mode=True)
    except Exception as e:  # noqa: BLE001 - the last line of defence of the command line
        if _OPTIONS["debug"] or "--debug" in sys.argv:
            raise
        _error(f"{error_text(e)} (an unexpected error: rerun with --debug for the traceback and report it)")
        sys.exit(1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
