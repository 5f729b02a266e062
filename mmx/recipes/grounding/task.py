"""The grounding recipe: GroundingNet learns which region of a shapes image a phrase names.

Phrases come from the shapes data ("the red circle", "the blue square on the left" when the
colour and shape alone are ambiguous); the target is that object's mask. Validation reports the
predicted mask's IoU and the attention mIoU of the phrase's colour and shape words.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mmx.attnmap.capture import GroundingCapture, TokenTargets
from mmx.attnmap.losses import build_attention_losses
from mmx.config import save_config
from mmx.encoders.cache import CachedTextEncoder
from mmx.recipes.grounding.config import GroundingConfig

__all__ = ["GroundingTask", "PhraseData", "grounding_scores"]

logger = logging.getLogger(__name__)


class PhraseData(torch.utils.data.Dataset):
    """Wraps a shapes data set: each item is an image, a phrase naming one object, and its mask."""

    def __init__(self, base: Any, seed: int = 0) -> None:
        self.base, self.seed = base, seed

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.base[index]
        rng = np.random.default_rng([self.seed, index])
        objects = item["objects"]
        target = objects[int(rng.integers(len(objects)))]
        twins = sum(o.colour == target.colour and o.shape == target.shape for o in objects)
        phrase = f"the {target.colour} {target.shape}"
        if twins > 1 or rng.random() < 0.3:
            phrase += {
                "left": " on the left",
                "right": " on the right",
                "top": " at the top",
                "bottom": " at the bottom",
                "centre": " in the centre",
            }[target.position]
        return {
            "image": item["image"],
            "phrase": phrase,
            "mask": target.mask.float()[None],
            "word_masks": {1: target.mask, 2: target.mask},
        }


def grounding_scores(
    model: nn.Module, encoder: Any, data: PhraseData, batch_size: int, threshold: float
) -> dict[str, float]:
    """Mask IoU of the prediction and attention mIoU of the colour and shape words on ``data``."""
    from mmx.attnmap import AttentionRecorder, word_maps
    from mmx.data import collate
    from mmx.eval import iou, word_ious

    device = next(model.parameters()).device
    mask_ious, attention = [], []
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        images = batch["image"].to(device)
        ctx = encoder(batch["phrase"]).to(device)
        with (
            torch.no_grad(),
            AttentionRecorder(
                model, tuple(images.shape[-2:]) if model.config.input_size is None else (model.config.input_size,) * 2
            ) as recorder,
        ):
            logits = model(images, ctx)
        predicted = logits[:, 0] > 0
        mask_ious += [iou(p.cpu(), m[0].bool()) for p, m in zip(predicted, batch["mask"])]
        maps = word_maps(recorder.maps(), ctx.words, image_size=tuple(images.shape[-2:]))
        for per_word, masks in zip(maps, batch["word_masks"]):
            attention += list(word_ious(per_word, {k: v.to(device) for k, v in masks.items()}, threshold).values())
    return {"mask_iou": sum(mask_ious) / len(mask_ious), "attention_miou": sum(attention) / len(attention)}


class GroundingTask:
    """The trainer's view of a grounding run (see :class:`mmx.train.trainer.Task`)."""

    def __init__(self, cfg: GroundingConfig, run_dir: str | Path) -> None:
        from accelerate.utils import set_seed

        from mmx.encoders import ENCODERS
        from mmx.models import MODELS

        set_seed(cfg.train.seed)  # first: the model built below starts from weights that follow train.seed
        losses = build_attention_losses(cfg.attention_losses, ("coverage", "inside"), "grounding")
        self.attention_losses = [term for term in losses if term.weight > 0]
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.encoder = ENCODERS.build_from_dict(dict(cfg.text_encoder))
        spec = dict(cfg.model)
        spec.setdefault("context_dim", self.encoder.dim)
        self.model = MODELS.build_from_dict(spec)
        self._phrases = CachedTextEncoder(self.encoder)
        self._eval: PhraseData | None = None

    def train_dataset(self) -> torch.utils.data.Dataset:
        from mmx.data import DATASETS

        return PhraseData(DATASETS.build_from_dict(dict(self.cfg.data)), seed=self.cfg.train.seed)

    def collate(self, items: list[Any]) -> Any:
        from mmx.data import collate

        return collate(items)

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        device = generator.device
        images, target = batch["image"].to(device), batch["mask"].to(device)
        ctx = self._phrases(batch["phrase"], device)
        with GroundingCapture(model) if self.attention_losses else contextlib.nullcontext() as capture:
            logits = model(images, ctx)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        prob = logits.sigmoid()
        dice = 1 - (2 * (prob * target).sum((1, 2, 3)) + 1) / (prob.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
        loss = bce + dice.mean()
        if self.attention_losses:
            targets = TokenTargets(
                ctx.words, batch["word_masks"], ctx.tokens.shape[1], tuple(images.shape[-2:]), device
            )
            for term in self.attention_losses:
                loss = loss + term(capture, targets)
        return loss

    def validate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        from mmx.data import DATASETS

        if self._eval is None:
            self._eval = PhraseData(DATASETS.build_from_dict(dict(self.cfg.eval.data)), seed=1)
        return grounding_scores(
            model,
            self.encoder.to(next(model.parameters()).device),
            self._eval,
            self.cfg.eval.batch_size,
            self.cfg.eval.threshold,
        )

    def save_model(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir / "grounding")
        save_config(self.cfg, self.run_dir / "config.yaml")
