"""Where a layer's queries sit on the image: the grid of an attention map."""

from __future__ import annotations

import math

__all__ = ["query_grid"]


def query_grid(image_size: tuple[int, int], queries: int) -> tuple[int, int]:
    """``(h, w)`` of the L queries of a layer that saw an ``(H, W)`` image downsampled by an integer f."""
    h, w = image_size
    f = round(math.sqrt(h * w / queries))
    if f < 1 or (h // f) * (w // f) != queries:
        raise ValueError(
            f"cannot lay {queries} queries on a grid of the {h}x{w} image (expected (H/f)*(W/f) for an integer f)"
        )
    return h // f, w // f
