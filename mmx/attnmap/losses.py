"""Training losses on a model's own cross-attention, as objects every recipe names alike.

A recipe's config lists them, each with its weight::

    attention_losses:
      - {name: coverage, weight: 0.05}     # each object word's map covers its object
      - {name: reading, weight: 0.1}       # each position of an object reads its words alike

The data decide what the maps are compared with (object masks), so each recipe says which of
these it can feed (:func:`build_attention_losses` checks that, and names the valid ones).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch

from mmx.attnmap.capture import GroundingCapture, TokenTargets, mask_kl
from mmx.registry import Registry

__all__ = ["ATTENTION_LOSSES", "AttentionLoss", "Coverage", "Inside", "MaskKL", "Reading", "build_attention_losses"]

ATTENTION_LOSSES: Registry = Registry("attention loss")


class AttentionLoss:
    """One weighted loss on attention maps. Subclasses define ``__call__``, returning ``weight * loss``."""

    name = ""

    def __init__(self, weight: float) -> None:
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not weight >= 0:
            raise ValueError(f"attention loss {self.name!r}: weight must be a number >= 0; got {weight!r}")
        self.weight = float(weight)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(weight={self.weight})"


@ATTENTION_LOSSES.register("inside")
class Inside(AttentionLoss):
    """Each object word's map over the image lies inside its object: ``(1 - inside / total)^2`` per word."""

    name = "inside"

    def __call__(self, capture: GroundingCapture, targets: TokenTargets) -> torch.Tensor:
        return self.weight * capture.grounding_loss(*targets.named())


@ATTENTION_LOSSES.register("coverage")
class Coverage(AttentionLoss):
    """Each object word's map covers its whole object: KL(object mask || the word's map over positions)."""

    name = "coverage"

    def __call__(self, capture: GroundingCapture, targets: TokenTargets) -> torch.Tensor:
        return self.weight * capture.coverage_loss(*targets.named())


@ATTENTION_LOSSES.register("reading")
class Reading(AttentionLoss):
    """Each position inside an object reads that object's words alike: KL(its words || the position's attention).

    Args:
        weight: the loss weight.
        min_cover: a word leaves the target of the map cells its object covers less of (0: every
            cell it touches).
        extra_min_cover: the same for the words the data add for reading only (the shapes task's
            place words; ``TokenTargets.reading_masks``); None: ``min_cover``.
    """

    name = "reading"

    def __init__(self, weight: float, min_cover: float = 0.0, extra_min_cover: float | None = None) -> None:
        super().__init__(weight)
        for key, value in (("min_cover", min_cover), ("extra_min_cover", extra_min_cover)):
            if value is not None and not 0.0 <= value <= 1.0:
                raise ValueError(f"attention loss 'reading': {key} must be in [0, 1]; got {value}")
        self.min_cover = min_cover
        self.extra_min_cover = min_cover if extra_min_cover is None else extra_min_cover

    def __call__(self, capture: GroundingCapture, targets: TokenTargets) -> torch.Tensor:
        min_cover: float | torch.Tensor = self.min_cover
        if targets.reading_masks is not None and self.extra_min_cover != self.min_cover:
            min_cover = torch.where(targets.is_named(), self.min_cover, self.extra_min_cover)  # [B, S]
        return self.weight * capture.reading_loss(*targets.reading(), min_cover)


@ATTENTION_LOSSES.register("mask_kl")
class MaskKL(AttentionLoss):
    """Each query's attention over image regions covers a mask evenly: KL(mask || attention) (Liu et al. 2017).

    ``__call__(maps [B, R, h*w], masks [B, R, H, W], grid)``: the rows are whatever attends (an action
    chunk per frame, a written word), the masks what each row should read.
    """

    name = "mask_kl"

    def __call__(
        self, maps: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int], valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.weight * mask_kl(maps, masks, grid, valid)


def build_attention_losses(specs: Sequence[dict], supported: Sequence[str], recipe: str) -> list[AttentionLoss]:
    """The loss objects of a config's ``attention_losses`` (``{name: ..., weight: ..., ...}`` each).

    ``supported``: the names the recipe can feed; another is an error naming the valid ones.
    """
    losses = []
    for spec in specs or ():
        name = spec.get("name") if isinstance(spec, dict) else None
        if name not in supported:
            raise ValueError(
                f"attention_losses: the {recipe} recipe takes {', '.join(supported)}; got {spec!r} "
                f"(every attention loss: {', '.join(ATTENTION_LOSSES.names())})"
            )
        if "weight" not in spec:
            raise ValueError(f"attention_losses: {name!r} needs a weight, e.g. {{name: {name}, weight: 0.1}}")
        losses.append(ATTENTION_LOSSES.build_from_dict(dict(spec)))
    return losses
