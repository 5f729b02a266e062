"""The ``mmx`` command line: it parses arguments, looks the recipe up and prints; the library only logs.

``mmx train | sample | eval | attend | demo`` serve runs through their recipe (:mod:`mmx.cli.runs`);
``mmx info | encode | convert | bench`` are the tools beside them (:mod:`mmx.cli.tools`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import typer
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(
    name="mmx",
    help="mmx: multimodal conditioning with cross-attention.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()


def _version_callback(value: bool) -> None:
    if value:
        from mmx import __version__

        console.print(f"mmx {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show debug logging."),
    version: bool | None = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Set up logging for every command."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=Console(stderr=True), show_path=False, show_time=False)],
        force=True,
    )
    for noisy in ("accelerate", "matplotlib", "PIL"):  # their INFO lines are not for users
        logging.getLogger(noisy).setLevel(logging.WARNING)


# What a user can get wrong (a path, a value, a file): each is printed as one line and exit code 2.
USER_ERRORS = (ValueError, KeyError, TypeError, OSError, ImportError, RuntimeError)


def fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


def message(err: BaseException) -> str:
    return err.args[0] if isinstance(err, KeyError) and err.args else str(err)


COUNT_MAX = 100_000  # --num, --steps, --beam: anything larger is a typo, not a request
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


def in_range(low: int, high: int) -> Callable[[int | None], int | None]:
    """typer callback factory: an int option must lie in ``low .. high``; the error names the value."""

    def check(value: int | None) -> int | None:
        if value is not None and not low <= value <= high:
            raise typer.BadParameter(f"{value} is not in the range {low} .. {high}")
        return value

    return check


def finite(value: float | None) -> float | None:
    """typer callback: a float option (e.g. --guidance) must be a finite number, not nan or inf."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def make_dir(path: Path) -> Path:
    """Create an output folder (and parents); an error names the folder instead of a traceback."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"cannot create the output folder {path}: {err.strerror or err}")
    return path


def main() -> None:
    """Console-script entry point."""
    app()


from mmx.cli import runs, tools  # noqa: E402,F401  (each registers its commands on `app`)
