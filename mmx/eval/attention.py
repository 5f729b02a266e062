"""Attention mIoU of a text-to-image model on the shapes data: do the words light up their objects?"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from mmx.attnmap import attend_generate, attend_real, word_maps
from mmx.eval.detector import detect_objects
from mmx.eval.localization import detection_masks, word_ious

__all__ = ["attention_miou_real", "attention_miou_generated"]


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def attention_miou_real(
    pipeline: Any, dataset: Any, num: int = 64, timesteps: Sequence[int] = (100, 250, 400), batch_size: int = 32,
    threshold: float = 0.4, seed: int = 0, max_downsample: float | None = None,
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
        ctx, recorder = attend_real(pipeline, images, [item["caption"] for item in items], timesteps, generator,
                                    max_downsample=max_downsample)
        maps = word_maps(recorder.maps(), ctx.words, image_size=tuple(images.shape[-2:]))
        for item, per_word in zip(items, maps):
            scores += list(word_ious(per_word, item["word_masks"], threshold).values())
    return _mean(scores)


def attention_miou_generated(
    pipeline: Any, prompts: Sequence[str], num_steps: int = 25, guidance_scale: float = 3.0, sampler: str = "ddim",
    batch_size: int = 32, threshold: float = 0.4, seed: int = 0, max_downsample: float | None = None,
) -> tuple[float, torch.Tensor, list]:
    """Mean IoU of object words with the detector's masks on generated images.

    ``max_downsample``: as in :func:`attention_miou_real`.
    Words whose object the detector does not find are skipped (caption accuracy counts those).
    Returns ``(mIoU, images, per-prompt word maps)``.
    """
    device = next(pipeline.unet.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    scores: list[float] = []
    all_images, all_maps = [], []
    for start in range(0, len(prompts), batch_size):
        batch = list(prompts[start : start + batch_size])
        images, ctx, recorder = attend_generate(pipeline, batch, num_steps, guidance_scale, sampler, generator,
                                                max_downsample=max_downsample)
        maps = word_maps(recorder.maps(), ctx.words, image_size=tuple(images.shape[-2:]))
        for image, caption, per_word in zip(images, batch, maps):
            masks = detection_masks(caption, detect_objects(image.float().cpu()))
            scores += list(word_ious(per_word, {k: v.to(device) for k, v in masks.items()}, threshold).values())
        all_images.append(images.cpu())
        all_maps += maps
    return _mean(scores), torch.cat(all_images), all_maps
