"""``astrolabe bench ...``: benchmarks that report ratios measured in one run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from astrolabe.artifacts.atomic import write_json
from flows.cli_common import JsonOpt, RootOpt, VerboseOpt, console, error, progress_bar, setup_logging, user_errors

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks (ratios measured in one run).")


def _bench_output(result: dict, table, json_out: Path | None) -> None:
    Console().print(table)
    if json_out is not None:
        write_json(json_out, result, indent=2, default=str)


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
    setup_logging(verbose)
    from astrolabe.bench import gpu

    if attention_backend not in ("auto", "sdpa", "flash"):
        error(f"--attention-backend must be auto, sdpa or flash, got {attention_backend!r}")
        raise typer.Exit(2)
    if not tiny and not torch_cuda_available():
        console.print("[yellow]no CUDA device: running the tiny CPU variant (--tiny)[/yellow]")
        tiny = True
    overrides = {"attention_backend": attention_backend, "compile_blocks": compile_blocks}
    if budget_s is not None:
        overrides["budget_s"] = budget_s
    plan = gpu.tiny_plan(**overrides) if tiny else gpu.gpu_plan(**overrides)
    with user_errors():
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


def _spread_cell(s: dict[str, float], fmt: str = "{:+.4f}") -> str:
    return f"{fmt.format(s['mean'])} [{fmt.format(s['min'])}..{fmt.format(s['max'])}]"


@bench_app.command("algorithms")
def bench_algorithms(
    seeds: Annotated[list[int] | None, typer.Option("--seed", help="Seeds (repeatable; default 0 1 2).")] = None,
    iterations: Annotated[int, typer.Option("--iterations", help="Iterations per run (evaluated at 0 and at the "
                                            "end).")] = 4,
    runs_root: Annotated[Path | None, typer.Option(
        "--runs-root", help="Where the runs go (resumed when there; default runs/algorithms, with --world "
        "runs/algorithms-world).")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override for every run (repeatable).")] = None,
    world: Annotated[bool, typer.Option("--world", help="On the tiny world (configs/tiny-world.yaml and "
                                        "configs/tiny-world-arcopo.yaml) instead of the tiny default.")] = False,
    json_out: JsonOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """NFT vs AR-CoPO vs AR-CoPO + merge on the tiny default (or the tiny world), same prompts, rewards and
    iterations, over seeds: eval reward gains (mean, min..max over seeds), wall time and peak memory per method."""
    from rich.table import Table

    from flows.algorithms import METHODS, WORLD_METHODS, compare_methods, summarize_methods

    setup_logging(verbose)
    overrides = [f"pipeline.iterations={iterations}", f"pipeline.eval_every={iterations}", *(set_ or [])]
    with user_errors():
        root = runs_root or Path("runs/algorithms-world" if world else "runs/algorithms")
        runs = compare_methods(seeds or [0, 1, 2], root, overrides, WORLD_METHODS if world else METHODS,
                               on_run=lambda r: console.print(f"{r.method} seed {r.seed}: {r.wall_s:.0f} s"))
    summary = summarize_methods(runs)
    gains = sorted({k for row in summary.values() for k in row if k.startswith("gain/")})
    table = Table("method", "seeds", *[g[len("gain/eval/"):] if g.startswith("gain/eval/") else g for g in gains],
                  "wall s", "peak RSS MiB", "merge s", caption=f"eval change from iteration 0 to {iterations}: "
                  "mean \\[min..max] over seeds")  # \\[: a literal bracket in rich markup
    for name, row in summary.items():
        table.add_row(name, " ".join(map(str, row["seeds"])), *[_spread_cell(row[g]) for g in gains],
                      _spread_cell(row["wall_s"], "{:.0f}"), _spread_cell(row["peak_rss_mib"], "{:.0f}"),
                      " ".join(f"{s:g}" for s in row.get("merge_scales", [])) or "-")
    result = {"summary": summary, "runs": [{**r.__dict__, "run_path": str(r.run_path)} for r in runs]}
    _bench_output(result, table, json_out)


@bench_app.command("noise")
def bench_noise(
    run: Annotated[str, typer.Argument(help="Run directory or name (a finished iteration of an NFT run).")],
    runs_root: RootOpt = None,
    iteration: Annotated[int, typer.Option("--iteration", help="Which iteration's rollout and labels.")] = 0,
    draws: Annotated[int, typer.Option("--draws", help="Independent noise draws per setting (>= 2).")] = 4,
    json_out: JsonOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Agreement of the update's gradients across noise draws: one eps per sample vs one per group."""
    from rich.table import Table

    from flows.gradient_agreement import NOISE_MODES, gradient_agreement
    from flows.run import resolve_run_path

    setup_logging(verbose)
    with user_errors(), progress_bar() as progress:
        path = resolve_run_path(run, runs_root)
        tasks = {m: progress.add_task(f"gradients, rl.update.noise_per={m}", total=draws) for m in NOISE_MODES}
        result = gradient_agreement(path, iteration, draws,
                                    lambda mode, done, _: progress.update(tasks[mode], completed=done))  # fmt: skip
    table = Table("rl.update.noise_per", "micro_batch_size", "agreement (mean cos)", "grad norm")
    for mode in NOISE_MODES:
        r = result[mode]
        table.add_row(mode, str(r["micro_batch_size"]), f"{r['agreement']:.3f}", f"{r['grad_norm']:.3g}")
    _bench_output(result, table, json_out)
    ratio = result["agreement_ratio"]
    console.print(f"agreement ratio (shared / per sample): {ratio:.2f}" if ratio == ratio else
                  "agreement ratio: n/a (the per-sample gradients do not agree at all: they are noise)")  # fmt: skip
