"""The ``mmx`` command line. It decides what the user sees; the library only logs."""

from __future__ import annotations

import logging
import platform
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

app = typer.Typer(
    name="mmx",
    help="mmx: multimodal conditioning with cross-attention (train, sample, attend, eval, bench, demo).",
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
    version: Optional[bool] = typer.Option(
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


@app.command()
def info() -> None:
    """Print versions, the compute device and the registered encoders."""
    import importlib.metadata as md

    import torch

    import mmx
    from mmx.encoders import ENCODERS

    table = Table(title="mmx environment", show_header=False)
    table.add_row("mmx", mmx.__version__)
    table.add_row("python", platform.python_version())
    for package in ("torch", "torchvision", "open_clip_torch", "diffusers", "accelerate", "transformers"):
        try:
            table.add_row(package, md.version(package))
        except md.PackageNotFoundError:
            table.add_row(package, "[red]not installed[/red]")
    if torch.cuda.is_available():
        device = f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    table.add_row("device", device)
    table.add_row("encoders", ", ".join(ENCODERS.names()))
    console.print(table)


def _encoder_spec(config: Optional[Path], encoder: str, model: Optional[str], pretrained: Optional[str]) -> dict:
    """An encoder spec from a YAML file, or from the command-line options."""
    if config is not None:
        import yaml

        if not config.is_file():
            raise ValueError(f"config file not found: {config}")
        spec = yaml.safe_load(config.read_text())
        if not isinstance(spec, dict):
            raise ValueError(f"{config} must hold a mapping with a 'name' key; got {type(spec).__name__}")
        return spec
    if model is None:
        raise ValueError("give --config FILE, or --encoder with --model")
    if encoder == "clip":
        return {"name": "clip", "model_name": model, "pretrained": pretrained}
    return {"name": encoder, "name_or_path": model}


@app.command()
def encode(
    texts: list[str] = typer.Argument(..., help="One or more captions to encode."),
    config: Optional[Path] = typer.Option(None, help="YAML encoder spec (see configs/encoders/)."),
    encoder: str = typer.Option("hf", help="Registered text encoder name (see `mmx info`)."),
    model: Optional[str] = typer.Option(None, help="open_clip architecture (clip) or HF id / local folder (hf)."),
    pretrained: Optional[str] = typer.Option(None, help="clip only: open_clip tag or local checkpoint file."),
) -> None:
    """Encode captions and show how each word maps to tokens (the spans attention maps use)."""
    from mmx.encoders import ENCODERS

    try:
        enc = ENCODERS.build_from_dict(_encoder_spec(config, encoder, model, pretrained))
        ctx = enc(list(texts))
    except (KeyError, ValueError, OSError, TypeError) as err:
        console.print(f"[red]error:[/red] {err}")
        raise typer.Exit(code=2) from None
    if ctx.words is None:
        console.print(f"[red]error:[/red] {type(enc).__name__} is not a text encoder")
        raise typer.Exit(code=2)
    pooled = None if ctx.pooled is None else tuple(ctx.pooled.shape)
    console.print(f"tokens {tuple(ctx.tokens.shape)}  mask {tuple(ctx.mask.shape)}  pooled {pooled}")
    for b, text in enumerate(texts):
        table = Table(title=repr(text), caption=f"{int(ctx.mask[b].sum())} real tokens")
        for column in ("word", "tokens", "span"):
            table.add_column(column)
        for span in ctx.words[b]:
            table.add_row(span.word, str(span.end - span.start), f"[{span.start}, {span.end})")
        console.print(table)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
