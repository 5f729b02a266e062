"""Differentiable attention maps of a model's own cross-attention, for training losses on where it looks.

:class:`AttentionCapture` keeps the q/k/mask of every cross-attention call (through
:func:`~mmx.attnmap.taps.tap_cross_attention`: mmx's ``CrossAttention`` hooks, the same tensors the
fused kernel used, or diffusers' ``Attention``; with their gradients);
:class:`GroundingCapture` adds the token-level losses of a text-to-image or grounding model (in
the spirit of TokenCompose, Wang et al. 2024): seen from the words, each word that names an
object should look at that object, inside its mask (``inside``) or covering it (``coverage``);
seen from the image, each position inside an object should read that object's words
(``reading``). :func:`mask_kl` compares any maps with masks (Liu et al. 2017, attention correctness).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmx.attnmap.grid import query_grid
from mmx.attnmap.taps import tap_cross_attention
from mmx.context import WordSpan
from mmx.nn.attention import attention_probs

__all__ = ["AttentionCapture", "GroundingCapture", "TokenTargets", "mask_kl", "token_targets"]


class AttentionCapture:
    """Context manager keeping the q/k/mask of every cross-attention call of ``model``, for a loss on the maps.

    The hooks see the q and k of the attention, with their gradients, so a loss on
    :meth:`mean_probs` (or on ``calls``) trains the projections that made them. Works on mmx models
    and on diffusers' ``UNet2DConditionModel``; a model without cross-attention is an error.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[tuple[torch.Tensor, torch.Tensor, Any, float]] = []
        self._undo: list = []

    def __enter__(self) -> AttentionCapture:
        self._undo = tap_cross_attention(
            self.model, lambda name, q, k, mask, scale: self.calls.append((q, k, mask, scale))
        )
        if not self._undo:
            raise ValueError(
                f"{type(self.model).__name__} has no cross-attention layer (mmx CrossAttention or diffusers "
                "Attention reading a context) for the attention losses to read"
            )
        return self

    def __exit__(self, *exc: Any) -> None:
        for undo in self._undo:
            undo()
        self._undo = []

    def mean_probs(self) -> torch.Tensor:
        """The attention probabilities of the captured calls averaged over heads and calls, ``[B, L, S]``
        (differentiable; all calls must share L and S, e.g. the cross-attention layers of a decoder)."""
        if not self.calls:
            raise RuntimeError("no cross-attention ran inside the AttentionCapture")
        return torch.stack([attention_probs(q, k, mask, scale=scale).mean(1) for q, k, mask, scale in self.calls]).mean(
            0
        )


def mask_kl(
    maps: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int], valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over rows of KL(mask || map): how far each attention map is from covering its mask evenly.

    Args:
        maps: ``[B, R, h*w]`` non-negative maps over the positions of an ``h x w`` grid (each row is
            normalised to sum 1 here), e.g. a word's attention over image regions.
        masks: ``[B, R, H, W]`` the region each row should cover, at any resolution; area-pooled to
            ``grid`` and normalised, so a position counts by how much of it the mask covers.
        grid: ``(h, w)``.
        valid: ``[B, R]`` bool, the rows to count (default all); rows with an empty mask never count.

    Zero when every map is its mask; no host synchronisation (0 when no row counts).
    """
    want = F.adaptive_avg_pool2d(masks.float(), grid).flatten(2)  # (B, R, h*w)
    mass = want.sum(-1)
    rows = mass > 0 if valid is None else valid & (mass > 0)
    want = want / mass[..., None].clamp_min(1e-12)
    have = maps.float() / maps.float().sum(-1, keepdim=True).clamp_min(1e-12)
    kl = (want * (want.clamp_min(1e-12).log() - have.clamp_min(1e-8).log())).sum(-1)  # (B, R)
    rows = rows.float()
    return (kl * rows).sum() / rows.sum().clamp_min(1.0)


def token_targets(
    words: Sequence[Sequence[WordSpan]],
    word_masks: Sequence[dict[int, torch.Tensor]],
    tokens: int,
    size: tuple[int, int],
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token, the mask of the object its word names: ``targets [B, S, H, W]`` float, ``valid [B, S]`` bool."""
    b = len(words)
    targets = torch.zeros(b, tokens, *size)
    valid = torch.zeros(b, tokens, dtype=torch.bool)
    for i, (spans, masks) in enumerate(zip(words, word_masks)):
        for index, mask in masks.items():
            span = spans[index]
            targets[i, span.start : span.end] = mask.float()
            valid[i, span.start : span.end] = True
    return targets.to(device), valid.to(device)


class TokenTargets:
    """The per-token object masks a batch's captions name, made once and shared by the losses that read them.

    Args:
        words: per sample, the word spans of its tokens (``Context.words``).
        word_masks: per sample, word index -> ``[H, W]`` mask of the object that word names.
        tokens: S, the padded token count.
        size: ``(H, W)`` of the masks.
        device: where the targets go.
        keep: ``[B]`` bool, the samples whose words count (e.g. not the captions dropped for guidance).
        reading_masks: the same form as ``word_masks``, the words the reading loss spreads an object's
            positions over (default ``word_masks``; the shapes task adds each object's place word).
    """

    def __init__(
        self,
        words: Sequence[Sequence[WordSpan]],
        word_masks: Sequence[dict[int, torch.Tensor]],
        tokens: int,
        size: tuple[int, int],
        device: torch.device | str | None = None,
        keep: torch.Tensor | None = None,
        reading_masks: Sequence[dict[int, torch.Tensor]] | None = None,
    ) -> None:
        self.words, self.word_masks, self.tokens, self.size, self.device = words, word_masks, tokens, size, device
        self.keep, self.reading_masks = keep, reading_masks

    def _of(self, masks: Sequence[dict[int, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        targets, valid = token_targets(self.words, masks, self.tokens, self.size, self.device)
        if self.keep is not None:
            valid = valid & self.keep[:, None]
        return targets, valid, self.size

    def named(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """``(targets [B, S, H, W], valid [B, S], size)`` of the words ``word_masks`` names."""
        return self._of(self.word_masks)

    def reading(self) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """The same for the reading loss's words (``reading_masks``, else ``word_masks``)."""
        return self._of(self.word_masks if self.reading_masks is None else self.reading_masks)

    def is_named(self) -> torch.Tensor:
        """``[B, S]`` bool: the tokens of the words ``word_masks`` names (whether or not ``keep`` drops them)."""
        return token_targets(self.words, self.word_masks, self.tokens, self.size, self.device)[1]


class GroundingCapture(AttentionCapture):
    """:class:`AttentionCapture` of a UNet's cross-attention calls, with grounding losses on their maps.

    Each call's probabilities (mean over heads, ``[B, L, S]``) are computed once and shared by the
    losses, so a training step that asks for several pays for the softmax once.
    """

    def _layer_maps(self, image_size: tuple[int, int]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Per captured call: ``(probs [B, L, S], grid (h, w) of its L query positions)``."""
        cached = getattr(self, "_maps", None)
        if cached is None or cached[0] != (len(self.calls), tuple(image_size)):
            maps = [
                (probs := attention_probs(q, k, mask, scale=scale).mean(1), query_grid(image_size, probs.shape[1]))
                for q, k, mask, scale in self.calls
            ]
            cached = self._maps = ((len(self.calls), tuple(image_size)), maps)
        return cached[1]

    @staticmethod
    def _mean(losses: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack(losses).mean() if losses else torch.zeros(())

    def grounding_loss(self, targets: torch.Tensor, valid: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Mean over layers of the mean over valid tokens of ``(1 - inside / total)^2``."""
        losses = []
        for probs, grid in self._layer_maps(image_size):  # probs (B, L, S), fully masked rows are zeros
            b, _, s = probs.shape
            maps = probs.transpose(1, 2).reshape(b, s, *grid)  # (B, S, h, w)
            inside_mask = F.adaptive_avg_pool2d(targets[:, :s], grid)  # (B, S, h, w) share of the cell inside
            inside = (maps * inside_mask).sum((2, 3))
            total = maps.sum((2, 3)).clamp_min(1e-6)
            per_token = (1 - inside / total) ** 2  # (B, S)
            v = valid[:, :s].float()
            losses.append((per_token * v).sum() / v.sum().clamp_min(1.0))
        return self._mean(losses)

    def coverage_loss(self, targets: torch.Tensor, valid: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Mean over layers and valid tokens of KL(object mask || the token's map), each normalised over
        the query positions: the map must cover its whole object, not just lie inside it (a single
        peak inside the object costs nothing in :meth:`grounding_loss`, but a lot here).

        Args: as for :meth:`grounding_loss` (``targets [B, S, H, W]``, ``valid [B, S]``).
        """
        return self._mean(
            [  # each token's map over the query positions
                mask_kl(probs.transpose(1, 2), targets[:, : probs.shape[2]], grid, valid[:, : probs.shape[2]])
                for probs, grid in self._layer_maps(image_size)
            ]
        )

    def reading_loss(
        self,
        targets: torch.Tensor,
        valid: torch.Tensor,
        image_size: tuple[int, int],
        min_cover: float | torch.Tensor = 0.0,
    ) -> torch.Tensor:
        """Mean over layers of KL(the object's words || a position's attention over the tokens), at the
        query positions an object covers, each weighted by how much of it the object covers.

        The target spreads a position's attention evenly over the valid tokens of the object(s) there
        (colour and shape words): a region inside "a blue circle" must read "circle" as much as
        "blue", not draw the shape the colour usually had. Args: as for :meth:`grounding_loss`, and
        ``min_cover``: a token is left out of the target of the positions (map cells) its object
        covers less of; a float for every token or ``[B, S]`` per token. A cell on an object's edge
        asked to read only the object's words pulls those words' maps past the object; 0.5 keeps
        the cells that lie mostly inside.
        """
        if not torch.is_tensor(min_cover) and not 0.0 <= min_cover <= 1.0:
            raise ValueError(f"min_cover must be in [0, 1]; got {min_cover}")
        losses = []
        for probs, grid in self._layer_maps(image_size):  # probs (B, L, S)
            s = probs.shape[2]
            cover = F.adaptive_avg_pool2d(targets[:, :s], grid).flatten(2) * valid[:, :s, None]  # (B, S, L)
            cover = cover * (cover >= (min_cover[:, :s, None] if torch.is_tensor(min_cover) else min_cover))
            want = cover.transpose(1, 2)  # (B, L, S): which tokens name what covers each position
            weight = want.amax(-1)  # (B, L)
            want = want / want.sum(-1, keepdim=True).clamp_min(1e-12)
            kl = (want * (want.clamp_min(1e-12).log() - probs.clamp_min(1e-8).log())).sum(-1)  # (B, L)
            losses.append((kl * weight).sum() / weight.sum().clamp_min(1.0))
        return self._mean(losses)
