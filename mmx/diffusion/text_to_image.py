"""Text-to-image diffusion: a frozen text encoder, a denoising UNet and a diffusers noise schedule.

Holds no files: saving and loading runs is the trainer's job (``mmx.train``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mmx.attnmap.capture import GroundingCapture, TokenTargets
from mmx.context import Context
from mmx.diffusion.loss import diffusion_loss, drop_conditions
from mmx.diffusion.sampling import StepCallback, check_guidance_interval, pad_context, sample
from mmx.diffusion.schedulers import sampler_from
from mmx.encoders.cache import CachedTextEncoder

__all__ = ["TextToImage"]


class TextToImage(nn.Module):
    """Caption -> Context -> denoiser, for training (:meth:`loss`) and generation (:meth:`generate`).

    Args:
        unet: ``unet(x_t, t, context) -> prediction`` (an mmx ``UNet2D`` or ``DiffusersUNet2D``).
        text_encoder: an mmx text encoder (``HFTextEncoder``, ``CLIPTextEncoder``).
        scheduler: the diffusers training scheduler (its config sets the prediction type).
        image_size: ``(channels, height, width)`` of generated images.
        cond_drop_prob: share of captions replaced by the empty caption in training (for guidance).
        min_snr_gamma: min-SNR-gamma loss weighting (None: plain MSE).
        max_tokens: pad every batch of tokens to this length (None: to the longest caption).
        attention_losses: losses on the UNet's cross-attention maps (``inside``, ``coverage``,
            ``reading`` of :mod:`mmx.attnmap.losses`), each with its weight; they need per-word
            object masks in :meth:`loss` and are skipped without them.
        describe_parts: ``prompt -> partial descriptions`` for composable guidance in
            :meth:`generate` (e.g. the shapes recipe's ``caption_components``); used when
            ``component_scale > 0``.
        component_scale: weight of each partial description's guidance term.
        guidance_interval: default for :meth:`generate`: guidance only at steps whose timestep lies
            in ``(low, high)`` (see :func:`~mmx.diffusion.sample`); None: at every step.
    """

    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        scheduler: Any,
        image_size: tuple[int, int, int] = (3, 32, 32),
        cond_drop_prob: float = 0.1,
        min_snr_gamma: float | None = None,
        max_tokens: int | None = None,
        attention_losses: Sequence[Any] = (),
        describe_parts: Callable[[str], list[str]] | None = None,
        component_scale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1); got {cond_drop_prob}")
        self.unet = unet
        self.text_encoder = text_encoder
        self.scheduler = scheduler
        self.image_size = tuple(image_size)
        self.cond_drop_prob = cond_drop_prob
        self.min_snr_gamma = min_snr_gamma
        self.max_tokens = max_tokens
        self.attention_losses = [term for term in attention_losses if term.weight > 0]
        self.describe_parts, self.component_scale = describe_parts, component_scale
        self._texts = CachedTextEncoder(text_encoder, max_tokens)
        self.guidance_interval = check_guidance_interval(guidance_interval)

    # -- text ------------------------------------------------------------------------------------
    def encode(self, captions: Sequence[str]) -> Context:
        """Context of ``captions``; a frozen encoder's outputs are cached per caption (computed once)."""
        device = next(self.unet.parameters()).device  # the cache may sit elsewhere after .to()
        if getattr(self.text_encoder, "frozen", False):
            return self._texts(captions, device)
        ctx = self.text_encoder(list(captions)).to(device)
        return pad_context(ctx, self.max_tokens) if self.max_tokens else ctx

    def null_context(self) -> Context:
        """The Context of the empty caption (the unconditional input of guidance)."""
        return self.encode([""])

    # -- training --------------------------------------------------------------------------------
    def loss(
        self,
        images: torch.Tensor,
        captions: Sequence[str],
        generator: torch.Generator | None = None,
        unet: nn.Module | None = None,
        word_masks: Sequence[dict[int, torch.Tensor]] | None = None,
        reading_masks: Sequence[dict[int, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Denoising loss of ``images [B, C, H, W]`` in [-1, 1] given their captions.

        ``unet`` overrides ``self.unet`` (the trainer passes its distributed wrapper).
        ``word_masks`` (per sample, word index -> ``[H, W]`` object mask) enable the attention
        losses. ``reading_masks`` (same form) name the words the reading loss spreads an object's
        positions over (default ``word_masks``; the shapes recipe adds each object's place word, so
        the positions still read where they are).
        """
        unet = self.unet if unet is None else unet
        ctx = self.encode(captions)
        null = pad_context(self.null_context(), ctx.tokens.shape[1])
        dropped_ctx, dropped = drop_conditions(ctx, null, self.cond_drop_prob, generator, return_dropped=True)
        if not self.attention_losses or word_masks is None:
            return diffusion_loss(unet, images, dropped_ctx, self.scheduler, self.min_snr_gamma, generator)
        targets = TokenTargets(
            ctx.words,
            word_masks,
            ctx.tokens.shape[1],
            tuple(images.shape[-2:]),
            images.device,
            keep=~dropped,
            reading_masks=reading_masks,
        )  # a dropped caption names nothing
        with GroundingCapture(unet) as capture:
            loss = diffusion_loss(unet, images, dropped_ctx, self.scheduler, self.min_snr_gamma, generator)
        for term in self.attention_losses:
            loss = loss + term(capture, targets)
        return loss

    # -- generation ------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        num_steps: int = 25,
        guidance_scale: float = 3.0,
        sampler: str = "ddim",
        generator: torch.Generator | None = None,
        callback: StepCallback | None = None,
        unet: nn.Module | None = None,
        components: Sequence[Sequence[str]] | None = None,
        component_scale: float | None = None,
        guidance_interval: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Images ``[B, C, H, W]`` in [-1, 1] for ``prompts`` (of any lengths), with guidance in one batched call.

        ``unet`` overrides ``self.unet`` (e.g. the trainer's EMA-weighted copy). ``components``
        (per prompt, a list of partial descriptions, e.g. "a red shape on the left", "a triangle on
        the left") add composable guidance, each with weight ``component_scale``; by default they
        come from ``describe_parts`` when ``self.component_scale > 0``. ``guidance_interval``
        (timesteps ``(low, high)``; default ``self.guidance_interval``) limits guidance to those steps.
        """
        ctx = self.encode(prompts)
        if component_scale is None:
            component_scale = self.component_scale
        if components is None and self.describe_parts is not None and component_scale > 0:
            components = [self.describe_parts(p) for p in prompts]
        parts = weights = None
        if components is not None and any(components):
            if len(components) != len(prompts):
                raise ValueError(f"components must hold one list per prompt ({len(prompts)}); got {len(components)}")
            k = max(len(c) for c in components)
            texts = [row[j] if j < len(row) else "" for j in range(k) for row in components]  # component-major
            weights = torch.tensor([[component_scale if j < len(row) else 0.0 for row in components] for j in range(k)])
            parts = self.encode(texts)
        null = self.null_context() if guidance_scale != 1.0 or parts is not None else None
        scheduler = sampler_from(self.scheduler, sampler)
        if guidance_interval is None:
            guidance_interval = self.guidance_interval
        x = sample(
            self.unet if unet is None else unet,
            scheduler,
            ctx,
            self.image_size,
            num_steps,
            guidance_scale,
            null,
            generator,
            callback,
            components=parts,
            component_weights=weights,
            guidance_interval=guidance_interval,
        )
        return x.clamp(-1, 1)
