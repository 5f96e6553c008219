"""The ``astrolabe`` command line (typer). Thin: parses options, builds from config, shows progress."""

from __future__ import annotations

import json
import logging
import platform
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from astrolabe.config import ConfigError, config_to_dict, dump_config, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Astrolabe: RL post-training of AR video models.")
config_app = typer.Typer(no_args_is_help=True, help="Inspect configs.")
bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (ratios measured in one run).")
app.add_typer(config_app, name="config")
app.add_typer(bench_app, name="bench")
console = Console(stderr=True)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: tiny CPU run).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set rl.nft.beta=0.2 (repeatable).")]


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")


def _load(config: Path | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the resolved config as YAML (every key and its value)."""
    cfg = _load(config, set_)
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
        Path | None, typer.Option("--checkpoint", help="PEFT LoRA dir, or a checkpoint dir containing lora/.")
    ] = None,
    set_: SetOpt = None,
    verbose: bool = False,
) -> None:
    """Generate one mp4 per prompt (+ a JSON sidecar with prompt, seeds, config and timing)."""
    _setup_logging(verbose)
    from astrolabe.generate import generate_video, latent_frames_for_pixels
    from astrolabe.models.factory import build_generation_stack

    if (prompt is None) == (prompt_file is None):
        console.print("[red]give exactly one of --prompt TEXT or --prompt-file FILE[/red]")
        raise typer.Exit(2)
    if prompt_file is not None:
        if not prompt_file.is_file():
            console.print(f"[red]prompt file {prompt_file} does not exist[/red]")
            raise typer.Exit(2)
        prompts = [ln.strip() for ln in prompt_file.read_text().splitlines() if ln.strip()]
        if not prompts:
            console.print(f"[red]prompt file {prompt_file} has no prompts (one per line)[/red]")
            raise typer.Exit(2)
    else:
        prompts = [prompt]
    cfg = _load(config, set_)
    try:
        stack, base = build_generation_stack(cfg, lora=checkpoint)
        latent = (
            latent_frames_for_pixels(num_frames, stack.spec.block_frames)
            if num_frames is not None
            else base.latent_frames
        )
        from astrolabe.sampling.scenes import parse_scene_prompt

        for p in prompts:
            parse_scene_prompt(p)  # fail before any compute on a malformed line
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        console.print(f"[red]{e}[/red]")
        raise typer.Exit(2) from None
    output_dir.mkdir(parents=True, exist_ok=True)
    with _progress() as progress:
        for i, p in enumerate(prompts):
            task = progress.add_task(f"video {i + 1}/{len(prompts)}", total=latent // stack.spec.block_frames)
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
            (output_dir / f"{i:04d}.json").write_text(json.dumps(sidecar, indent=2, default=str))
    console.print(f"wrote {len(prompts)} video(s) to {output_dir}")


def _bench_output(result: dict, table, json_out: Path | None) -> None:
    Console().print(table)
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2, default=str))


JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the raw results as JSON.")]
GpuOpt = Annotated[bool, typer.Option("--gpu", help="Wan 1.3B, random weights, bf16 at 480x832 (needs CUDA).")]


@bench_app.command("rollout")
def bench_rollout(gpu: GpuOpt = False, json_out: JsonOpt = None) -> None:
    """Streaming rollout: memory and time per block as the video grows; KV cache and fork speed-ups."""
    from astrolabe.bench import rollout

    result = rollout.run_gpu() if gpu else rollout.run()
    _bench_output(result, rollout.format_table(result), json_out)


@bench_app.command("update")
def bench_update(gpu: GpuOpt = False, json_out: JsonOpt = None) -> None:
    """Clip-window update vs whole-sequence update as the prefix grows."""
    from astrolabe.bench import update

    result = update.run_gpu() if gpu else update.run()
    _bench_output(result, update.format_table(result), json_out)


@bench_app.command("rewards")
def bench_rewards(
    num_videos: int = 32, frames: int = 16, size: int = 64, json_out: JsonOpt = None
) -> None:
    """Videos/s of each weight-free reward at the tiny default's video size."""
    from rich.table import Table

    from astrolabe.rewards.bench import benchmark_signal_rewards

    result = benchmark_signal_rewards(num_videos=num_videos, frames=frames, height=size, width=size)
    table = Table("reward", "videos/s")
    for name, v in result.items():
        table.add_row(name, f"{v:.1f}")
    _bench_output(result, table, json_out)


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
