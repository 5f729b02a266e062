"""Attention mIoU of a text-to-image model on the shapes data: do the words light up their objects?"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmx.attnmap import attend_real, word_maps
from mmx.eval.detector import detect_objects
from mmx.eval.localization import detection_masks, word_ious

__all__ = ["attention_miou_real", "generated_miou"]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def attention_miou_real(
    pipeline: Any,
    dataset: Any,
    num: int = 64,
    timesteps: Sequence[int] = (100, 250, 400),
    batch_size: int = 32,
    threshold: float = 0.4,
    seed: int = 0,
    max_downsample: float | None = None,
) -> float:
    """Mean IoU over object words (colour and shape words) on real renders noised at ``timesteps``.

    ``max_downsample`` reads only the layers whose maps are at most that many times coarser than
    the image (see :class:`~mmx.attnmap.AttentionRecorder`); None reads every layer.
    """
    device = next(pipeline.unet.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    scores: list[float] = []
    for start in range(0, min(num, len(dataset)), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, num, len(dataset)))]
        images = torch.stack([item["image"] for item in items]).to(device)
        ctx, recorder = attend_real(
            pipeline, images, [item["caption"] for item in items], timesteps, generator, max_downsample=max_downsample
        )
        maps = word_maps(recorder.maps(), ctx.words, image_size=tuple(images.shape[-2:]))
        for item, per_word in zip(items, maps):
            scores += list(word_ious(per_word, item["word_masks"], threshold).values())
    return _mean(scores)


def generated_miou(
    images: torch.Tensor, prompts: Sequence[str], maps: Sequence[Sequence[Any]], threshold: float = 0.4
) -> float:
    """Mean IoU of object words' maps with the detector's masks on generated ``images [N, 3, H, W]``.

    ``maps``: per prompt, its word maps (:func:`~mmx.attnmap.word_maps` of the attention recorded
    while the image was generated, e.g. by :func:`~mmx.attnmap.attend_generate`). Words whose object
    the detector does not find are skipped (caption accuracy counts those).
    """
    scores: list[float] = []
    for image, caption, per_word in zip(images, prompts, maps):
        masks = detection_masks(caption, detect_objects(image.float().cpu()))
        device = per_word[0].map.device if per_word else "cpu"
        scores += list(word_ious(per_word, {k: v.to(device) for k, v in masks.items()}, threshold).values())
    return _mean(scores)
