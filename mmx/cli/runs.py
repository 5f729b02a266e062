"""The commands that serve runs: train a recipe, and sample, evaluate, map and demo a run through its recipe."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import typer

from mmx.cli import COUNT_MAX, SEED_MAX, USER_ERRORS, app, console, fail, finite, in_range, make_dir, message


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
        fail(message(err))
    run_dir = out or Path("runs") / config.stem
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        fail(f"cannot create the run folder {run_dir}: {err}")
    main_process = PartialState(cpu=multi_process_cpu_launch()).is_main_process
    if main_process:  # one writer; save_config writes a temporary file and renames it
        try:
            save_config(cfg, run_dir / "config.yaml")
        except OSError as err:
            fail(f"cannot write {run_dir / 'config.yaml'}: {err}")
    try:
        task = recipe.task_class(cfg, run_dir)
    except USER_ERRORS as err:
        fail(message(err))
    try:
        result = run_training(task, cfg.train, run_dir, resume=resume, hparams=flatten(cfg))
    except (CheckpointError, NonFiniteLossError, TrainSetupError, FileNotFoundError) as err:
        fail(str(err))
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
        fail(message(err))
    make_dir(out)
    try:
        result.save(out)
    except OSError as err:
        fail(f"cannot write into {out}: {err.strerror or err}")
    console.print(result.summary() + f"\n-> {out}")


RUN = typer.Argument(..., help="A run folder (from `mmx train`).")
STEPS = typer.Option(None, callback=in_range(1, COUNT_MAX), help="Sampling steps (default: the recipe's).")
SEED = typer.Option(0, callback=in_range(0, SEED_MAX), help="Seed of the initial noise (policy runs: of the episode).")
MAX_DOWNSAMPLE = typer.Option(
    None,
    callback=in_range(0, COUNT_MAX),
    help="Text-to-image runs: read attention only from layers whose maps "
    "are at most this many times coarser than the image (0: every layer; default: eval.attention_max_downsample).",
)


@app.command()
def sample(
    run: Path = RUN,
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="A caption; repeat for several."),
    steps: int | None = STEPS,
    guidance: float | None = typer.Option(None, callback=finite, help="Classifier-free guidance scale (1.0: none)."),
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
        callback=in_range(1, COUNT_MAX),
        help="Held-out prompts, phrases, inputs or episodes (default: the recipe's).",
    ),
    steps: int | None = STEPS,
    out: Path | None = typer.Option(None, help="Write eval.json and the pictures here (default: RUN/eval)."),
    beam: int | None = typer.Option(
        None, callback=in_range(1, COUNT_MAX), help="Seq2seq runs: beam size (1: greedy; default: the recipe's)."
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
        fail(f"mmx eval changes only eval.* settings of a run; got {bad}")
    _serve(
        "evaluate", run, out or run / "eval", overrides, num=num, steps=steps, beam=beam, max_downsample=max_downsample
    )


@app.command()
def attend(
    run: Path | None = typer.Argument(None, help="A run folder (from `mmx train`); or give --pipeline."),
    prompt: str | None = typer.Option(
        None,
        "--prompt",
        "-p",
        help="The caption whose words to map (policy runs: replaces the instruction; "
        "translation runs: the sentence; grounding runs: the phrase).",
    ),
    pipeline: Path | None = typer.Option(
        None, help="A local diffusers pipeline folder (SD, SDXL, SD3, Flux; with model_index.json) instead of a run."
    ),
    image: Path | None = typer.Option(
        None,
        help="Map attention on this real image (noised) instead of a generated one (captioning runs: the image "
        "to caption; default: held-out shapes image number --seed).",
    ),
    out: Path = typer.Option(Path("attend"), help="Folder for overlays, grid and words.json."),
    steps: int | None = STEPS,
    guidance: float | None = typer.Option(None, callback=finite, help="Guidance scale (default: the recipe's)."),
    seed: int = SEED,
    gif: bool = typer.Option(False, help="Also write a GIF per word across windows of denoising steps."),
    max_downsample: int | None = MAX_DOWNSAMPLE,
    word: str | None = typer.Option(None, help="--pipeline: write the overlay of this word only."),
    height: int | None = typer.Option(None, callback=in_range(8, COUNT_MAX), help="--pipeline: image height."),
    width: int | None = typer.Option(None, callback=in_range(8, COUNT_MAX), help="--pipeline: image width."),
) -> None:
    """Which image region (or action step, or written word) looked at which word: overlays, a grid, statistics."""
    if pipeline is not None:
        _attend_pipeline(
            pipeline, run, prompt, image, out, steps, guidance, seed, gif, max_downsample, word, height, width
        )
        return
    if run is None:
        fail("give a run folder, or a diffusers pipeline folder with --pipeline")
    if word is not None or height is not None or width is not None:
        fail("--word, --height and --width go with --pipeline")
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


def _attend_pipeline(
    folder: Path,
    run: Path | None,
    prompt: str | None,
    image: Path | None,
    out: Path,
    steps: int | None,
    guidance: float | None,
    seed: int,
    gif: bool,
    max_downsample: int | None,
    word: str | None,
    height: int | None,
    width: int | None,
) -> None:
    from mmx.attnmap.pipelines.load import attend_pipeline

    if run is not None or image is not None or max_downsample is not None:
        fail("--pipeline takes a prompt and generates: give no run folder, --image or --max-downsample with it")
    if not prompt or not prompt.split():
        fail(f"--pipeline needs the prompt whose words to map; got --prompt {prompt!r}")
    make_dir(out)
    try:
        lines, _ = attend_pipeline(folder, prompt, out, steps, guidance, seed, height, width, word, gif)
    except USER_ERRORS as err:
        fail(message(err))
    console.print("\n".join(lines) + f"\n-> {out}")


DEMO_RUN = Path(__file__).parents[1] / "assets" / "shapes_t2i"


@app.command()
def demo(
    out: Path = typer.Option(Path("mmx-demo"), help="Folder for the sample grid, attention maps and eval.json."),
    num: int = typer.Option(32, callback=in_range(1, COUNT_MAX), help="Held-out captions to generate and check."),
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
        fail(f"the shipped demo model is missing from {run}; reinstall mmx or run `mmx demo --train`")
    start = time.perf_counter()
    _serve("demo", run, out, num=num, steps=steps)
    console.print(f"({time.perf_counter() - start:.0f} s)")
