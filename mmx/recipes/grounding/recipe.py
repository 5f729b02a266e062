"""The grounding recipe as a unit: load a run, score its masks and maps, show which region read which word."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmx.recipes.base import Recipe, RecipeError, Result, Run, file_label
from mmx.recipes.grounding.config import GroundingConfig
from mmx.recipes.grounding.task import GroundingTask, PhraseData, grounding_scores

__all__ = ["GroundingRecipe", "TrainedGrounding", "RECIPE"]


@dataclass
class TrainedGrounding:
    """What a grounding run trained: the GroundingNet and the text encoder its phrases go through."""

    net: nn.Module
    encoder: Any


class GroundingRecipe(Recipe):
    """A phrase -> the region it names: ResNet positions ask (queries), the phrase's tokens answer (keys, values)."""

    name = "grounding"
    config_class = GroundingConfig
    task_class = GroundingTask
    model_folder = "model/grounding"

    def load(self, path: Path, overrides: list[str] | None = None, device: str = "cpu") -> Run:
        """The run's config, its GroundingNet (eval mode) and text encoder."""
        from mmx.config import load_config
        from mmx.encoders import ENCODERS
        from mmx.models import GroundingNet

        path = Path(path)
        cfg = load_config(path / "config.yaml", GroundingConfig, overrides)
        net = GroundingNet.from_pretrained(path / self.model_folder).to(device).eval()
        return Run(path, self, cfg, TrainedGrounding(net, ENCODERS.build_from_dict(dict(cfg.text_encoder)).to(device)))

    def _heldout(self, cfg: GroundingConfig, num: int | None = None) -> PhraseData:
        from mmx.data import DATASETS

        spec = dict(cfg.eval.data)
        if num is not None:
            spec["length"] = num
        return PhraseData(DATASETS.build_from_dict(spec), seed=1)

    def evaluate(self, run: Run, num: int | None = None) -> Result:
        """Held-out phrases: the predicted mask's IoU and the attention mIoU of colour and shape words; eval.json."""
        cfg = run.config
        data = self._heldout(cfg, num)
        scores = grounding_scores(run.model.net, run.model.encoder, data, cfg.eval.batch_size, cfg.eval.threshold)
        lines = [
            f"held-out phrases ({len(data)}): predicted-mask IoU {scores['mask_iou']:.3f}, "
            f"attention mIoU of colour and shape words {scores['attention_miou']:.3f}"
        ]
        return Result(lines, {"num": len(data), **scores}, "eval.json")

    def attend(self, run: Run, prompt: str | None = None, image: Path | None = None, seed: int = 0) -> Result:
        """Each phrase word's map over the image regions and the predicted region. Without ``image``:
        held-out shapes image number ``seed`` with its phrase (``prompt`` replaces the phrase)."""
        from mmx.attnmap import AttentionRecorder, WordMap, save_overlay, save_word_grid, word_maps
        from mmx.context import WordSpan
        from mmx.data.imagefolder import image_tensor
        from mmx.eval import word_ious

        cfg, net, encoder = run.config, run.model.net, run.model.encoder
        data = self._heldout(cfg)
        item = None
        if image is not None:
            if prompt is None:
                raise RecipeError('give the phrase to ground in --image with --prompt, e.g. -p "the red circle"')
            picture = image_tensor(image, tuple(data[0]["image"].shape[-2:]))
        else:
            item = data[seed % len(data)]
            picture = item["image"]
            prompt = item["phrase"] if prompt is None else prompt
        if not prompt.split():
            raise RecipeError(f"--prompt {prompt!r} has no words: give the phrase to ground")
        size = tuple(picture.shape[-2:])
        grid = size if net.config.input_size is None else (net.config.input_size,) * 2
        ctx = encoder([prompt])
        with torch.no_grad(), AttentionRecorder(net, grid) as recorder:
            logits = net(picture[None], ctx)
        maps = word_maps(recorder.maps(), ctx.words, image_size=size)[0]
        scores = {}
        if item is not None and prompt == item["phrase"]:  # the data set knows the named object's mask
            scores = word_ious(maps, item["word_masks"], cfg.eval.threshold)
        region = WordMap("predicted region", -1, WordSpan("predicted region", 0, 0), logits[0, 0].sigmoid())
        pictures = {"region.png": lambda path: save_overlay(picture, region, path)}
        for m in maps:
            pictures[f"word_{m.index:02d}_{file_label(m.word)}.png"] = lambda path, m=m: save_overlay(picture, m, path)
        pictures["grid.png"] = lambda path: save_word_grid(picture, maps, prompt, path, scores=scores)
        stats = [
            {
                "word": m.word,
                "index": m.index,
                "peak": [int(v) for v in divmod(int(m.map.argmax()), size[1])],
                "iou": None if m.index not in scores else round(scores[m.index], 3),
            }
            for m in maps
        ]
        report = {
            "prompt": prompt,
            "image": str(image) if image else f"held-out #{seed % len(data)}",
            "predicted_region_share": round(float((logits[0, 0] > 0).float().mean()), 4),
            "words": stats,
        }
        lines = []
        if scores:
            names = {m.index: m.word for m in maps}
            lines.append("object words' attention IoU: " + ", ".join(f"{names[i]} {v:.2f}" for i, v in scores.items()))
        lines.append(f"{prompt}: wrote {len(maps)} word overlays, grid.png, region.png and words.json")
        return Result(lines, report, "words.json", pictures)


RECIPE = GroundingRecipe()
