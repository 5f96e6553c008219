"""What every ``astrolabe`` command shares: the console, option types, logging set-up and how errors become
one red line and an exit code."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from astrolabe.config import ConfigError, load_config

console = Console(stderr=True)

OPTIONS = {"debug": False}  # global options (the app callback sets them)


def error(message: str) -> None:
    """Print ``message`` in red, verbatim: rich markup in it (``[abc]``, ``[#]`` of a scene prompt) is escaped."""
    console.print(f"[red]{escape(message)}[/red]")


VerboseOpt = Annotated[int, typer.Option("--verbose", "-v", count=True,
                                         help="-v: progress details (INFO); -vv: everything, HTTP requests included.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="YAML config (default: tiny CPU run).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override, e.g. --set rl.nft.beta=0.2 (repeatable).")]
EngineOpt = Annotated[
    str, typer.Option("--engine", help="'prefect' (flows, local temporary server unless PREFECT_API_URL) or 'local'.")
]
RunOpt = Annotated[str, typer.Option(
    "--run", "--run-dir", help="Run directory, or run name under runs/ (under torchrun write --run-dir: torchrun "
    "would take --run for its own --run-path).")]
RootOpt = Annotated[Path | None, typer.Option("--runs-root", help="Where run names are looked up (default runs/).")]
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, RuntimeError, OSError)

JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the raw results as JSON.")]


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* ``sys.stderr``, so log lines go above a live progress display (rich swaps it)."""

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


QUIET_LOGGERS = ("httpx", "httpcore", "urllib3", "alembic", "prefect")  # their INFO lines only with -vv


def setup_logging(verbose: int) -> None:
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


def load_cfg(config: Path | None, overrides: list[str] | None):
    try:
        return load_config(config, overrides or [])
    except ConfigError as e:
        error(f"{e}")
        raise typer.Exit(2) from None


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console
    )


def error_text(e: BaseException) -> str:
    """``<type>: <message>`` of an error the CLI explains; a storage failure (disk full, read-only, no
    permission) anywhere in its chain becomes its one-line explanation."""
    from astrolabe.artifacts.atomic import StorageError, storage_error

    se = storage_error(e)
    if se is not None:
        return str(se) if isinstance(e, StorageError) or se.context else f"{type(e).__name__}: {se}"
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return f"{type(e).__name__}: {msg}"


def fail(e: BaseException, code: int = 1) -> None:
    if OPTIONS["debug"]:
        raise e
    error(error_text(e))
    raise typer.Exit(code) from None


@contextmanager
def user_errors() -> Iterator[None]:
    """Known failures become one red line and an exit code: 3 run locked, 2 bad config/input, 1 stage error
    (``--debug`` raises them with their traceback instead)."""
    from astrolabe.artifacts.lock import RunLockedError

    try:
        yield
    except typer.Exit:  # a RuntimeError too: an exit already decided is no error to explain
        raise
    except RunLockedError as e:
        fail(e, 3)
    except ConfigError as e:
        fail(e, 2)
    except USER_ERRORS as e:
        fail(e)
