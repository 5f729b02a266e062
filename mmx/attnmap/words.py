"""From per-token attention sums to per-word heat maps, through ``Context.words``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mmx.context import WordSpan

__all__ = ["WordMap", "word_maps", "normalize_map", "NORMALIZATIONS"]

NORMALIZATIONS = ("minmax", "sum", "none")


@dataclass
class WordMap:
    """One word's heat map ``[H, W]`` and where the word stands in its caption."""

    word: str
    index: int  # position among the caption's whitespace words; -1 / -2 for start / end tokens
    span: WordSpan
    map: torch.Tensor


def normalize_map(heat: torch.Tensor, how: str = "minmax") -> torch.Tensor:
    """``minmax`` to [0, 1], ``sum`` to a distribution over positions, or ``none``."""
    if how == "minmax":
        lo, hi = heat.amin(dim=(-2, -1), keepdim=True), heat.amax(dim=(-2, -1), keepdim=True)
        return (heat - lo) / (hi - lo).clamp_min(1e-12)
    if how == "sum":
        return heat / heat.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    if how == "none":
        return heat
    raise ValueError(f"unknown normalization {how!r}; valid: {', '.join(NORMALIZATIONS)}")


def word_maps(
    maps: torch.Tensor,
    words: Sequence[Sequence[WordSpan]],
    image_size: tuple[int, int] | None = None,
    normalize: str = "minmax",
    mask: torch.Tensor | None = None,
    special_tokens: bool = False,
) -> list[list[WordMap]]:
    """Per sample, one heat map per whitespace word (a word of several tokens averages them).

    Args:
        maps: ``[B, S, h, w]`` per-token sums from :class:`AttentionRecorder`.
        words: ``Context.words``: per sample, the :class:`WordSpan` of each word.
        image_size: ``(H, W)`` to resize the maps to (bilinear); None keeps ``(h, w)``.
        normalize: ``"minmax"``, ``"sum"`` or ``"none"``.
        mask: ``[B, S]`` Context mask, needed for ``special_tokens`` (to find the end token).
        special_tokens: also return the start token (index -1) and the last real token (index -2).
    """
    if maps.ndim != 4:
        raise ValueError(f"maps must be [B, S, h, w]; got {tuple(maps.shape)}")
    if len(words) != maps.shape[0]:
        raise ValueError(f"words has {len(words)} samples but maps has B={maps.shape[0]}")
    if special_tokens and mask is None:
        raise ValueError("special_tokens=True needs the Context mask to find each caption's end token")
    if image_size is not None:
        maps = F.interpolate(maps, size=tuple(image_size), mode="bilinear", align_corners=False)
    out: list[list[WordMap]] = []
    for b, spans in enumerate(words):
        row = []
        for index, span in enumerate(spans):
            if span.end <= span.start:  # cut by truncation: no tokens, no map
                continue
            heat = maps[b, span.start : span.end].mean(dim=0)
            row.append(WordMap(span.word, index, span, normalize_map(heat, normalize)))
        if special_tokens:
            last = int(mask[b].sum()) - 1
            for index, (label, position) in zip((-1, -2), (("<start>", 0), ("<end>", last))):
                row.append(
                    WordMap(
                        label,
                        index,
                        WordSpan(label, position, position + 1),
                        normalize_map(maps[b, position], normalize),
                    )
                )
        out.append(row)
    return out
