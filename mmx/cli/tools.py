"""The tools beside the runs: versions and devices, how captions tokenise, Diffusion Policy conversion, benchmarks."""

from __future__ import annotations

import platform
from pathlib import Path

import typer
from rich.table import Table

from mmx.cli import USER_ERRORS, app, console, fail, make_dir, message


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


@app.command()
def encode(
    texts: list[str] = typer.Argument(..., help="One or more captions to encode."),
    config: Path | None = typer.Option(None, help="YAML encoder spec (see configs/encoders/)."),
    encoder: str = typer.Option("hf", help="Registered text encoder name (see `mmx info`)."),
    model: str | None = typer.Option(None, help="open_clip architecture (clip) or HF id / local folder (hf)."),
    pretrained: str | None = typer.Option(None, help="clip only: open_clip tag or local checkpoint file."),
) -> None:
    """Encode captions and show how each word maps to tokens (the spans attention maps use)."""
    from mmx.encoders import ENCODERS, read_spec

    try:
        if config is not None:
            spec = read_spec(config)
        elif model is None:
            raise ValueError("give --config FILE, or --encoder with --model")
        else:
            spec = (
                {"name": "clip", "model_name": model, "pretrained": pretrained}
                if encoder == "clip"
                else {"name": encoder, "name_or_path": model}
            )
        enc = ENCODERS.build_from_dict(spec)
        ctx = enc(list(texts))
    except USER_ERRORS as err:  # RuntimeError: open_clip loading
        fail(message(err))
    if ctx.words is None:
        fail(f"{type(enc).__name__} is not a text encoder")
    pooled = None if ctx.pooled is None else tuple(ctx.pooled.shape)
    console.print(f"tokens {tuple(ctx.tokens.shape)}  mask {tuple(ctx.mask.shape)}  pooled {pooled}")
    for b, text in enumerate(texts):
        table = Table(title=repr(text), caption=f"{int(ctx.mask[b].sum())} real tokens")
        for column in ("word", "tokens", "span"):
            table.add_column(column)
        for span in ctx.words[b]:
            table.add_row(span.word, str(span.end - span.start), f"[{span.start}, {span.end})")
        console.print(table)


@app.command()
def convert(
    source: Path = typer.Argument(
        ...,
        help="A Diffusion Policy checkpoint (.ckpt), or a state_dict file "
        "(.safetensors, .pt) of its ConditionalUnet1D.",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the mmx UNet1D (config.json + safetensors)."),
    trust_pickle: bool = typer.Option(
        False,
        "--trust-pickle",
        help="Allow unpickling SOURCE. Diffusion Policy .ckpt files pickle their config, and unpickling runs "
        "code from the file: pass this only for files you trust.",
    ),
    which: str = typer.Option("ema_model", help="The weights of a .ckpt to take: ema_model (else model) or model."),
    prefix: str = typer.Option(
        "model.", help="Where the UNet's keys start in the policy's state_dict ('' for a bare UNet state_dict)."
    ),
) -> None:
    """Convert a Diffusion Policy ConditionalUnet1D checkpoint into an mmx UNet1D folder.

    The configuration is read from the tensor shapes and the weights load with strict=True. The
    folder holds safetensors, so it loads later with UNet1D.from_pretrained(OUT) and no pickle;
    SOURCE is trusted once, here, with --trust-pickle, or not at all.
    """
    from mmx.models.unet1d import convert_diffusion_policy

    try:
        model = convert_diffusion_policy(source, out, trust_pickle=trust_pickle, which=which, prefix=prefix)
    except (FileNotFoundError, FileExistsError, KeyError, ValueError, RuntimeError) as err:
        fail(message(err))
    except OSError as err:
        fail(f"cannot write {out}: {err.strerror or err}")
    table = Table("setting", "value", title=f"UNet1D from {source.name}")
    keys = (
        "input_dim",
        "global_cond_dim",
        "diffusion_step_embed_dim",
        "down_dims",
        "kernel_size",
        "cond_predict_scale",
        "n_groups",
    )
    for key in keys:
        table.add_row(key, str(tuple(model.config[key]) if isinstance(model.config[key], list) else model.config[key]))
    table.add_row("parameters", f"{sum(p.numel() for p in model.parameters()):,}")
    console.print(table)
    console.print(f"wrote {out}; load it with mmx.models.UNet1D.from_pretrained({str(out)!r})")


@app.command()
def bench(
    suite: str = typer.Argument(
        "all",
        help="attention, unet2d, sample, recorder, unet1d, decoding, options, scaling, all (every one of those); "
        "trace, training, latency, fsdp (by name only); gpu (all, then training, latency and fsdp, on CUDA).",
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write every figure and raw measurement here."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    quick: bool = typer.Option(
        False, "--quick", help="Tiny sizes, one repeat: a smoke run of seconds, not figures to quote."
    ),
    out: Path | None = typer.Option(
        None, help="Folder for the scaling PNGs (default: the folder of --json, else the current folder)."
    ),
    peak_tflops: float | None = typer.Option(
        None, "--peak-tflops", help="The GPU's dense bf16 peak for MFU (default: mmx's table by device name)."
    ),
    results: Path | None = typer.Option(
        None, help="gpu: also write the figures into the GPU section of this results page (docs/results.md)."
    ),
) -> None:
    """Time mmx against its alternatives in one run; each figure is printed as a ratio (below 1: mmx takes less).

    The alternatives: diffusers' Attention and UNet2DConditionModel, the tutorial attention, bare
    SDPA, the recorder off, the upstream UNet1D rebuild, decoding without caches, plain fp32 training
    (`options`: gradient checkpointing, channels_last, torch.compile, bf16, TF32); `scaling` draws
    step time and peak memory against resolution, context length and horizon. `all` takes about
    10 minutes on 2 idle CPU cores (half of it the two cold compilations of `options`); --quick about 30 s.
    `gpu` adds bf16 training (samples/s, MFU, SDPA kernels, host syncs, time to 90% held-out accuracy)
    policy chunk latency (eager, torch.compile, CUDA graphs) and an FSDP2 save and resume, and needs a
    CUDA GPU.
    """
    import time

    from mmx.bench import GPU, resolve, run_suites, tables
    from mmx.bench.timing import pick_device

    start = time.perf_counter()
    if suite == GPU and not torch_cuda_available():
        console.print("mmx bench gpu needs a CUDA GPU, and torch sees none on this machine")
        raise typer.Exit(code=1)
    if peak_tflops is not None and not peak_tflops > 0:
        fail(f"--peak-tflops must be a positive number of TFLOP/s; got {peak_tflops}")
    if results is not None and suite != GPU:
        fail(f"--results writes the GPU section of a results page: it goes with `mmx bench gpu`, not {suite!r}")
    try:
        names, torch_device = resolve(suite), pick_device("cuda" if suite == GPU else device)
    except (KeyError, ValueError) as err:
        fail(message(err))
    folder = make_dir(out if out is not None else json_path.parent if json_path is not None else Path("."))
    report = run_suites(
        names,
        torch_device,
        quick=quick,
        out=folder,
        log=lambda line: console.print(line, style="dim", markup=False, highlight=False),
        peak_tflops=peak_tflops,
    )
    report.meta["wall_seconds"] = time.perf_counter() - start
    for item in tables(report):
        console.print(item, markup=False, highlight=False) if isinstance(item, str) else console.print(item)
    if json_path is not None:
        try:
            console.print(f"wrote {report.write_json(json_path)}")
        except OSError as err:
            fail(f"cannot write {json_path}: {err.strerror or err}")
    if results is not None:
        from mmx.bench.gpu import results_section, write_section

        try:
            console.print(f"wrote the GPU section of {write_section(results, results_section(report))}")
        except (OSError, ValueError) as err:
            fail(f"cannot write {results}: {getattr(err, 'strerror', None) or err}")
    console.print(f"{len(report.suites)} suite(s) in {report.meta['wall_seconds']:.0f} s")
    if report.errors:
        fail("failed: " + "; ".join(f"{name}: {text}" for name, text in report.errors.items()))


def torch_cuda_available() -> bool:
    """Whether torch sees a CUDA device (a function, so tests can pretend)."""
    import torch

    return torch.cuda.is_available()
