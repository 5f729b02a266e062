"""Attention maps of a text-to-image model, for images it generates and for real images it denoises."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmx.attnmap.recorder import AttentionRecorder
from mmx.context import Context

__all__ = ["attend_generate", "attend_real"]


def attend_generate(
    pipeline: Any,
    prompts: Sequence[str],
    num_steps: int = 25,
    guidance_scale: float = 3.0,
    sampler: str = "ddim",
    generator: torch.Generator | None = None,
    **recorder_options: Any,
) -> tuple[torch.Tensor, Context, AttentionRecorder]:
    """Generate images for ``prompts`` with the recorder attached.

    Returns ``(images [B, C, H, W], context, recorder)``; ``recorder.maps()`` is ``[B, S, h, w]``.
    """
    _, height, width = pipeline.image_size
    with AttentionRecorder(pipeline.unet, (height, width), **recorder_options) as recorder:
        images = pipeline.generate(prompts, num_steps, guidance_scale, sampler, generator, callback=recorder.callback)
    return images, pipeline.encode(prompts), recorder


@torch.no_grad()
def attend_real(
    pipeline: Any,
    images: torch.Tensor,
    captions: Sequence[str],
    timesteps: Sequence[int] = (100, 250, 400),
    generator: torch.Generator | None = None,
    **recorder_options: Any,
) -> tuple[Context, AttentionRecorder]:
    """Noise real ``images [B, C, H, W]`` (in [-1, 1]) at each of ``timesteps`` and record one UNet call each.

    The maps answer "where does the model look for each word when it denoises this image".
    """
    ctx = pipeline.encode(captions)
    b = images.shape[0]
    with AttentionRecorder(pipeline.unet, tuple(images.shape[-2:]), **recorder_options) as recorder:
        for i, t in enumerate(timesteps):
            tt = torch.full((b,), int(t), device=images.device, dtype=torch.long)
            noise = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
            noisy = pipeline.scheduler.add_noise(images, noise, tt)
            pipeline.unet(noisy, tt, ctx)
            recorder.callback(i)
    return ctx, recorder
