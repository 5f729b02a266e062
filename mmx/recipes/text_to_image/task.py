"""The trainer's view of a text-to-image run: its model, data, loss, validation and saving.

A run folder holds ``config.yaml`` (the full config), ``model/unet/`` (EMA weights as
safetensors + config.json), ``checkpoints/``, ``logs/`` (tensorboard), ``samples/`` (PNG grids)
and ``metrics.jsonl``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmx.attnmap.losses import Reading
from mmx.config import save_config
from mmx.recipes.text_to_image.config import TextToImageConfig
from mmx.recipes.text_to_image.pipeline import build_data, build_evaluator, build_pipeline, fit_data_spec

__all__ = ["TextToImageTask"]


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
        if any(isinstance(term, Reading) for term in self.pipeline.attention_losses) and "objects" in batch:
            # each object's colour, shape and place words
            reading = [
                {w: o.mask for o in objects for w in (*o.words, *o.position_words) if w >= 0}
                for objects in batch["objects"]
            ]
        return self.pipeline.loss(
            images, batch["caption"], generator, unet=model, word_masks=batch.get("word_masks"), reading_masks=reading
        )

    def validate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        from mmx.train.visual import save_grid

        result = self.evaluator(self.cfg.eval.num_prompts, unet=model, validation=True)
        k = self.cfg.eval.grid_prompts
        correct = None if result.correct is None else result.correct[:k]
        save_grid(
            result.samples.images[:k],
            result.samples.prompts[:k],
            out_dir / f"step_{step:07d}.png",
            correct,
            title=f"step {step}: held-out captions",
        )
        return result.scores

    def save_model(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir / "unet")
        save_config(self.cfg, self.run_dir / "config.yaml")
