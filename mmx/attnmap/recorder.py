"""Record cross-attention maps while the model's output keeps coming from fused attention.

For every cross-attention call the recorder computes ``softmax(Q K^T * scale + mask)`` for the
conditional rows only, sums over heads at once, resamples the map of each layer to one grid and
adds it into a float32 running sum per token: memory does not grow with the number of sampling
steps (in the spirit of DAAM, Tang et al. 2023, without storing every map).

Works on mmx models (through :meth:`mmx.nn.CrossAttention.add_hook`) and on diffusers'
``UNet2DConditionModel`` (through an attention processor that records and then delegates to the
original processor, so outputs stay bit-identical).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmx.attnmap.grid import query_grid
from mmx.attnmap.taps import tap_cross_attention
from mmx.context import current_conditional_rows
from mmx.nn.attention import attention_probs

__all__ = ["AttentionRecorder"]

logger = logging.getLogger(__name__)

LayerFilter = Callable[[str], bool]


def _layer_filter(layers: Sequence[str] | LayerFilter | None) -> LayerFilter:
    if layers is None:
        return lambda name: True
    if callable(layers):
        return layers
    wanted = tuple(layers)
    return lambda name: any(part in name for part in wanted)


class AttentionRecorder:
    """Context manager that streams text-to-region attention of a model into per-token sums.

    Args:
        model: an mmx model (any module holding cross-attention :class:`CrossAttention`) or a
            diffusers ``UNet2DConditionModel`` (directly or wrapped, e.g. ``DiffusersUNet2D``).
        image_size: ``(H, W)`` of the image the queries come from; each layer's query count L must
            be ``(H / f) * (W / f)`` for some integer downsampling f (non-square images work).
            For sequence models (a 1D UNet over an action chunk) pass the sequence length T as an
            int: each layer's L queries are resampled (linearly) to T steps, maps are ``[B, S, 1, T]``.
        grid: ``(h, w)`` of the common grid the maps are resampled to (default: ``image_size``
            divided by the smallest downsampling factor seen, i.e. the finest attention layer).
        layers: substrings of module names to keep, or a predicate on the name (None: every
            cross-attention layer).
        steps: which sampling steps to record, as a predicate on the step index (None: all).
        max_downsample: record only layers whose maps are at most this many times coarser than
            the image (``H / h``; for sequences ``T / L``), e.g. 4 keeps the 8x8 maps of a 32x32
            image and skips the 4x4 ones. Coarse maps blur small objects when they are resampled
            and summed with fine ones (Prompt-to-Prompt reads Stable Diffusion's 16x16 maps only
            for that reason). None: every resolution.
        per_layer: also keep one running sum per layer.
        window: also keep running sums per window of this many steps (e.g. for a GIF over steps).
        guidance_order: used only when the caller declared no conditional rows (e.g. a diffusers
            pipeline) and the batch is twice ``num_prompts``: "uncond_first" (diffusers'
            pipelines) or "cond_first" (mmx's sampler).
        num_prompts: the number of prompts, for that case.

    Call :meth:`callback` after every sampling step (it is a valid ``mmx.diffusion.sample``
    callback) so step filters and windows know where they are.
    """

    def __init__(
        self,
        model: nn.Module,
        image_size: tuple[int, int] | int,
        grid: tuple[int, int] | None = None,
        layers: Sequence[str] | LayerFilter | None = None,
        steps: Callable[[int], bool] | None = None,
        max_downsample: float | None = None,
        per_layer: bool = False,
        window: int | None = None,
        guidance_order: str = "uncond_first",
        num_prompts: int | None = None,
    ) -> None:
        if guidance_order not in ("uncond_first", "cond_first"):
            raise ValueError(f"guidance_order must be 'uncond_first' or 'cond_first'; got {guidance_order!r}")
        if window is not None and window < 1:
            raise ValueError(f"window must be a positive number of steps; got {window}")
        if max_downsample is not None and not max_downsample >= 1:
            raise ValueError(
                f"max_downsample must be >= 1 (1: only maps at the image's own resolution); got {max_downsample}"
            )
        self.model = model
        self.sequence = isinstance(image_size, int)
        self.image_size = (1, int(image_size)) if self.sequence else (int(image_size[0]), int(image_size[1]))
        self.grid = (1, self.image_size[1]) if self.sequence and grid is None else grid
        self.keep_layer = _layer_filter(layers)
        self.keep_step = steps or (lambda step: True)
        self.max_downsample = max_downsample
        self.skipped_layers: dict[str, tuple[int, int]] = {}  # too coarse for max_downsample: name -> (h, w)
        self.layer_grids: dict[str, tuple[int, int]] = {}  # recorded layers: name -> their own (h, w)
        self.per_layer = per_layer
        self.window = window
        self.guidance_order = guidance_order
        self.num_prompts = num_prompts
        self.step = 0
        self.calls = 0
        self.total: torch.Tensor | None = None  # (B, S, h, w) float32
        self.layer_totals: dict[str, torch.Tensor] = {}
        self.window_totals: dict[int, torch.Tensor] = {}
        self._undo: list[Callable[[], None]] = []

    # -- attaching -------------------------------------------------------------------------------
    def __enter__(self) -> AttentionRecorder:
        self._undo = tap_cross_attention(self.model, self.record, self.keep_layer)
        found = len(self._undo)
        if found == 0:
            raise ValueError(f"no cross-attention layer matched in {type(self.model).__name__}")
        self.layers_attached = found
        return self

    def __exit__(self, *exc: Any) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def callback(self, step: int, t: Any = None, x: Any = None) -> None:
        """Sampling-step callback: the next calls belong to step ``step + 1``."""
        self.step = step + 1

    def reset(self) -> None:
        """Forget everything recorded (hooks stay attached)."""
        self.step, self.calls, self.total = 0, 0, None
        self.skipped_layers.clear()
        self.layer_grids.clear()
        self.layer_totals.clear()
        self.window_totals.clear()

    # -- recording -------------------------------------------------------------------------------
    def _rows(self, batch: int) -> slice:
        declared = current_conditional_rows()
        if declared is not None:
            return declared
        if self.num_prompts is not None and batch == 2 * self.num_prompts:
            half = self.num_prompts
            return slice(half, batch) if self.guidance_order == "uncond_first" else slice(0, half)
        return slice(0, batch)

    @torch.no_grad()
    def record(self, name: str, q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> None:
        """Add the head-summed probabilities of one call, ``q [B, H, L, D]``, ``k [B, H, S, D]``."""
        if not self.keep_step(self.step):
            return
        h, w = (1, q.shape[2]) if self.sequence else query_grid(self.image_size, q.shape[2])
        if (
            self.max_downsample is not None
            and max(self.image_size[0] / h, self.image_size[1] / w) > self.max_downsample
        ):
            self.skipped_layers[name] = (h, w)
            return
        rows = self._rows(q.shape[0])
        q, k = q[rows], k[rows]
        if mask is not None and mask.shape[0] != 1:
            mask = mask[rows]
        probs = attention_probs(q, k, mask, scale=scale).sum(dim=1)  # (B, L, S): summed over heads
        b, l, s = probs.shape
        maps = probs.transpose(1, 2).reshape(b, s, h, w)  # (B, S, h, w)
        self.layer_grids[name] = (h, w)
        if self.grid is None:
            self.grid = (h, w)
        if (h, w) != tuple(self.grid):
            maps = F.interpolate(maps, size=self.grid, mode="bilinear", align_corners=False)
        self.total = _accumulate(self.total, maps, name)
        if self.per_layer:
            self.layer_totals[name] = _accumulate(self.layer_totals.get(name), maps, name)
        if self.window:
            key = self.step // self.window
            self.window_totals[key] = _accumulate(self.window_totals.get(key), maps, name)
        self.calls += 1

    # -- results ---------------------------------------------------------------------------------
    def maps(self) -> torch.Tensor:
        """The running sum ``[B, S, h, w]`` (float32) over heads, layers and recorded steps."""
        if self.total is None:
            if self.skipped_layers:
                grids = sorted({f"{h}x{w}" for h, w in self.skipped_layers.values()})
                raise RuntimeError(
                    f"nothing was recorded: every layer's maps ({', '.join(grids)}) are coarser than max_downsample="
                    f"{self.max_downsample} allows for an image of {self.image_size[0]}x{self.image_size[1]}"
                )
            raise RuntimeError("nothing was recorded: run the model inside `with recorder:`")
        return self.total

    def memory_bytes(self) -> int:
        """Bytes held by the running sums."""
        tensors = [self.total, *self.layer_totals.values(), *self.window_totals.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _accumulate(total: torch.Tensor | None, maps: torch.Tensor, name: str) -> torch.Tensor:
    if total is None:
        return maps.clone()
    if total.shape != maps.shape:
        raise ValueError(
            f"layer {name}: maps of shape {tuple(maps.shape)} cannot join the running sum {tuple(total.shape)}; "
            "record one batch of prompts at a time (recorder.reset() between batches)"
        )
    return total.add_(maps)
