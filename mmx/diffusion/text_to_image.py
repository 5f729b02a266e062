"""Text-to-image diffusion: a frozen text encoder, a denoising UNet and a diffusers noise schedule.

Holds no files: saving and loading runs is the trainer's job (``mmx.train``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from mmx.context import Context
from mmx.encoders.cache import CachedTextEncoder
from mmx.diffusion.grounding_loss import GroundingCapture, token_targets
from mmx.diffusion.loss import diffusion_loss, drop_conditions
from mmx.diffusion.sampling import StepCallback, check_guidance_interval, pad_context, sample
from mmx.diffusion.schedulers import sampler_from

__all__ = ["TextToImage", "GROUNDING_KINDS"]

GROUNDING_KINDS = ("inside", "coverage")


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
        grounding_weight: weight of the token-level grounding loss on cross-attention maps
            (needs per-word object masks in :meth:`loss`; 0 disables it).
        describe_parts: ``prompt -> partial descriptions`` for composable guidance in
            :meth:`generate` (e.g. the shapes recipe's ``caption_components``); used when
            ``component_scale > 0``.
        component_scale: weight of each partial description's guidance term.
        grounding_kind: ``"inside"`` (the attention a word receives should lie inside its object,
            :meth:`GroundingCapture.grounding_loss`) or ``"coverage"`` (it should cover the whole
            object, :meth:`GroundingCapture.coverage_loss`).
        reading_weight: weight of the reading loss (each position inside an object should read
            that object's colour and shape words alike, :meth:`GroundingCapture.reading_loss`);
            like the grounding loss it needs per-word object masks. 0 disables it.
        reading_min_cover: the reading loss leaves out map cells an object covers less of (0: every
            cell it touches; see :meth:`GroundingCapture.reading_loss`).
        reading_extra_min_cover: the same for the words ``reading_masks`` adds to ``word_masks``
            in :meth:`loss` (the shapes task: place words); None: ``reading_min_cover``.
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
        grounding_weight: float = 0.0,
        describe_parts: Callable[[str], list[str]] | None = None,
        component_scale: float = 0.0,
        grounding_kind: str = "inside",
        reading_weight: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        reading_min_cover: float = 0.0,
        reading_extra_min_cover: float | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1); got {cond_drop_prob}")
        if grounding_kind not in GROUNDING_KINDS:
            raise ValueError(f"grounding_kind must be one of {', '.join(GROUNDING_KINDS)}; got {grounding_kind!r}")
        if not (grounding_weight >= 0 and reading_weight >= 0):
            raise ValueError(f"grounding_weight and reading_weight must be >= 0; got {grounding_weight}, {reading_weight}")
        for name, value in (("reading_min_cover", reading_min_cover), ("reading_extra_min_cover", reading_extra_min_cover)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]; got {value}")
        self.unet = unet
        self.text_encoder = text_encoder
        self.scheduler = scheduler
        self.image_size = tuple(image_size)
        self.cond_drop_prob = cond_drop_prob
        self.min_snr_gamma = min_snr_gamma
        self.max_tokens = max_tokens
        self.grounding_weight, self.grounding_kind = grounding_weight, grounding_kind
        self.reading_weight, self.reading_min_cover = reading_weight, reading_min_cover
        self.reading_extra_min_cover = reading_min_cover if reading_extra_min_cover is None else reading_extra_min_cover
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
        self, images: torch.Tensor, captions: Sequence[str], generator: torch.Generator | None = None,
        unet: nn.Module | None = None, word_masks: Sequence[dict[int, torch.Tensor]] | None = None,
        reading_masks: Sequence[dict[int, torch.Tensor]] | None = None,
    ) -> torch.Tensor:
        """Denoising loss of ``images [B, C, H, W]`` in [-1, 1] given their captions.

        ``unet`` overrides ``self.unet`` (the trainer passes its distributed wrapper).
        ``word_masks`` (per sample, word index -> ``[H, W]`` object mask) enable the grounding
        and reading losses when their weights are > 0. ``reading_masks`` (same form) name the words
        the reading loss spreads an object's positions over (default ``word_masks``; the shapes
        recipe adds each object's place word, so the positions still read where they are).
        """
        unet = self.unet if unet is None else unet
        ctx = self.encode(captions)
        null = pad_context(self.null_context(), ctx.tokens.shape[1])
        dropped_ctx, dropped = drop_conditions(ctx, null, self.cond_drop_prob, generator, return_dropped=True)
        if (self.grounding_weight <= 0 and self.reading_weight <= 0) or word_masks is None:
            return diffusion_loss(unet, images, dropped_ctx, self.scheduler, self.min_snr_gamma, generator)
        size = tuple(images.shape[-2:])

        def targets_of(masks: Sequence[dict[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
            targets, valid = token_targets(ctx.words, masks, ctx.tokens.shape[1], size, images.device)
            return targets, valid & ~dropped[:, None], size  # a dropped caption names nothing

        with GroundingCapture(unet) as capture:
            loss = diffusion_loss(unet, images, dropped_ctx, self.scheduler, self.min_snr_gamma, generator)
        if self.grounding_weight > 0:
            term = capture.grounding_loss if self.grounding_kind == "inside" else capture.coverage_loss
            loss = loss + self.grounding_weight * term(*targets_of(word_masks))
        if self.reading_weight > 0:
            reading = word_masks if reading_masks is None else reading_masks
            min_cover: float | torch.Tensor = self.reading_min_cover
            if reading_masks is not None and self.reading_extra_min_cover != self.reading_min_cover:
                named = token_targets(ctx.words, word_masks, ctx.tokens.shape[1], size, images.device)[1]
                min_cover = torch.where(named, self.reading_min_cover, self.reading_extra_min_cover)  # [B, S]
            loss = loss + self.reading_weight * capture.reading_loss(*targets_of(reading), min_cover)
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
        x = sample(self.unet if unet is None else unet, scheduler, ctx, self.image_size, num_steps, guidance_scale, null, generator, callback,
                   components=parts, component_weights=weights, guidance_interval=guidance_interval)
        return x.clamp(-1, 1)
