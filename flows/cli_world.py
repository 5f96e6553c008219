"""``astrolabe world ...``: the tiny procedural world and its pretrained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import JsonOpt, VerboseOpt, console, progress_bar, setup_logging, user_errors

world_app = typer.Typer(no_args_is_help=True, help="The tiny procedural world and its pretrained model.")


@world_app.command("build")
def world_build(
    root: Annotated[Path, typer.Option("--root", help="Cache root: the model lands in ROOT/world/<key>/.")] = Path("runs"),
    steps: Annotated[int | None, typer.Option("--steps", help="Override the recipe's training steps.")] = None,
    verbose: VerboseOpt = 0,
) -> None:
    """Pretrain the world model (DiT + text encoder) unless already built; prints its directory."""
    from astrolabe.world.pretrain import WorldModelRecipe, build_world_model, world_model_built

    setup_logging(verbose)
    recipe = WorldModelRecipe() if steps is None else WorldModelRecipe(steps=steps)
    if world_model_built(root, recipe):
        console.print("world model already built (cached)")
        typer.echo(str(build_world_model(root, recipe)))
        return
    with user_errors(), progress_bar() as progress:
        task = progress.add_task("world pretraining", total=recipe.steps)

        def advance(step: int, total: int, loss: float) -> None:
            progress.update(task, completed=step, description=f"world pretraining (loss {loss:.3f})")

        path = build_world_model(root, recipe, advance)
    typer.echo(str(path))


@world_app.command("probe")
def world_probe(
    root: Annotated[Path, typer.Option("--root", help="Cache root of the default recipe's build.")] = Path("runs"),
    directory: Annotated[
        Path | None, typer.Option("--dir", help="A build directory (ROOT/world/<key>); overrides --root.")
    ] = None,
    captions: Annotated[int, typer.Option("--captions", min=1, help="How many captions (the split's first).")] = 16,
    seeds: Annotated[int, typer.Option("--seeds", min=2, help="Generations per caption (a group's size).")] = 8,
    split: Annotated[str, typer.Option("--split", help="heldout or train captions.")] = "heldout",
    json_out: JsonOpt = None,
    verbose: VerboseOpt = 0,
) -> None:
    """How much a world model's samples of one caption differ in what world_alignment judges: what a group of
    one caption gives RL to rank (astrolabe.world.evaluate.caption_variety)."""
    from rich.table import Table

    from astrolabe.artifacts.atomic import write_json
    from astrolabe.world.evaluate import ATTRIBUTES, caption_variety
    from astrolabe.world.grammar import heldout_captions, train_captions
    from astrolabe.world.pretrain import load_world_model, world_model_dir

    setup_logging(verbose)
    if split not in ("heldout", "train"):
        raise typer.BadParameter(f"--split must be heldout or train, got {split!r}")
    with user_errors(), progress_bar() as progress:
        model = load_world_model(directory if directory is not None else world_model_dir(root))
        pool = heldout_captions() if split == "heldout" else train_captions()
        count = min(captions, len(pool))
        task = progress.add_task(f"sampling {count} {split} captions x {seeds} seeds", total=count * seeds)
        result = caption_variety(model, pool, count=count, seeds=seeds,
                                 progress=lambda done, total: progress.update(task, completed=done))  # fmt: skip
    table = Table("attribute", "right", "unanimous captions")
    for name in ATTRIBUTES:
        if f"right/{name}" in result:
            table.add_row(name, f"{result[f'right/{name}']:.2f}", f"{result[f'unanimous/{name}']:.2f}")
    console.print(table)
    console.print(
        f"world_alignment {result['alignment/mean']:.3f}: std within a caption {result['alignment/within_std']:.3f}, "
        f"between captions {result['alignment/between_std']:.3f} "
        f"(within share {result['alignment/within_share']:.2f}). "
        "A unanimous caption's groups agree on that attribute in every seed, so RL's group advantages cannot "
        "rank it: only the within-caption spread is something to learn from."
    )
    if json_out is not None:
        write_json(json_out, result)
