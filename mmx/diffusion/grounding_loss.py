"""Token-level grounding losses on cross-attention (in the spirit of TokenCompose, Wang et al. 2024).

Seen from the words: each word that names an object should look at that object: its attention
should fall inside the mask (``inside``) or cover the whole mask (``coverage``). Seen from the
image: each position inside an object should read that object's words (``reading``), its colour
and its shape alike. Computed from the same q/k the model used (through CrossAttention hooks),
with gradients.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from mmx.context import WordSpan
from mmx.nn.attention import AttentionCapture, attention_probs, mask_kl, query_grid

__all__ = ["token_targets", "GroundingCapture"]


def token_targets(
    words: Sequence[Sequence[WordSpan]], word_masks: Sequence[dict[int, torch.Tensor]], tokens: int,
    size: tuple[int, int], device: torch.device | str | None = None,
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


class GroundingCapture(AttentionCapture):
    """:class:`~mmx.nn.AttentionCapture` of a UNet's cross-attention calls, with grounding losses on their maps.

    Each call's probabilities (mean over heads, ``[B, L, S]``) are computed once and shared by the
    losses, so a training step that asks for several pays for the softmax once.
    """

    def _layer_maps(self, image_size: tuple[int, int]) -> list[tuple[torch.Tensor, tuple[int, int]]]:
        """Per captured call: ``(probs [B, L, S], grid (h, w) of its L query positions)``."""
        cached = getattr(self, "_maps", None)
        if cached is None or cached[0] != (len(self.calls), tuple(image_size)):
            maps = [(probs := attention_probs(q, k, mask, scale=scale).mean(1), query_grid(image_size, probs.shape[1]))
                    for q, k, mask, scale in self.calls]
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
        return self._mean([  # each token's map over the query positions
            mask_kl(probs.transpose(1, 2), targets[:, : probs.shape[2]], grid, valid[:, : probs.shape[2]])
            for probs, grid in self._layer_maps(image_size)
        ])

    def reading_loss(
        self, targets: torch.Tensor, valid: torch.Tensor, image_size: tuple[int, int],
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
        the cells that lie mostly inside (BENCHMARKS.md, session 12, for what that did on shapes).
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
