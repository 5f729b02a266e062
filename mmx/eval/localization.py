"""How well attention maps localize: threshold the normalised map, IoU with the object's mask.

As in DAAM (Tang et al. 2023): min-max normalise each word's map, threshold (default 0.4), and
compare with the ground-truth mask of the object the word names.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmx.data.shapes import PALETTE, SHAPES
from mmx.eval.detector import Claim, Detection, parse_caption

__all__ = ["binarize", "iou", "object_words", "word_ious", "word_pointing", "detection_masks"]


def binarize(heat: torch.Tensor, threshold: float = 0.4) -> torch.Tensor:
    """Min-max normalise ``heat [H, W]`` and keep positions at or above ``threshold`` (bool)."""
    lo, hi = heat.min(), heat.max()
    return ((heat - lo) / (hi - lo).clamp_min(1e-12)) >= threshold


def iou(a: torch.Tensor, b: torch.Tensor) -> float:
    """Intersection over union of two bool masks of the same shape (1.0 when both are empty)."""
    if a.shape != b.shape:
        raise ValueError(f"masks must have the same shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    union = (a | b).sum().item()
    return 1.0 if union == 0 else (a & b).sum().item() / union


def object_words(caption: str) -> list[tuple[Claim, int, int]]:
    """Each claimed object with the indices of its colour word and shape word in ``caption.split()``."""
    words = caption.split()
    out, cursor = [], 0
    for claim in parse_caption(caption):
        colour = next(i for i in range(cursor, len(words)) if words[i] == claim.colour)
        shape = next(i for i in range(colour, len(words)) if words[i] == claim.shape)
        out.append((claim, colour, shape))
        cursor = shape + 1
    return out


def detection_masks(caption: str, detections: Sequence[Detection]) -> dict[int, torch.Tensor]:
    """Masks of detected objects that match the caption's claims, keyed by the naming words' indices."""
    masks: dict[int, torch.Tensor] = {}
    used: set[int] = set()
    for claim, colour_word, shape_word in object_words(caption):
        for i, det in enumerate(detections):
            if i not in used and det.as_claim() == claim:
                used.add(i)
                mask = torch.as_tensor(det.mask, dtype=torch.bool)
                masks[colour_word] = masks[shape_word] = mask
                break
    return masks


def word_ious(word_maps: Sequence, masks: dict[int, torch.Tensor], threshold: float = 0.4) -> dict[int, float]:
    """IoU of each word's thresholded map with the mask of the object it names (words without one skipped).

    ``word_maps``: :class:`mmx.attnmap.WordMap` list of one prompt, at the masks' resolution.
    ``masks``: word index -> ``[H, W]`` bool (the data set's ``word_masks``, or :func:`detection_masks`).
    """
    scores = {}
    for word_map in word_maps:
        mask = masks.get(word_map.index)
        if mask is None or word_map.word not in PALETTE and word_map.word not in SHAPES:
            continue
        scores[word_map.index] = iou(binarize(word_map.map, threshold), mask.to(word_map.map.device))
    return scores


def word_pointing(word_maps: Sequence, masks: dict[int, torch.Tensor]) -> dict[int, bool]:
    """Pointing game (Zhang et al. 2016): does each object word's map peak inside its object's mask?

    Arguments as :func:`word_ious`; complements the IoU for peaked maps that point at the right
    object but cover only part of it.
    """
    hits = {}
    for word_map in word_maps:
        mask = masks.get(word_map.index)
        if mask is None or word_map.word not in PALETTE and word_map.word not in SHAPES:
            continue
        peak = int(word_map.map.argmax())
        hits[word_map.index] = bool(mask.flatten()[peak])
    return hits
