"""Transformer blocks that let feature maps and sequences read a context.

``TransformerBlock`` is the pre-norm block of latent diffusion (Rombach et al., 2022):
self-attention, cross-attention to the context, GEGLU feed-forward (Shazeer, 2020), each residual.
``SpatialTransformer`` wraps it for ``[B, C, H, W]`` maps and ``TemporalTransformer`` for
``[B, C, T]`` sequences: normalise, project to tokens, run the blocks, project back (output
projection zero-initialised, so a freshly inserted block is the identity), add the input.
Parameter names follow diffusers' ``BasicTransformerBlock`` / ``Transformer2DModel``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmx.context import Context, unpack_context
from mmx.nn.attention import CrossAttention
from mmx.nn.kv_cache import KVCache
from mmx.nn.masks import check_input_dtype

__all__ = [
    "GEGLU",
    "FeedForward",
    "TransformerBlock",
    "BlockCache",
    "SpatialTransformer",
    "TemporalTransformer",
    "group_norm",
    "grid_fourier_features",
]

POSITION_INTO = ("tokens", "queries")  # where a _ChannelsTransformer adds its position embedding


def group_norm(channels: int, groups: int | None = None, eps: float = 1e-6) -> nn.GroupNorm:
    """GroupNorm over ``channels``; ``groups=None`` picks the largest divisor of channels up to 32."""
    if groups is None:
        groups = max(g for g in range(1, min(32, channels) + 1) if channels % g == 0)
    if not isinstance(groups, int) or groups <= 0 or channels % groups != 0:
        raise ValueError(f"norm groups must be a positive divisor of channels={channels}; got {groups!r}")
    return nn.GroupNorm(groups, channels, eps=eps, affine=True)


class GEGLU(nn.Module):
    """``a * gelu(b)`` where ``[a, b]`` is one linear projection split in two (Shazeer, 2020)."""

    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * F.gelu(gate)


class FeedForward(nn.Module):
    """Position-wise feed-forward ``dim -> mult*dim -> dim`` with a GEGLU (or GELU) hidden layer."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, gated: bool = True) -> None:
        super().__init__()
        inner = dim * mult
        act: nn.Module = GEGLU(dim, inner) if gated else nn.Sequential(nn.Linear(dim, inner), nn.GELU())
        self.net = nn.Sequential(act, nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@dataclass
class BlockCache:
    """The key/value caches of one :class:`TransformerBlock`: its self-attention and its cross-attention."""

    self_attn: KVCache = field(default_factory=KVCache)
    cross_attn: KVCache = field(default_factory=KVCache)

    def __len__(self) -> int:
        """Cached self-attention positions."""
        return len(self.self_attn)

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` ``[B']`` in both caches (see :meth:`KVCache.reorder`)."""
        self.self_attn.reorder(index)
        self.cross_attn.reorder(index)

    def reset(self) -> None:
        self.self_attn.reset()
        self.cross_attn.reset()


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + SelfAttn(LN x)``, ``x + CrossAttn(LN x, context)``, ``x + FF(LN x)``.

    Args:
        dim: token width of ``x``.
        context_dim: width of the context tokens; None builds no cross-attention.
        heads, dim_head: attention heads and width per head (shared by both attentions).
        ff_mult: hidden width of the feed-forward as a multiple of ``dim``.
        dropout: dropout in the attention outputs and the feed-forward.
        self_attention: build the self-attention sub-layer.
        gated_ff: GEGLU (True) or GELU (False) feed-forward.
        split_context: the cross-attention reads keys and values from the two halves of each
            context token (see :class:`~mmx.nn.CrossAttention`).
    """

    def __init__(
        self,
        dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        dropout: float = 0.0,
        self_attention: bool = True,
        gated_ff: bool = True,
        split_context: bool = False,
    ) -> None:
        super().__init__()
        if not self_attention and context_dim is None:
            raise ValueError("a TransformerBlock needs self_attention=True or a context_dim for cross-attention")
        self.dim = dim
        self.context_dim = context_dim
        self.norm1 = nn.LayerNorm(dim) if self_attention else None
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout=dropout) if self_attention else None
        self.norm2 = nn.LayerNorm(dim) if context_dim is not None else None
        self.attn2 = (
            CrossAttention(dim, context_dim, heads, dim_head, dropout=dropout, split_context=split_context)
            if context_dim
            else None
        )
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, ff_mult, dropout, gated=gated_ff)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | Context | None = None,
        mask: torch.Tensor | None = None,
        self_mask: torch.Tensor | None = None,
        causal: bool = False,
        cache: BlockCache | None = None,
        query_position: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [B, L, dim]`` reads ``context [B, S, context_dim]``; returns ``[B, L, dim]``.

        ``mask`` masks context tokens (a Context brings its own); ``self_mask`` and ``causal``
        apply to the self-attention. ``cache`` (a :class:`BlockCache`) makes step-by-step decoding
        incremental: ``x`` holds only the new positions, ``self_mask`` (if any) covers every cached
        position, and once the cross-attention cache is filled ``context`` may be None.
        ``query_position`` (``[L, dim]`` or ``[B, L, dim]``) is added to the cross-attention's
        queries only: it decides which tokens each position reads, never what is written back.
        """
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"TransformerBlock expects x [B, L, dim={self.dim}]; got {got}")
        check_input_dtype("x", x, self.norm3.weight)
        context, mask = unpack_context(context, mask)
        if cache is not None and not isinstance(cache, BlockCache):
            raise TypeError(f"cache must be a BlockCache or None; got {type(cache).__name__}")
        if self.attn1 is not None:
            x = x + self.attn1(
                self.norm1(x), mask=self_mask, causal=causal, cache=None if cache is None else cache.self_attn
            )
        if self.attn2 is not None:
            cross_cache = None if cache is None else cache.cross_attn
            if context is None and (cross_cache is None or cross_cache.is_empty):
                raise ValueError(f"this block cross-attends to a context of width {self.context_dim}; got context=None")
            queries = self.norm2(x) if query_position is None else self.norm2(x) + query_position
            x = x + self.attn2(queries, context, mask=mask, cache=cross_cache)
        elif context is not None:
            raise ValueError("this block was built without cross-attention (context_dim=None) but got a context")
        return x + self.ff(self.norm3(x))


def grid_fourier_features(
    grid: list[int] | tuple[int, ...],
    frequencies: int,
    device: torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Fourier features of each cell's position on a grid: ``[prod(grid), 2 * len(grid) * frequencies]``.

    Cell centres are placed in [-1, 1] along each axis, so a cell's features depend on where it
    lies in the map, not on the map's size; per axis ``sin`` and ``cos`` of ``pi * 2**k * coord``
    for ``k < frequencies``. Cells are in row-major order (as ``x.flatten(2)``).
    """
    axes = [(torch.arange(n, device=device, dtype=torch.float32) + 0.5) / max(n, 1) * 2 - 1 for n in grid]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))  # (L, dims)
    scales = math.pi * 2.0 ** torch.arange(frequencies, device=device, dtype=torch.float32)
    angles = (coords[:, :, None] * scales).flatten(1)  # (L, dims * F)
    return torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype or torch.float32)


class _ChannelsTransformer(nn.Module):
    """Shared body of Spatial/TemporalTransformer: ``[B, C, *grid]`` <-> ``[B, prod(grid), D]`` tokens."""

    spatial_dims: int = 2
    layout: str = "[B, C, H, W]"

    def __init__(
        self,
        channels: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        depth: int = 1,
        dropout: float = 0.0,
        self_attention: bool = True,
        ff_mult: int = 4,
        norm_groups: int | None = None,
        position_frequencies: int = 0,
        split_context: bool = False,
        position_into: str = "tokens",
    ) -> None:
        super().__init__()
        if not isinstance(position_frequencies, int) or position_frequencies < 0:
            raise ValueError(f"position_frequencies must be an int >= 0; got {position_frequencies!r}")
        if position_into not in POSITION_INTO:
            raise ValueError(f"position_into must be one of {', '.join(POSITION_INTO)}; got {position_into!r}")
        inner = heads * dim_head
        self.channels = channels
        self.context_dim = context_dim
        self.position_frequencies, self.position_into = position_frequencies, position_into
        self.norm = group_norm(channels, norm_groups)
        self.proj_in = nn.Linear(channels, inner)
        # Where each token sits, as Fourier features of its grid coordinates, projected and added to
        # the tokens (zero-initialised: a fresh block still starts as the identity).
        self.pos_proj = None
        if position_frequencies:
            self.pos_proj = nn.Linear(2 * self.spatial_dims * position_frequencies, inner)
            nn.init.zeros_(self.pos_proj.weight)
            nn.init.zeros_(self.pos_proj.bias)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(
                inner, context_dim, heads, dim_head, ff_mult, dropout, self_attention, split_context=split_context
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | Context | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Let every position of ``x`` read ``context``; returns a tensor shaped like ``x``."""
        if not isinstance(x, torch.Tensor) or x.ndim != 2 + self.spatial_dims or x.shape[1] != self.channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects x {self.layout} with C={self.channels}; got {got}")
        check_input_dtype("x", x, self.proj_in.weight)
        context, mask = unpack_context(context, mask)
        b, c, *grid = x.shape
        positions = math.prod(grid)
        group = self.channels // self.norm.num_groups
        if b * group * positions == 1:
            # torch refuses it too, but its message ("more than 1 value per channel when training")
            # blames channels and training, not the groups.
            raise ValueError(
                f"{type(self).__name__}: x {tuple(x.shape)} gives GroupNorm ({self.norm.num_groups} groups of "
                f"{group} channel) a single value per group to normalise; use a batch or feature map with "
                "more than one value per group, or fewer norm_groups"
            )
        # An empty grid (a 0-sized H, W or T) has nothing to normalise: GroupNorm refuses it, the rest is fine.
        normed = self.norm(x) if positions > 0 else x
        h = normed.flatten(2).transpose(1, 2)  # (B, L, C), L = prod(grid)
        h = self.proj_in(h)  # (B, L, D)
        position = None
        if self.pos_proj is not None:
            position = self.pos_proj(grid_fourier_features(grid, self.position_frequencies, h.device, h.dtype))
            if self.position_into == "tokens":
                h, position = h + position, None
        for block in self.transformer_blocks:
            h = block(h, context, mask=mask, query_position=position)
        h = self.proj_out(h).transpose(1, 2).reshape(b, c, *grid)  # (B, C, *grid)
        return x + h


class SpatialTransformer(_ChannelsTransformer):
    """Cross-attention for 2D maps: each of the H*W positions of ``x [B, C, H, W]`` is a query.

    Args:
        channels: C of the feature map.
        context_dim: width of the context tokens (None: self-attention only).
        heads, dim_head: attention heads; the inner token width is ``heads * dim_head``.
        depth: number of :class:`TransformerBlock`.
        dropout: dropout inside the blocks.
        self_attention: include self-attention among positions in each block.
        ff_mult: feed-forward expansion.
        norm_groups: GroupNorm groups (None: largest divisor of C up to 32).
        position_frequencies: if > 0, each position's token gets a learned projection of the
            Fourier features of its (row, column) in the map (:func:`grid_fourier_features`), so
            queries know where they are: words such as "left" or "top" can be read by place.
            Zero-initialised; 0 (default) adds nothing.
        split_context: keys from the first half of each context token, values from the second
            (see :class:`~mmx.nn.CrossAttention`).
        position_into: where that embedding goes: ``"tokens"`` (default: added to the tokens, so it
            also reaches the feature map) or ``"queries"`` (added only to the cross-attention's
            queries: place decides which words a position reads, and what it writes back is the
            words' values alone; with circular padding the network then has no other sense of
            absolute place, see :class:`~mmx.models.UNet2D`).
    """

    spatial_dims = 2
    layout = "[B, C, H, W]"


class TemporalTransformer(_ChannelsTransformer):
    """Cross-attention for sequences ``x [B, C, T]`` (e.g. an action chunk in a 1D UNet).

    Arguments as :class:`SpatialTransformer`; each of the T steps is a query.
    """

    spatial_dims = 1
    layout = "[B, C, T]"
