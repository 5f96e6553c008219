"""``astrolabe world ...``: the tiny procedural world and its pretrained model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from flows.cli_common import VerboseOpt, console, progress_bar, setup_logging, user_errors

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
