"""The ``mmx`` command line. It decides what the user sees; the library only logs."""

from __future__ import annotations

import logging
import math
import platform
import re
from pathlib import Path
from typing import Callable, Optional

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


def _encoder_spec(config: Optional[Path], encoder: str, model: Optional[str], pretrained: Optional[str]) -> dict:
    """An encoder spec from a YAML file, or from the command-line options."""
    if config is not None:
        import yaml

        if not config.is_file():
            raise ValueError(f"config file not found: {config}")
        try:
            spec = yaml.safe_load(config.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            raise ValueError(f"{config} is not valid YAML: {err}") from None
        except UnicodeDecodeError as err:
            raise ValueError(f"{config} is not a UTF-8 text file: {err}") from None
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
    except (KeyError, ValueError, OSError, TypeError, RuntimeError) as err:  # RuntimeError: open_clip loading
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


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(code=2)


_COUNT_MAX = 100_000  # --num, --steps, --beam: anything larger is a typo, not a request
_SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1


def _in_range(low: int, high: int) -> Callable[[Optional[int]], Optional[int]]:
    """typer callback factory: an int option must lie in ``low .. high``; the error names the value."""

    def check(value: Optional[int]) -> Optional[int]:
        if value is not None and not low <= value <= high:
            raise typer.BadParameter(f"{value} is not in the range {low} .. {high}")
        return value

    return check


def _finite(value: Optional[float]) -> Optional[float]:
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


def _check_steps(steps: Optional[int], scheduler: object) -> None:
    """--steps must fit the run's noise schedule (1 .. its training timesteps); the error names the value."""
    if steps is None:
        return
    from mmx.diffusion.sampling import check_steps

    try:
        check_steps(steps, scheduler)
    except ValueError as err:
        _fail(f"--steps {steps}: {err}")


def _file_label(word: str, limit: int = 40) -> str:
    """``word`` as a safe part of a file name: letters, digits, '-' and '_' only, at most ``limit`` characters.

    A prompt word such as ``x/../../y`` or a 400-letter word must not pick the folder or break the name.
    """
    label = re.sub(r"[^\w-]+", "_", word).strip("_")[:limit]
    return label or "word"


@app.command()
def train(
    config: Path = typer.Argument(..., help="Recipe YAML, e.g. configs/shapes_t2i.yaml."),
    overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides, e.g. train.max_steps=100."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default: runs/<config name>)."),
    resume: Optional[str] = typer.Option(
        None, help="'latest' (the newest checkpoint that passes its manifest; a damaged one is skipped with a "
        "warning) or a checkpoint folder to continue from."),
) -> None:
    """Train a model from a recipe (runs unchanged under `accelerate launch` / `torchrun`)."""
    from accelerate import PartialState

    from mmx.config import ConfigError, save_config
    from mmx.train import train as run_training
    from mmx.train.recipes import load_recipe
    from mmx.train.trainer import CheckpointError, NonFiniteLossError, TrainSetupError, multi_process_cpu_launch

    try:
        cfg, task_cls = load_recipe(config, list(overrides or []))
    except (ConfigError, FileNotFoundError, KeyError) as err:
        _fail(str(err))
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
        task = task_cls(cfg, run_dir)
    except (KeyError, ValueError, TypeError, OSError) as err:
        _fail(str(err))
    try:
        result = run_training(task, cfg.train, run_dir, resume=resume, hparams=_flat_hparams(cfg))
    except (CheckpointError, NonFiniteLossError, TrainSetupError, FileNotFoundError) as err:
        _fail(str(err))
    if main_process:
        metrics = "  ".join(f"{k} {v:.3f}" for k, v in result.metrics.items())
        console.print(f"trained {result.step} steps, loss {result.loss:.4f}  {metrics}\nrun folder: {run_dir}")


def _flat_hparams(cfg: object) -> dict:
    from mmx.config import to_dict

    flat: dict = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}{key}.", item)
        elif isinstance(value, (int, float, str, bool)):
            flat[prefix[:-1]] = value
        else:
            flat[prefix[:-1]] = str(value)

    walk("", to_dict(cfg))
    return flat


def _load(run: Path, overrides: Optional[list[str]] = None):
    from mmx.train.text_to_image import load_run

    task = _task_of(run)
    if task != "text_to_image":
        _fail(f"{run} is a {task} run; this command works on text-to-image runs (`mmx eval` and `mmx attend` take "
              "any run)")
    try:
        return load_run(run, overrides=overrides)
    except (FileNotFoundError, ValueError, OSError) as err:
        _fail(str(err))


@app.command()
def sample(
    run: Path = typer.Argument(..., help="A run folder (from `mmx train`)."),
    prompt: list[str] = typer.Option(..., "--prompt", "-p", help="A caption; repeat for several."),
    steps: Optional[int] = typer.Option(None, callback=_in_range(1, _COUNT_MAX),
                                        help="Sampling steps (default: the recipe's)."),
    guidance: Optional[float] = typer.Option(None, callback=_finite,
                                             help="Classifier-free guidance scale (1.0: none)."),
    seed: int = typer.Option(0, callback=_in_range(0, _SEED_MAX), help="Seed of the initial noise."),
    scheduler: Optional[str] = typer.Option(None, help="ddpm, ddim, dpm++ or euler (default: the recipe's)."),
    out: Path = typer.Option(Path("samples"), help="Folder for the PNGs."),
) -> None:
    """Generate images for prompts with a trained run; writes one PNG per prompt and a grid."""
    import torch
    from PIL import Image

    from mmx.train.visual import save_grid, to_uint8

    cfg, pipeline = _load(run)
    d = cfg.diffusion
    try:
        images = pipeline.generate(list(prompt), steps or d.sample_steps, d.guidance_scale if guidance is None else guidance,
                                   scheduler or d.sampler, torch.Generator().manual_seed(seed))
    except (KeyError, ValueError) as err:
        _fail(str(err))
    _make_dir(out)
    for i, pixels in enumerate(to_uint8(images)):
        Image.fromarray(pixels.numpy()).save(out / f"{i:03d}.png")
    grid = save_grid(images, list(prompt), out / "grid.png", title=f"{run.name}: seed {seed}")
    console.print(f"wrote {len(prompt)} images and {grid}")


def _evaluate(cfg, pipeline, num: Optional[int], steps: Optional[int], out: Optional[Path], title: str,
              max_downsample: Optional[int] = None):
    """Score held-out prompts with the run's metrics; writes a grid and eval.json to ``out``.

    ``max_downsample``: which layers attention metrics read (None: the recipe's
    ``eval.attention_max_downsample``; 0: every layer). Returns the Evaluation.
    """
    import json

    from mmx.train.text_to_image import build_evaluator
    from mmx.train.visual import save_grid

    _check_steps(steps, pipeline.scheduler)
    try:
        evaluator = build_evaluator(pipeline, cfg, num, _max_downsample(cfg, max_downsample))
        result = evaluator(num or cfg.eval.num_prompts, steps)
    except (KeyError, ValueError, TypeError, OSError, ImportError) as err:
        _fail(str(err))
    if out is not None:
        _make_dir(out)
        k = cfg.eval.grid_prompts
        samples = result.samples
        save_grid(samples.images[:k], samples.prompts[:k], out / "heldout_grid.png",
                  None if result.correct is None else result.correct[:k], title=title)
        (out / "eval.json").write_text(json.dumps(result.report(), indent=1))
    return result


def _metric_lines(r: dict) -> list[str]:
    """One line per metric an evaluation report holds, in the words a user reads."""
    lines = []
    if "caption_accuracy" in r:
        lines += [f"held-out caption accuracy: {r['caption_accuracy']:.1%} ({r['num_prompts']} prompts)",
                  f"captions right, by the held-out pair they name: {_by_pair(r)}"]
    if "attention_miou_generated" in r:
        lines.append(f"attention mIoU (object words, threshold 0.4, {_layers_read(r['attention_max_downsample'])}): "
                     f"generated images {_score(r['attention_miou_generated'])}, real renders noised "
                     f"{_score(r['attention_miou_real'])}")
    if "denoising_loss" in r:
        lines.append(f"held-out denoising loss: {r['denoising_loss']:.4f} ({r['denoising_loss_images']} images, "
                     f"{len(r['denoising_loss_by_timestep'])} fixed timesteps, fixed noise)")
    if "fid" in r:
        lines.append(f"FID: {r['fid']:.2f} ({r['fid_images']} generated against as many held-out images)")
    if "clip_score" in r:
        lines.append(f"CLIP score: {r['clip_score']:.2f} ({r['num_prompts']} generated images against their captions)")
    return lines


def _by_pair(results: dict) -> str:
    pairs = results.get("accuracy_by_pair") or {}
    return ", ".join(f"{name} {right}/{total}" for name, (right, total) in pairs.items() if total) or "n/a"


def _max_downsample(cfg, option: Optional[int]) -> Optional[int]:
    """The --max-downsample option (0: every layer) or, when not given, the recipe's choice."""
    if option is None:
        return cfg.eval.attention_max_downsample
    return option or None


def _layers_read(max_downsample: Optional[int]) -> str:
    return "every cross-attention layer" if max_downsample is None else f"layers with maps at most {max_downsample}x coarser than the image"


def _score(value: float) -> str:
    return "n/a (no object found)" if value != value else f"{value:.3f}"


def _task_of(run: Path) -> str:
    import yaml

    path = run / "config.yaml"
    if not path.is_file():
        _fail(f"{run} is not an mmx run: {path} not found")
    return str((yaml.safe_load(path.read_text()) or {}).get("task", "text_to_image"))


def _eval_grounding(run: Path, num: Optional[int]) -> None:
    from mmx.data import DATASETS
    from mmx.train.grounding import PhraseData, grounding_scores, load_grounding_run

    try:
        cfg, model, encoder = load_grounding_run(run)
    except (FileNotFoundError, ValueError) as err:
        _fail(str(err))
    spec = dict(cfg.eval.data)
    if num is not None:
        spec["length"] = num
    data = PhraseData(DATASETS.build_from_dict(spec), seed=1)
    scores = grounding_scores(model, encoder, data, cfg.eval.batch_size, cfg.eval.threshold)
    console.print(f"held-out phrases ({len(data)}): predicted-mask IoU {scores['mask_iou']:.3f}, "
                  f"attention mIoU of colour and shape words {scores['attention_miou']:.3f}")


def _load_policy(run: Path):
    """A policy run whose data came from a simulator (rollouts and attention need one)."""
    from mmx.train.policy import load_policy_run

    try:
        cfg, policy = load_policy_run(run)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        _fail(str(err))
    if cfg.data.env is None:
        _fail(f"{run} was trained on {cfg.data.path} without a simulator (data.env is null): "
              "rollouts and observations need one")
    return cfg, policy


def _eval_policy(run: Path, num: Optional[int], steps: Optional[int], out: Path) -> None:
    import json

    from mmx.eval.rollout import chunk_latency, evaluate_policy
    from mmx.train.visual import save_rollouts

    cfg, policy = _load_policy(run)
    _check_steps(steps, policy.scheduler)
    if steps is not None:
        policy.num_inference_steps = steps
    episodes = num or cfg.eval.episodes
    result = evaluate_policy(policy, cfg.data.env, episodes, cfg.eval.seed, cfg.eval.batch_size,
                             render=cfg.eval.render, progress=True)
    latency = chunk_latency(policy, cfg.data.env)
    summary = {**result.summary(), "episodes": episodes, "sampler": cfg.diffusion.sampler,
               "denoising_steps": policy.num_inference_steps, "chunk_latency_ms": latency["median_ms"]}
    _make_dir(out)
    picture = save_rollouts(result, out / "rollouts.png", title=f"{run.name}: {cfg.data.env} rollouts (green: success)")
    (out / "eval.json").write_text(json.dumps({**summary, "seeds": result.seeds, "success": result.success,
                                               "infos": result.infos}, indent=1, default=str))
    routes = "  ".join(f"{k.removeprefix('route_')} {v:.0%}" for k, v in summary.items() if k.startswith("route_"))
    console.print(
        f"[bold]{cfg.data.env}: success {summary['success_rate']:.1%}[/bold] over {episodes} seeded episodes "
        f"({policy.num_inference_steps} {cfg.diffusion.sampler} steps per chunk)"
        + (f"\nroutes: {routes}" if routes else "")
        + f"\naction-chunk latency (batch 1): {latency['median_ms']:.1f} ms median\n-> {picture or out}"
    )


def _load_seq2seq(run: Path):
    from mmx.train.seq2seq import load_seq2seq_run

    try:
        return load_seq2seq_run(run)
    except (FileNotFoundError, ValueError, KeyError, OSError) as err:
        _fail(str(err))


def _eval_seq2seq(run: Path, num: Optional[int], beam: Optional[int], out: Path) -> None:
    import json

    from mmx.data import DATASETS

    cfg, task = _load_seq2seq(run)
    data = task.eval_dataset()
    if num is not None:
        spec = {k: v for k, v in cfg.data.items() if k not in ("split", "length", "seed")}
        data = DATASETS.build_from_dict({**spec, **dict(cfg.eval.data), "length": num})
    decoding = {} if beam is None else {"method": "greedy" if beam <= 1 else "beam", "beam_size": max(beam, 1)}
    scores = task.score(task.model, data, keep_examples=32, **decoding)
    method = decoding.get("method", cfg.eval.method)
    how = "greedy" if method == "greedy" else f"beam {decoding.get('beam_size', cfg.eval.beam_size)}"
    _make_dir(out)
    (out / "eval.json").write_text(json.dumps({"num": len(data), "decoding": how, **scores}, ensure_ascii=False, indent=1))
    what = "captions" if task.captioning else "translations"
    lines = [f"[bold]held-out {what}: exact match {scores['exact_match']:.1%}[/bold] ({len(data)} inputs, {how})"]
    if "alignment_accuracy" in scores:
        lines.append(f"alignment accuracy (strongest source word is the one translated): {_score(scores['alignment_accuracy'])}")
    if "attention_miou" in scores:
        lines.append(f"attention mIoU of colour and shape words (threshold {cfg.eval.threshold}): "
                     f"{_score(scores['attention_miou'])}; their map peaks on the object: "
                     f"{_score(scores['attention_pointing'])}")
    wrong = [e for e in scores["examples"] if e["output"] != e["reference"]][:3]
    for e in wrong:
        lines.append(f"  wrong: {e['input']!r}\n     got {e['output']!r}\n    want {e['reference']!r}")
    console.print("\n".join(lines) + f"\n-> {out / 'eval.json'}")


@app.command()
def eval(
    run: Path = typer.Argument(..., help="A run folder (from `mmx train`)."),
    overrides: Optional[list[str]] = typer.Argument(
        None, help="Text-to-image runs: key=value changes to the run's eval settings, e.g. "
                   "'eval.metrics=[{name: fid, weights: FILE}]' or eval.num_prompts=256."),
    num: Optional[int] = typer.Option(None, callback=_in_range(1, _COUNT_MAX),
                                      help="Number of held-out prompts (default: the recipe's)."),
    steps: Optional[int] = typer.Option(None, callback=_in_range(1, _COUNT_MAX),
                                        help="Sampling steps (default: the recipe's)."),
    out: Optional[Path] = typer.Option(None, help="Write the grid and eval.json here (default: RUN/eval)."),
    beam: Optional[int] = typer.Option(None, callback=_in_range(1, _COUNT_MAX),
                                       help="Seq2seq runs: beam size (1: greedy; default: the recipe's)."),
    max_downsample: Optional[int] = typer.Option(
        None, callback=_in_range(0, _COUNT_MAX),
        help="Text-to-image runs: read attention only from layers whose maps are at most this many times coarser than the image "
             "(0: every layer; default: the recipe's eval.attention_max_downsample)."),
) -> None:
    """Score a run: held-out caption accuracy (text-to-image), mask IoU (grounding), rollouts (policy),
    exact match (seq2seq).

    Text-to-image: a detector checks every claim of each generated image's caption, plus attention
    mIoU. Policy: NUM seeded episodes in the task's simulator: success rate, route shares, latency.
    Seq2seq: NUM held-out compositions decoded: exact match, plus the alignment accuracy
    (translation) or the attention mIoU of object words (captioning).
    """
    task = _task_of(run)
    if overrides and task != "text_to_image":
        _fail(f"{run} is a {task} run; key=value overrides of `mmx eval` apply to text-to-image runs")
    if task == "grounding":
        _eval_grounding(run, num)
        return
    if task == "seq2seq":
        _eval_seq2seq(run, num, beam, out or run / "eval")
        return
    if task == "policy":
        _eval_policy(run, num, steps, out or run / "eval")
        return
    if any(not item.startswith("eval.") for item in overrides or []):
        _fail(f"mmx eval changes only eval.* settings of a run; got {[o for o in overrides if not o.startswith('eval.')]}")
    cfg, pipeline = _load(run, overrides)
    out = out or run / "eval"
    result = _evaluate(cfg, pipeline, num, steps, out, f"{run.name}: held-out captions", max_downsample=max_downsample)
    console.print("\n".join(_metric_lines(result.report())) + f"\n-> {out}")


@app.command()
def attend(
    run: Path = typer.Argument(..., help="A run folder (from `mmx train`)."),
    prompt: Optional[str] = typer.Option(
        None, "--prompt", "-p",
        help="The caption whose words to map (policy runs: replaces the instruction; translation runs: the sentence; "
             "grounding runs: the phrase)."),
    image: Optional[Path] = typer.Option(
        None, help="Map attention on this real image (noised) instead of a generated one (captioning runs: the image "
                   "to caption; default: held-out shapes image number --seed)."),
    out: Path = typer.Option(Path("attend"), help="Folder for overlays, grid and words.json."),
    steps: Optional[int] = typer.Option(None, callback=_in_range(1, _COUNT_MAX),
                                        help="Sampling steps (default: the recipe's)."),
    guidance: Optional[float] = typer.Option(None, callback=_finite, help="Guidance scale (default: the recipe's)."),
    seed: int = typer.Option(0, callback=_in_range(0, _SEED_MAX),
                             help="Seed of the initial noise (policy runs: of the episode)."),
    gif: bool = typer.Option(False, help="Also write a GIF per word across windows of denoising steps."),
    max_downsample: Optional[int] = typer.Option(
        None, callback=_in_range(0, _COUNT_MAX),
        help="Text-to-image runs: read attention only from layers whose maps are at most this many times coarser than the image "
             "(0: every layer; default: the recipe's eval.attention_max_downsample)."),
) -> None:
    """Which image region (or action step) looked at which word: overlays, a grid, and statistics.

    Policy runs: for the first action chunk of a seeded episode, each action step's attention over
    the observation tokens (per source step and per instruction word) and, for camera images,
    over image regions. Seq2seq runs: for each generated word, the attention over the source
    words (an alignment matrix) or over the image regions (one overlay per word). Grounding runs:
    each phrase word's map over the image (--image, or held-out shapes image --seed with its
    phrase) and the predicted region.
    """
    import json

    import torch

    from mmx.attnmap import attend_generate, attend_real, save_overlay, save_steps_gif, save_word_grid, word_maps
    from mmx.eval import detect_objects, detection_masks, word_ious

    if _task_of(run) == "policy":
        _attend_policy(run, prompt, seed, out, steps)
        return
    if _task_of(run) == "seq2seq":
        _attend_seq2seq(run, prompt, image, seed, out)
        return
    if _task_of(run) == "grounding":
        _attend_grounding(run, prompt, image, seed, out)
        return
    if prompt is None:
        _fail("give the caption to map with --prompt")
    cfg, pipeline = _load(run)
    d = cfg.diffusion
    _, height, width = cfg.image_size
    generator = torch.Generator().manual_seed(seed)
    n_steps = steps or d.sample_steps
    window = max(1, n_steps // 8) if gif else None
    layers = _max_downsample(cfg, max_downsample)
    try:
        if image is not None:
            images = _image_tensor(image, (height, width))[None]
            ctx, recorder = attend_real(pipeline, images, [prompt], generator=generator, max_downsample=layers)
        else:
            scale = d.guidance_scale if guidance is None else guidance
            images, ctx, recorder = attend_generate(pipeline, [prompt], n_steps, scale, d.sampler, generator, window=window,
                                                    max_downsample=layers)
        total = recorder.maps()
    except (ValueError, KeyError, OSError, RuntimeError) as err:
        _fail(str(err))
    maps = word_maps(total, ctx.words, image_size=(height, width))[0]
    try:
        scores = word_ious(maps, detection_masks(prompt, detect_objects(images[0])))
    except ValueError:  # a caption outside the shapes grammar: no detector scores
        scores = {}
    _make_dir(out)
    stats = []
    for m in maps:
        save_overlay(images[0], m, out / f"word_{m.index:02d}_{_file_label(m.word)}.png")
        ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        weight = m.map / m.map.sum().clamp_min(1e-12)
        stats.append({"word": m.word, "index": m.index, "tokens": [m.span.start, m.span.end],
                      "peak": [int(v) for v in divmod(int(m.map.argmax()), width)],
                      "centroid_xy": [round(float((weight * xs).sum()) / width, 3), round(float((weight * ys).sum()) / height, 3)],
                      "area_above_0.4": round(float((m.map >= 0.4).float().mean()), 3),
                      "iou": None if m.index not in scores else round(scores[m.index], 3)})
        if gif and recorder.window_totals:
            keys = sorted(recorder.window_totals)
            frames = [word_maps(recorder.window_totals[k], ctx.words, image_size=(height, width))[0] for k in keys]
            frame_maps = [next(f.map for f in frame if f.index == m.index) for frame in frames]
            save_steps_gif(images[0], frame_maps, m.word, out / f"word_{m.index:02d}_{_file_label(m.word)}.gif",
                           labels=[f"steps {k * window}-{(k + 1) * window - 1}" for k in keys])
    grid = save_word_grid(images[0], maps, prompt, out / "grid.png", scores=scores)
    (out / "words.json").write_text(json.dumps({"prompt": prompt, "image": str(image) if image else None, "words": stats}, indent=1))
    if scores:
        names = {m.index: m.word for m in maps}
        console.print("object words' attention IoU: " + ", ".join(f"{names[i]} {v:.2f}" for i, v in scores.items()))
    console.print(f"wrote {len(maps)} word overlays, {grid} and {out / 'words.json'}")


def _image_tensor(path: Path, size: tuple[int, int]):
    """An image file as ``[3, H, W]`` in [-1, 1], resized to ``size``; a bad file is an error naming it."""
    from torchvision.transforms.functional import pil_to_tensor, resize

    from mmx.data.imagefolder import load_rgb

    return resize(pil_to_tensor(load_rgb(path)), list(size), antialias=True).float() / 127.5 - 1.0


def _attend_seq2seq(run: Path, prompt: Optional[str], image: Optional[Path], seed: int, out: Path) -> None:
    """Translation: the word-alignment matrix of --prompt. Captioning: per generated word, the image regions it read."""
    import json

    from mmx.attnmap import save_word_grid
    from mmx.attnmap.seq2seq import caption_word_maps, decoder_attention, region_maps, save_alignment
    from mmx.data.seq2seq import ROMANISED
    from mmx.eval.seq2seq import decode_batch

    cfg, task = _load_seq2seq(run)
    ev = cfg.eval
    model = task.model
    _make_dir(out)
    if not task.captioning:
        if prompt is None or image is not None:
            _fail("a translation run maps a sentence: give it with --prompt (and no --image)")
        if not prompt.split():
            _fail(f"--prompt {prompt!r} has no words: give the sentence to translate")
        unknown = task.source.unknown_words(prompt)
        if unknown:
            _fail(f"words outside the source vocabulary: {unknown}; known: {' '.join(task.source.words[4:])}")
        ids, mask = task.source.encode([prompt])
        memory = model.encode(ids, mask)
        decoded = decode_batch(model, memory, ev.method, ev.max_len, ev.beam_size, ev.length_penalty)
        words = task.target.tokens(decoded.tokens[0])
        att = decoder_attention(model, memory, decoded.tokens)[0]  # (T, S)
        source = prompt.split()
        rows = words + ["</s>"] * (int(decoded.lengths[0]) > len(words))  # END's row too: what it read to stop
        picture = save_alignment(att, source, rows, out / "alignment.png", title=f"{prompt} -> {' '.join(words)}",
                                 fallback_labels=ROMANISED)
        rows = [{"word": w, "reads": source[int(att[t, :len(source)].argmax())],
                 "attention": [round(float(v), 4) for v in att[t, :len(source)]]} for t, w in enumerate(words)]
        (out / "words.json").write_text(json.dumps({"source": prompt, "translation": " ".join(words), "words": rows},
                                                   ensure_ascii=False, indent=1))
        console.print(f"{prompt}\n-> [bold]{' '.join(words)}[/bold]\n"
                      + "\n".join(f"  {r['word']} <- {r['reads']}" for r in rows) + f"\nwrote {picture}")
        return
    if prompt is not None:
        _fail("a captioning run writes its own caption: give an image with --image (or none: a held-out shapes image)")
    item = None
    if image is not None:
        try:
            picture = _image_tensor(image, tuple(task.eval_dataset()[0]["image"].shape[-2:]))
        except (ValueError, OSError) as err:
            _fail(str(err))
    else:
        data = task.eval_dataset()
        item = data[seed % len(data)]
        picture = item["image"]
    memory = model.encode(picture[None])
    decoded = decode_batch(model, memory, ev.method, ev.max_len, ev.beam_size, ev.length_penalty)
    words = task.target.tokens(decoded.tokens[0])
    caption = " ".join(words)
    maps = region_maps(decoder_attention(model, memory, decoded.tokens), memory.grid, tuple(picture.shape[-2:]))[0]
    word_maps = caption_word_maps(words, maps)
    scores = {}
    if item is not None:
        from mmx.eval import word_ious
        from mmx.eval.seq2seq import caption_masks

        scores = word_ious(word_maps, caption_masks(caption, item["objects"]), ev.threshold)
    grid = save_word_grid(picture, word_maps, f"generated: {caption}", out / "grid.png", scores=scores)
    stats = [{"word": m.word, "peak": [int(v) for v in divmod(int(m.map.argmax()), m.map.shape[-1])],
              "iou": None if m.index not in scores else round(scores[m.index], 3)} for m in word_maps]
    (out / "words.json").write_text(json.dumps({"image": str(image) if image else f"held-out #{item['index']}",
                                                "caption": caption,
                                                "reference": None if item is None else item["caption"],
                                                "words": stats}, indent=1))
    console.print(f"caption: [bold]{caption}[/bold]" + ("" if item is None else f"\n   want: {item['caption']}")
                  + f"\nwrote {grid} and {out / 'words.json'}")


def _attend_grounding(run: Path, prompt: Optional[str], image: Optional[Path], seed: int, out: Path) -> None:
    """GroundingNet: each phrase word's map over the image regions (which region read which word),
    and the region the model predicts. Without --image: held-out shapes image number --seed."""
    import json

    import torch

    from mmx.attnmap import AttentionRecorder, WordMap, save_overlay, save_word_grid, word_maps
    from mmx.context import WordSpan
    from mmx.data import DATASETS
    from mmx.eval import word_ious
    from mmx.train.grounding import PhraseData, load_grounding_run

    try:
        cfg, model, encoder = load_grounding_run(run)
    except (FileNotFoundError, ValueError, OSError) as err:
        _fail(str(err))
    data = PhraseData(DATASETS.build_from_dict(dict(cfg.eval.data)), seed=1)
    item = None
    if image is not None:
        if prompt is None:
            _fail("give the phrase to ground in --image with --prompt, e.g. -p \"the red circle\"")
        try:
            picture = _image_tensor(image, tuple(data[0]["image"].shape[-2:]))
        except (ValueError, OSError) as err:
            _fail(str(err))
    else:
        item = data[seed % len(data)]
        picture = item["image"]
        prompt = item["phrase"] if prompt is None else prompt
    if not prompt.split():
        _fail(f"--prompt {prompt!r} has no words: give the phrase to ground")
    size = tuple(picture.shape[-2:])
    grid = size if model.config.input_size is None else (model.config.input_size,) * 2
    ctx = encoder([prompt])
    with torch.no_grad(), AttentionRecorder(model, grid) as recorder:
        logits = model(picture[None], ctx)
    maps = word_maps(recorder.maps(), ctx.words, image_size=size)[0]
    scores = {}
    if item is not None and prompt == item["phrase"]:  # the data set knows the named object's mask
        scores = word_ious(maps, item["word_masks"], cfg.eval.threshold)
    _make_dir(out)
    region = WordMap("predicted region", -1, WordSpan("predicted region", 0, 0), logits[0, 0].sigmoid())
    save_overlay(picture, region, out / "region.png")
    for m in maps:
        save_overlay(picture, m, out / f"word_{m.index:02d}_{_file_label(m.word)}.png")
    picture_path = save_word_grid(picture, maps, prompt, out / "grid.png", scores=scores)
    stats = [{"word": m.word, "index": m.index, "peak": [int(v) for v in divmod(int(m.map.argmax()), size[1])],
              "iou": None if m.index not in scores else round(scores[m.index], 3)} for m in maps]
    (out / "words.json").write_text(json.dumps({
        "prompt": prompt, "image": str(image) if image else f"held-out #{seed % len(data)}",
        "predicted_region_share": round(float((logits[0, 0] > 0).float().mean()), 4), "words": stats}, indent=1))
    if scores:
        names = {m.index: m.word for m in maps}
        console.print("object words' attention IoU: " + ", ".join(f"{names[i]} {v:.2f}" for i, v in scores.items()))
    console.print(f"{prompt}: wrote {len(maps)} word overlays, {picture_path}, {out / 'region.png'} and {out / 'words.json'}")


def _attend_policy(run: Path, prompt: Optional[str], seed: int, out: Path, steps: Optional[int]) -> None:
    import json

    import torch

    from mmx.attnmap import attend_policy, save_region_overlays, save_token_heatmap
    from mmx.data.envs import make_env
    from mmx.eval.rollout import stack_history

    cfg, policy = _load_policy(run)
    env = make_env(cfg.data.env)
    obs = env.reset(seed=seed)
    if prompt is not None:
        if "instruction" not in obs:
            _fail(f"the {cfg.data.env} task has no instruction to replace with --prompt")
        obs["instruction"] = prompt
    batch = stack_history([[obs]], policy.n_obs_steps)
    try:
        action, att = attend_policy(policy, batch, torch.Generator().manual_seed(seed), steps)
    except ValueError as err:
        _fail(str(err))
    _make_dir(out)
    first = policy.n_obs_steps - 1
    executed = (first, first + policy.n_action_steps - 1)
    labels, matrix = att.groups(0)
    what = obs.get("instruction", cfg.data.env)
    save_token_heatmap(matrix, labels, out / "attention_steps.png", executed=executed,
                       title=f"{what!r}: each action step's attention (executed steps boxed)")
    from PIL import Image

    Image.fromarray(env.render()).save(out / "scene.png")
    overlays = []
    for seg in att.segments:
        if seg.kind == "rgb":
            frames = list(batch[seg.name][0].numpy())  # (To, H, W, 3) uint8
            path = save_region_overlays(frames, att.region_maps(seg.name, 0, slice(executed[0], executed[1] + 1)),
                                        out / f"attention_{seg.name}.png", title=f"{what!r}: where the executed steps looked")
            overlays.append(str(path))
    share = matrix[executed[0] : executed[1] + 1].mean(0)
    ranked = sorted(zip(labels, share.tolist()), key=lambda kv: -kv[1])
    (out / "attention.json").write_text(json.dumps({
        "instruction": obs.get("instruction"), "seed": seed, "columns": labels,
        "per_action_step": [[round(v, 4) for v in row] for row in matrix.tolist()],
        "executed_steps": list(executed), "executed_mean": dict((k, round(v, 4)) for k, v in ranked),
        "action": action["action"][0].tolist(),
    }, indent=1))
    top = ", ".join(f"{k} {v:.2f}" for k, v in ranked[:4])
    console.print(f"executed action steps read most: {top}\nwrote {out / 'attention_steps.png'}"
                  + "".join(f", {p}" for p in overlays) + f", {out / 'scene.png'} and {out / 'attention.json'}")


@app.command()
def convert(
    source: Path = typer.Argument(..., help="A Diffusion Policy checkpoint (.ckpt), or a state_dict file "
                                            "(.safetensors, .pt) of its ConditionalUnet1D."),
    out: Path = typer.Option(..., "--out", "-o", help="New folder for the mmx UNet1D (config.json + safetensors)."),
    trust_pickle: bool = typer.Option(
        False, "--trust-pickle",
        help="Allow unpickling SOURCE. Diffusion Policy .ckpt files pickle their config, and unpickling runs "
             "code from the file: pass this only for files you trust."),
    which: str = typer.Option("ema_model", help="The weights of a .ckpt to take: ema_model (else model) or model."),
    prefix: str = typer.Option("model.", help="Where the UNet's keys start in the policy's state_dict "
                                              "('' for a bare UNet state_dict)."),
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
    for key in ("input_dim", "global_cond_dim", "diffusion_step_embed_dim", "down_dims", "kernel_size",
                "cond_predict_scale", "n_groups"):
        value = model.config[key]
        table.add_row(key, str(tuple(value) if isinstance(value, list) else value))
    table.add_row("parameters", f"{sum(p.numel() for p in model.parameters()):,}")
    console.print(table)
    console.print(f"wrote {out}; load it with mmx.models.UNet1D.from_pretrained({str(out)!r})")


@app.command()
def bench(
    suite: str = typer.Argument(
        "all", help="attention, unet2d, sample, recorder, unet1d, decoding, options, scaling, or all (every suite)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every figure and raw measurement here."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes, one repeat: a smoke run of seconds, not figures to quote."),
    out: Optional[Path] = typer.Option(
        None, help="Folder for the scaling PNGs (default: the folder of --json, else the current folder)."),
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
    out: Path = typer.Option(Path("mmx-demo"), help="Folder for the sample grid and eval.json."),
    num: int = typer.Option(32, callback=_in_range(1, _COUNT_MAX), help="Held-out captions to generate and check."),
    steps: Optional[int] = typer.Option(None, callback=_in_range(1, _COUNT_MAX),
                                        help="Sampling steps (default: the recipe's 25)."),
    retrain: bool = typer.Option(False, "--train", help="Retrain the shipped model from scratch first (about 25 min on 2 CPU cores)."),
    config: Optional[Path] = typer.Option(None, hidden=True, help="Recipe for --train (default: the shipped one)."),
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
    cfg, pipeline = _load(run)
    result = _evaluate(cfg, pipeline, num, steps, out, "captions never seen in training (green: detector agrees)")
    samples, r = result.samples, result.report()
    from mmx.attnmap import save_word_grid

    for i in range(min(4, len(samples.prompts))):
        save_word_grid(samples.images[i], samples.maps[i], samples.prompts[i], out / f"attention_{i}.png")
    console.print(
        f"[bold]held-out caption accuracy: {r['caption_accuracy']:.1%}[/bold] on {num} captions with colour-shape "
        f"and shape-position pairs never seen in training; attention mIoU of object words "
        f"{_score(r['attention_miou_generated'])} ({time.perf_counter() - start:.0f} s)\n"
        f"captions right, by the held-out pair they name: {_by_pair(r)}\n"
        f"samples: {out / 'heldout_grid.png'}   word maps: {out / 'attention_0.png'} ...   details: {out / 'eval.json'}"
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
