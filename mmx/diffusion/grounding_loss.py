"""A token-level grounding loss on cross-attention (in the spirit of TokenCompose, Wang et al. 2024).

For each word that names an object, the attention its tokens receive should fall inside that
object's mask: ``(1 - attention inside / attention total)^2``, averaged over layers and words.
Computed from the same q/k the model used (through CrossAttention hooks), with gradients.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mmx.context import WordSpan
from mmx.nn.attention import CrossAttention, attention_probs, query_grid

__all__ = ["token_targets", "AttentionCapture"]


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


class AttentionCapture:
    """Context manager keeping the q/k/mask of every cross-attention call, for a loss on the maps."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.calls: list[tuple[torch.Tensor, torch.Tensor, Any, float]] = []
        self._undo: list = []

    def __enter__(self) -> "AttentionCapture":
        for module in self.model.modules():
            if isinstance(module, CrossAttention) and module.is_cross:
                self._undo.append(module.add_hook(lambda m, q, k, mask: self.calls.append((q, k, mask, m.scale))))
        return self

    def __exit__(self, *exc: Any) -> None:
        for undo in self._undo:
            undo()

    def grounding_loss(self, targets: torch.Tensor, valid: torch.Tensor, image_size: tuple[int, int]) -> torch.Tensor:
        """Mean over layers of the mean over valid tokens of ``(1 - inside / total)^2``."""
        losses = []
        for q, k, mask, scale in self.calls:
            probs = attention_probs(q, k, mask, scale=scale).mean(1)  # (B, L, S), fully masked rows are zeros
            b, l, s = probs.shape
            grid = query_grid(image_size, l)
            maps = probs.transpose(1, 2).reshape(b, s, *grid)  # (B, S, h, w)
            inside_mask = F.adaptive_avg_pool2d(targets[:, :s], grid)  # (B, S, h, w) share of the cell inside
            inside = (maps * inside_mask).sum((2, 3))
            total = maps.sum((2, 3)).clamp_min(1e-6)
            per_token = (1 - inside / total) ** 2  # (B, S)
            v = valid[:, :s].float()
            losses.append((per_token * v).sum() / v.sum().clamp_min(1.0))
        return torch.stack(losses).mean() if losses else torch.zeros(())
