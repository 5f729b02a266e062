"""Encoder and decoder stacks of the encoder-decoder Transformer (Vaswani et al., 2017).

The decoder is the cross-attention pattern of mmx once more: its queries are the target tokens
generated so far, its keys and values the encoder memory (source tokens, image regions). Blocks
are mmx :class:`~mmx.nn.transformer.TransformerBlock` s (pre-norm, GELU feed-forward), so the
decoder's cross-attention is recorded by the attention recorder like any other.

Step-by-step decoding keeps a :class:`DecoderCache`: per layer the keys/values of the tokens fed
so far (self-attention) and of the projected memory (cross-attention), so every step projects one
new token only. Fed one token at a time with a cache, the decoder gives the same logits as one
forward over the whole sequence.

Letters: B batch, S source/memory tokens, T target tokens, D = ``d_model``, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mmx.context import Context, unpack_context
from mmx.nn.conditioning import timestep_embedding
from mmx.nn.transformer import BlockCache, TransformerBlock

__all__ = [
    "sinusoidal_positions",
    "positions_from_mask",
    "check_key_mask",
    "TransformerEncoder",
    "TransformerDecoder",
    "DecoderCache",
]


def sinusoidal_positions(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Vaswani et al.'s sinusoids ``[B, T, dim]`` of integer positions ``[B, T]`` (float32).

    Channel ``i < dim/2`` is ``sin(p / 10000^(2i/dim))``, channel ``dim/2 + i`` the matching cosine
    (the paper's interleaved layout, permuted into two halves).
    """
    if not isinstance(positions, torch.Tensor) or positions.ndim != 2:
        got = tuple(positions.shape) if isinstance(positions, torch.Tensor) else type(positions).__name__
        raise ValueError(f"positions must be [B, T]; got {got}")
    b, t = positions.shape
    return timestep_embedding(positions.reshape(-1), dim, freq_shift=0.0).view(b, t, dim)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, T]`` (long) counted over real tokens only: ``cumsum(mask) - 1``, clamped at 0.

    The first real token is position 0 whether the padding sits on the left or on the right, so
    padding on either side changes nothing. Padding positions get the position of the last real
    token before them (0 before the first).
    """
    check_key_mask(mask, -1, -1, "mask")
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def check_key_mask(mask: torch.Tensor | None, batch: int, length: int, name: str = "mask") -> None:
    """Raise unless ``mask`` is None or a bool ``[batch, length]`` tensor (True = real token).

    ``batch < 0`` accepts any ``[B, T]``.
    """
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a bool tensor [B, T] (True = real token) or None; got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must be bool (True = real token); got {mask.dtype}. A 0/1 integer mask converts with mask.bool()"
        )
    if mask.ndim != 2 or (batch >= 0 and tuple(mask.shape) != (batch, length)):
        expected = "[B, T]" if batch < 0 else f"[B, T] = {(batch, length)}"
        raise ValueError(f"{name} must be {expected}; got {tuple(mask.shape)}")


def _check_width(x: torch.Tensor, d_model: int, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != d_model:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{name} must be [B, S, d_model={d_model}]; got {got}")


class TransformerEncoder(nn.Module):
    """Self-attention stack: ``x [B, S, D]`` (+ key padding ``mask [B, S]``) -> ``[B, S, D]``.

    ``layers`` pre-norm :class:`TransformerBlock` s (self-attention, GELU feed-forward) and a final
    LayerNorm. Positions must already be added to ``x``. Outputs at padded positions are not
    meaningful (they are never attended to when the same mask is used downstream).
    """

    def __init__(
        self,
        d_model: int,
        heads: int = 4,
        dim_head: int | None = None,
        layers: int = 3,
        ff_mult: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        dim_head = _dim_head(d_model, heads, dim_head)
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"TransformerEncoder needs layers >= 1; got {layers!r}")
        self.d_model = d_model
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, None, heads, dim_head, ff_mult, dropout, self_attention=True, gated_ff=False)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, S, D]``, ``mask [B, S]`` bool (True = real token) or None -> ``[B, S, D]``."""
        _check_width(x, self.d_model, "x")
        check_key_mask(mask, x.shape[0], x.shape[1])
        for block in self.blocks:
            x = block(x, self_mask=mask)
        return self.norm(x)


@dataclass
class DecoderCache:
    """Everything a :class:`TransformerDecoder` keeps between decoding steps.

    Attributes:
        layers: one :class:`BlockCache` per decoder block (self-attention keys/values of the tokens
            fed so far, cross-attention keys/values of the projected memory).
        length: number of target positions fed so far (the next token's position when no mask).
        mask: ``[B, length]`` bool key padding of the fed positions, or None while every fed token
            was real (no ``tokens_mask`` given).
    """

    layers: list[BlockCache] = field(default_factory=list)
    length: int = 0
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.length

    def reorder(self, index: torch.Tensor, memory: bool = True) -> None:
        """Keep batch rows ``index`` ``[B']`` (e.g. the beams that survive a beam-search step).

        Reorders every layer's self-attention cache, the mask and, with ``memory``, the projected
        memory. Beam search passes ``memory=False``: its beams only move among the rows of one
        input, whose memory rows are equal, so copying them would change nothing.
        """
        for layer in self.layers:
            if memory:
                layer.reorder(index)
            else:
                layer.self_attn.reorder(index)
        if self.mask is not None:
            self.mask = self.mask.index_select(0, index.to(self.mask.device))

    def reset(self) -> None:
        """Forget all positions and the projected memory."""
        for layer in self.layers:
            layer.reset()
        self.length, self.mask = 0, None


class TransformerDecoder(nn.Module):
    """Causal decoder: target tokens ``[B, T]`` read a memory ``[B, S, context_dim]`` -> logits ``[B, T, V]``.

    Token embedding scaled by ``sqrt(d_model)`` + sinusoidal positions + dropout, ``layers``
    pre-norm :class:`TransformerBlock` s (causal self-attention, cross-attention to the memory,
    GELU feed-forward), a final LayerNorm and the output projection.

    Args:
        vocab_size: V.
        d_model: D.
        heads, dim_head: attention heads and width per head (None: ``d_model // heads``).
        layers: number of blocks.
        ff_mult: feed-forward hidden width as a multiple of D.
        dropout: dropout on the embeddings, in the attentions and the feed-forward.
        context_dim: width of the memory tokens (None: ``d_model``).
        tie_output: the output projection's weight is the token embedding (Press & Wolf, 2017);
            it then has its own bias ``out_bias`` and no ``out`` Linear, since safetensors (and so
            ``save_pretrained``) refuses parameters that share memory.
    """

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        heads: int = 4,
        dim_head: int | None = None,
        layers: int = 3,
        ff_mult: int = 4,
        dropout: float = 0.0,
        context_dim: int | None = None,
        tie_output: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int; got {vocab_size!r}")
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"TransformerDecoder needs layers >= 1; got {layers!r}")
        dim_head = _dim_head(d_model, heads, dim_head)
        self.vocab_size, self.d_model = vocab_size, d_model
        self.context_dim = context_dim or d_model
        self.tie_output = bool(tie_output)
        self.embed = nn.Embedding(vocab_size, d_model)
        # std D^-1/2: the sqrt(D)-scaled embedding has unit variance and tied logits start small.
        nn.init.normal_(self.embed.weight, std=d_model**-0.5)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, self.context_dim, heads, dim_head, ff_mult, dropout, gated_ff=False)
            for _ in range(layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self._position_table: torch.Tensor | None = None  # (N, D) sinusoids of positions 0..N-1, see _positions
        if self.tie_output:
            self.out_bias = nn.Parameter(torch.zeros(vocab_size))
        else:
            self.out = nn.Linear(d_model, vocab_size)

    def new_cache(self) -> DecoderCache:
        """An empty :class:`DecoderCache` with one :class:`BlockCache` per block."""
        return DecoderCache(layers=[BlockCache() for _ in self.blocks])

    def _positions(self, positions: torch.Tensor, limit: int | None = None) -> torch.Tensor:
        """``sinusoidal_positions(positions, D)`` read from a table that grows as needed (a plain
        attribute, not saved, rebuilt on a new device), so a decoding step does not recompute sines.

        ``limit``: a bound on the positions known on the host (all < limit); without it the bound is
        read from the tensor (one host synchronisation).
        """
        table = self._position_table
        needed = limit if limit is not None else (int(positions.max()) + 1 if positions.numel() else 0)
        if table is None or table.device != positions.device or table.shape[0] < needed:
            size = max(needed, 64 if table is None else 2 * table.shape[0])
            rows = torch.arange(size, device=positions.device)[None]  # (1, size)
            table = self._position_table = sinusoidal_positions(rows, self.d_model)[0]  # (size, D)
        return table[positions]  # (B, T, D)

    def embed_tokens(self, tokens: torch.Tensor, positions: torch.Tensor, limit: int | None = None) -> torch.Tensor:
        """``tokens [B, T]`` at ``positions [B, T]`` -> ``[B, T, D]`` (scaled embedding + sinusoids, dropout).

        ``limit``: every position is below it (known on the host; saves a synchronisation).
        """
        x = self.embed(tokens) * math.sqrt(self.d_model)
        x = x + self._positions(positions, limit).to(x.dtype)
        return self.dropout(x)

    def project_out(self, h: torch.Tensor) -> torch.Tensor:
        """Hidden states ``[B, T, D]`` -> logits ``[B, T, V]``."""
        if self.tie_output:
            return F.linear(h, self.embed.weight, self.out_bias)
        return self.out(h)

    def forward(
        self,
        tokens: torch.Tensor,
        memory: Context | torch.Tensor | None,
        memory_mask: torch.Tensor | None = None,
        tokens_mask: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """Logits ``[B, T, V]`` of the next token after each of ``tokens [B, T]``.

        Args:
            tokens: target ids ``[B, T]`` (integer); with a cache only the new ones.
            memory: the encoder output, a :class:`Context` (its mask is used) or ``[B, S, context_dim]``;
                may be None once ``cache`` holds the projected memory.
            memory_mask: ``[B, S]`` bool key padding of the memory (wins over the Context's).
            tokens_mask: ``[B, T]`` bool, True = real token: key padding of the self-attention;
                positions then count real tokens only (:func:`positions_from_mask`). None: all real,
                positions ``start .. start + T - 1``.
            cache: a :class:`DecoderCache` from :meth:`new_cache`; the tokens continue after the
                ``cache.length`` positions fed before, and the cache is updated in place.
        """
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 2:
            got = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be [B, T] token ids; got {got}")
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool or tokens.is_complex():
            raise TypeError(f"tokens must be integer token ids; got {tokens.dtype}")
        if cache is not None and not isinstance(cache, DecoderCache):
            raise TypeError(f"cache must be a DecoderCache or None; got {type(cache).__name__}")
        if cache is not None and len(cache.layers) != len(self.blocks):
            raise ValueError(f"the cache has {len(cache.layers)} layers but the decoder has {len(self.blocks)} blocks")
        b, t = tokens.shape
        check_key_mask(tokens_mask, b, t, "tokens_mask")
        memory, memory_mask = unpack_context(memory, memory_mask)
        start = 0 if cache is None else cache.length

        self_mask = None
        if tokens_mask is None and (cache is None or cache.mask is None):
            positions = torch.arange(start, start + t, device=tokens.device).expand(b, t)
        else:
            # Key padding over every position fed so far; positions count real tokens only.
            new = tokens_mask if tokens_mask is not None else torch.ones(b, t, dtype=torch.bool, device=tokens.device)
            old = None
            if cache is not None and start > 0:
                old = cache.mask if cache.mask is not None else new.new_ones(b, start)
                if old.shape[0] != b:
                    raise ValueError(f"the cache holds {old.shape[0]} batch rows but tokens have B={b}")
            self_mask = new if old is None else torch.cat([old, new], dim=1)  # (B, start + T)
            positions = positions_from_mask(self_mask)[:, start:]
            if cache is not None:
                cache.mask = self_mask

        x = self.embed_tokens(tokens, positions, limit=start + t)  # (B, T, D); positions < start + t
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache.layers[i]
            x = block(x, memory, mask=memory_mask, self_mask=self_mask, causal=True, cache=layer_cache)
        if cache is not None:
            cache.length = start + t
        return self.project_out(self.norm(x))


def _dim_head(d_model: int, heads: int, dim_head: int | None) -> int:
    """``dim_head``, or ``d_model // heads`` when None (then heads must divide d_model)."""
    for name, value in (("d_model", d_model), ("heads", heads)):
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive int; got {value!r}")
    if dim_head is None:
        if d_model % heads:
            raise ValueError(f"dim_head=None needs d_model divisible by heads; got d_model={d_model}, heads={heads}")
        return d_model // heads
    if not isinstance(dim_head, int) or dim_head <= 0:
        raise ValueError(f"dim_head must be a positive int or None; got {dim_head!r}")
    return dim_head
