"""The ``mmx`` command line. It decides what the user sees; the library only logs."""

from __future__ import annotations

import logging
import math
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

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


# What a user can get wrong (a path, a value, a file): each is printed as one line and exit code 2.
USER_ERRORS = (ValueError, KeyError, TypeError, OSError, ImportError, RuntimeError)


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


def _message(err: BaseException) -> str:
    return err.args[0] if isinstance(err, KeyError) and err.args else str(err)


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
        _fail(_message(err))
    if ctx.words is None:
        _fail(f"{type(enc).__name__} is not a text encoder")
    pooled = None if ctx.pooled is None else tuple(ctx.pooled.shape)
    console.print(f"tokens {tuple(ctx.tokens.shape)}  mask {tuple(ctx.mask.shape)}  pooled {pooled}")
    for b, text in enumerate(texts):
        table = Table(title=repr(text), caption=f"{int(ctx.mask[b].sum())} real tokens")
        for column in ("word", "tokens", "span"):
            table.add_column(column)
        for span in ctx.words[b]:
            table.add_row(span.word, str(span.end - span.start), f"[{span.start}, {span.end})")
        console.print(table)


_COUNT_MAX = 100_000  # --num, --steps, --beam: anything larger is a typo, not a request
_SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


def _in_range(low: int, high: int) -> Callable[[int | None], int | None]:
    """typer callback factory: an int option must lie in ``low .. high``; the error names the value."""

    def check(value: int | None) -> int | None:
        if value is not None and not low <= value <= high:
            raise typer.BadParameter(f"{value} is not in the range {low} .. {high}")
        return value

    return check


def _finite(value: float | None) -> float | None:
    """typer callback: a float option (e.g. --guidance) must be a finite number, not nan or inf."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def _make_dir(path: Path) -> Path:
    """Create an output folder (and parents); an error names the folder instead of a traceback."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _fail(f"cannot create the output folder {path}: {err.strerror or err}")
    return path


@app.command()
def train(
    config: Path = typer.Argument(..., help="Recipe YAML, e.g. configs/shapes_t2i.yaml."),
    overrides: list[str] | None = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=100."),
    out: Path | None = typer.Option(None, help="Run folder (default: runs/<config name>)."),
    resume: str | None = typer.Option(
        None,
        help="'latest' (the newest checkpoint that passes its manifest; a damaged one is skipped with a "
        "warning) or a checkpoint folder to continue from.",
    ),
) -> None:
    """Train a model from a recipe (runs unchanged under `accelerate launch` / `torchrun`)."""
    from accelerate import PartialState

    from mmx.config import flatten, save_config
    from mmx.recipes import load_recipe
    from mmx.train import train as run_training
    from mmx.train.trainer import CheckpointError, NonFiniteLossError, TrainSetupError, multi_process_cpu_launch

    try:
        cfg, recipe = load_recipe(config, list(overrides or []))
    except USER_ERRORS as err:
        _fail(_message(err))
    run_dir = out or Path("runs") / config.stem
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _fail(f"cannot create the run folder {run_dir}: {err}")
    main_process = PartialState(cpu=multi_process_cpu_launch()).is_main_process
    if main_process:  # one writer; save_config writes a temporary file and renames it
        try:
            save_config(cfg, run_dir / "config.yaml")
        except OSError as err:
            _fail(f"cannot write {run_dir / 'config.yaml'}: {err}")
    try:
        task = recipe.task_class(cfg, run_dir)
    except USER_ERRORS as err:
        _fail(_message(err))
    try:
        result = run_training(task, cfg.train, run_dir, resume=resume, hparams=flatten(cfg))
    except (CheckpointError, NonFiniteLossError, TrainSetupError, FileNotFoundError) as err:
        _fail(str(err))
    if main_process:
        metrics = "  ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())
        console.print(f"trained {result.step} steps, loss {result.loss:.4f}  {metrics}\nrun folder: {run_dir}")


def _serve(command: str, run: Path, out: Path, overrides: list[str] | None = None, **options: Any) -> None:
    """Load ``run`` with its recipe, call the recipe's ``command`` with the options given, print and save its result."""
    from mmx.recipes import load_run

    try:
        loaded = load_run(run, overrides)
        method = getattr(loaded.recipe, command)
        result = method(loaded, **loaded.recipe.options(method, options))
    except USER_ERRORS as err:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            console.print_exception()
        _fail(_message(err))
    _make_dir(out)
    try:
        result.save(out)
    except OSError as err:
        _fail(f"cannot write into {out}: {err.strerror or err}")
    console.print(result.summary() + f"\n-> {out}")


RUN = typer.Argument(..., help="A run folder (from `mmx train`).")
STEPS = typer.Option(None, callback=_in_range(1, _COUNT_MAX), help="Sampling steps (default: the recipe's).")
SEED = typer.Option(
    0, callback=_in_range(0, _SEED_MAX), help="Seed of the initial noise (policy runs: of the episode)."
)
MAX_DOWNSAMPLE = typer.Option(
    None,
    callback=_in_range(0, _COUNT_MAX),
    help="Text-to-image runs: read attention only from layers whose maps "
    "are at most this many times coarser than the image (0: every layer; default: eval.attention_max_downsample).",
)


@app.command()
def sample(
    run: Path = RUN,
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="A caption; repeat for several."),
    steps: int | None = STEPS,
    guidance: float | None = typer.Option(None, callback=_finite, help="Classifier-free guidance scale (1.0: none)."),
    seed: int = SEED,
    scheduler: str | None = typer.Option(None, help="ddpm, ddim, dpm++ or euler (default: the recipe's)."),
    out: Path = typer.Option(Path("samples"), help="Folder for the PNGs."),
) -> None:
    """Generate images for prompts with a trained text-to-image run: one PNG per prompt and a grid."""
    _serve("sample", run, out, prompts=list(prompt), steps=steps, guidance=guidance, seed=seed, scheduler=scheduler)


@app.command()
def eval(
    run: Path = RUN,
    overrides: list[str] | None = typer.Argument(
        None, help="key=value changes to the run's eval settings, e.g. 'eval.metrics=[{name: fid, weights: FILE}]'."
    ),
    num: int | None = typer.Option(
        None,
        callback=_in_range(1, _COUNT_MAX),
        help="Held-out prompts, phrases, inputs or episodes (default: the recipe's).",
    ),
    steps: int | None = STEPS,
    out: Path | None = typer.Option(None, help="Write eval.json and the pictures here (default: RUN/eval)."),
    beam: int | None = typer.Option(
        None, callback=_in_range(1, _COUNT_MAX), help="Seq2seq runs: beam size (1: greedy; default: the recipe's)."
    ),
    max_downsample: int | None = MAX_DOWNSAMPLE,
) -> None:
    """Score a run on its held-out data with its recipe's metrics; writes eval.json and pictures.

    Text-to-image: the metrics of eval.metrics, or what fits the data (shapes: caption accuracy by
    the shape detector and attention mIoU; other data: held-out denoising loss). Policy: seeded
    episodes in the task's simulator. Seq2seq: exact match and alignment / attention scores.
    Grounding: predicted-mask IoU and attention mIoU.
    """
    bad = [item for item in overrides or [] if not item.startswith("eval.")]
    if bad:
        _fail(f"mmx eval changes only eval.* settings of a run; got {bad}")
    _serve(
        "evaluate", run, out or run / "eval", overrides, num=num, steps=steps, beam=beam, max_downsample=max_downsample
    )


@app.command()
def attend(
    run: Path = RUN,
    prompt: str | None = typer.Option(
        None,
        "--prompt",
        "-p",
        help="The caption whose words to map (policy runs: replaces the instruction; "
        "translation runs: the sentence; grounding runs: the phrase).",
    ),
    image: Path | None = typer.Option(
        None,
        help="Map attention on this real image (noised) instead of a generated one (captioning runs: the image "
        "to caption; default: held-out shapes image number --seed).",
    ),
    out: Path = typer.Option(Path("attend"), help="Folder for overlays, grid and words.json."),
    steps: int | None = STEPS,
    guidance: float | None = typer.Option(None, callback=_finite, help="Guidance scale (default: the recipe's)."),
    seed: int = SEED,
    gif: bool = typer.Option(False, help="Also write a GIF per word across windows of denoising steps."),
    max_downsample: int | None = MAX_DOWNSAMPLE,
) -> None:
    """Which image region (or action step, or written word) looked at which word: overlays, a grid, statistics."""
    _serve(
        "attend",
        run,
        out,
        prompt=prompt,
        image=image,
        steps=steps,
        guidance=guidance,
        seed=seed,
        gif=gif,
        max_downsample=max_downsample,
    )


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
        message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
        _fail(message)
    except OSError as err:
        _fail(f"cannot write {out}: {err.strerror or err}")
    table = Table("setting", "value", title=f"UNet1D from {source.name}")
    for key in (
        "input_dim",
        "global_cond_dim",
        "diffusion_step_embed_dim",
        "down_dims",
        "kernel_size",
        "cond_predict_scale",
        "n_groups",
    ):
        value = model.config[key]
        table.add_row(key, str(tuple(value) if isinstance(value, list) else value))
    table.add_row("parameters", f"{sum(p.numel() for p in model.parameters()):,}")
    console.print(table)
    console.print(f"wrote {out}; load it with mmx.models.UNet1D.from_pretrained({str(out)!r})")


@app.command()
def bench(
    suite: str = typer.Argument(
        "all", help="attention, unet2d, sample, recorder, unet1d, decoding, options, scaling, or all (every suite)."
    ),
    json_path: Path | None = typer.Option(None, "--json", help="Write every figure and raw measurement here."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    quick: bool = typer.Option(
        False, "--quick", help="Tiny sizes, one repeat: a smoke run of seconds, not figures to quote."
    ),
    out: Path | None = typer.Option(
        None, help="Folder for the scaling PNGs (default: the folder of --json, else the current folder)."
    ),
) -> None:
    """Time mmx against its alternatives in one run; each figure is printed as a ratio (below 1: mmx takes less).

    The alternatives: diffusers' Attention and UNet2DConditionModel, the tutorial attention, bare
    SDPA, the recorder off, the upstream UNet1D rebuild, decoding without caches, plain fp32 training
    (`options`: gradient checkpointing, channels_last, torch.compile, bf16, TF32); `scaling` draws
    step time and peak memory against resolution, context length and horizon. `all` takes about
    10 minutes on 2 idle CPU cores (half of it the two cold compilations of `options`); --quick about 30 s.
    """
    import time

    from mmx.bench import resolve, run_suites, tables
    from mmx.bench.timing import pick_device

    start = time.perf_counter()
    try:
        names = resolve(suite)
        torch_device = pick_device(device)
    except (KeyError, ValueError) as err:
        _fail(str(err))
    folder = _make_dir(out if out is not None else json_path.parent if json_path is not None else Path("."))

    def log(line: str) -> None:
        console.print(line, style="dim", markup=False, highlight=False)

    report = run_suites(names, torch_device, quick=quick, out=folder, log=log)
    report.meta["wall_seconds"] = time.perf_counter() - start
    for table in tables(report):
        console.print(table)
    for result in report.suites.values():
        for note in result.notes:
            console.print(f"{result.name}: {note}", markup=False, highlight=False)
        for path in result.files:
            console.print(f"wrote {path}")
    if json_path is not None:
        try:
            report.write_json(json_path)
        except OSError as err:
            _fail(f"cannot write {json_path}: {err.strerror or err}")
        console.print(f"wrote {json_path}")
    console.print(f"{len(report.suites)} suite(s) in {report.meta['wall_seconds']:.0f} s")
    if report.errors:
        _fail("failed: " + "; ".join(f"{name}: {message}" for name, message in report.errors.items()))


DEMO_RUN = Path(__file__).parent / "assets" / "shapes_t2i"


@app.command()
def demo(
    out: Path = typer.Option(Path("mmx-demo"), help="Folder for the sample grid, attention maps and eval.json."),
    num: int = typer.Option(32, callback=_in_range(1, _COUNT_MAX), help="Held-out captions to generate and check."),
    steps: int | None = STEPS,
    retrain: bool = typer.Option(
        False, "--train", help="Retrain the shipped model from scratch first (about 25 min on 2 CPU cores)."
    ),
    config: Path | None = typer.Option(None, hidden=True, help="Recipe for --train (default: the shipped one)."),
) -> None:
    """Generate images for captions the model never saw and print how many follow their caption.

    Uses the small shapes model shipped inside mmx (trained by configs/shapes_t2i.yaml); --train
    retrains it here first, with a progress bar.
    """
    import time

    run = DEMO_RUN
    if retrain:
        run = out / "run"
        console.print(f"retraining the shapes model into {run} ...")
        train(config or DEMO_RUN / "config.yaml", [], out=run, resume=None)
    elif not (run / "model" / "unet").is_dir():
        _fail(f"the shipped demo model is missing from {run}; reinstall mmx or run `mmx demo --train`")
    start = time.perf_counter()
    _serve("demo", run, out, num=num, steps=steps)
    console.print(f"({time.perf_counter() - start:.0f} s)")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
