"""Multi-head scaled dot-product attention: one class for self- and cross-attention.

Queries come from ``x`` (image features, action steps, decoder tokens); keys and values come from
``context`` (text tokens, observation tokens, encoder memory), or from ``x`` itself when
``context`` is None (Vaswani et al., 2017, "Attention Is All You Need").

The output always comes from :func:`torch.nn.functional.scaled_dot_product_attention` (fused
kernels on GPU and CPU); attention probabilities are computed beside it, only when asked for.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmx.context import Context, unpack_context
from mmx.nn.kv_cache import KVCache
from mmx.nn.masks import causal_mask, check_input_dtype, fix_empty_rows, prepare_mask

__all__ = ["CrossAttention", "MultiHeadAttention", "attention_probs", "AttentionHook"]

# A hook sees (module, q [B, H, L, Dh], k [B, H, S, Dh], mask) for every call; see ``CrossAttention.hooks``.
AttentionHook = Callable[["CrossAttention", torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    mask: torch.Tensor | None = None,
    causal: bool = False,
    scale: float | None = None,
) -> torch.Tensor:
    """Explicit ``softmax(q k^T * scale + mask)`` as ``[B, H, L, S]`` in float32.

    ``mask`` must already be prepared (see :func:`prepare_mask`). Rows whose keys are all masked
    are zeros. Used for attention maps; the forward output never comes from here.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.einsum("bhld,bhsd->bhls", q.float(), k.float()) * scale  # (B, H, L, S)
    allowed = None
    if mask is not None:
        if mask.dtype == torch.bool:
            allowed = mask
        else:
            scores = scores + mask.float()
            allowed = ~torch.isneginf(mask)
    if causal:
        tri = causal_mask(q.shape[-2], k.shape[-2], q.device)
        allowed = tri if allowed is None else allowed & tri
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
        row_has_key = allowed.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~row_has_key, 0.0)
        return scores.softmax(dim=-1) * row_has_key
    return scores.softmax(dim=-1)


class CrossAttention(nn.Module):
    """Multi-head attention with queries from ``x`` and keys/values from ``context``.

    ``context=None`` makes it self-attention. Queries and keys use ``dim_head`` per head, values
    ``value_dim_head`` (default ``dim_head``). Parameter names (``to_q``, ``to_k``, ``to_v``,
    ``to_out.0``) match diffusers' ``Attention`` and latent-diffusion checkpoints.

    Args:
        query_dim: width of ``x``.
        context_dim: width of ``context`` tokens; None means ``query_dim`` (self-attention).
        heads: number of heads H.
        dim_head: query/key width per head; None means ``query_dim // heads``.
        value_dim_head: value width per head; None means ``dim_head``.
        out_dim: output width; None means ``query_dim``.
        dropout: dropout on the output projection.
        qkv_bias: bias in the q/k/v projections.
        split_context: each context token is ``[key states ; value states]`` (two halves of
            ``context_dim``, as ``HFTextEncoder(value_layer=...)`` gives): keys are projected from
            the first half, values from the second. Cross-attention only.
    """

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int | None = 64,
        value_dim_head: int | None = None,
        out_dim: int | None = None,
        dropout: float = 0.0,
        qkv_bias: bool = False,
        split_context: bool = False,
    ) -> None:
        super().__init__()
        if dim_head is None:
            if not isinstance(heads, int) or heads <= 0 or query_dim % heads != 0:
                raise ValueError(
                    f"dim_head=None splits query_dim across heads, so query_dim must be divisible by heads; "
                    f"got query_dim={query_dim}, heads={heads}"
                )
            dim_head = query_dim // heads
        for name, value in (("query_dim", query_dim), ("heads", heads), ("dim_head", dim_head)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if context_dim is not None and (not isinstance(context_dim, int) or context_dim <= 0):
            raise ValueError(f"context_dim must be a positive int or None; got {context_dim!r}")
        if split_context and (context_dim is None or context_dim % 2):
            raise ValueError(
                f"split_context=True needs cross-attention to an even context_dim (keys and values "
                f"side by side); got context_dim={context_dim!r}"
            )
        self.query_dim = query_dim
        self.context_dim = context_dim if context_dim is not None else query_dim
        self.is_cross = context_dim is not None
        self.split_context = bool(split_context)
        source_dim = self.context_dim // 2 if split_context else self.context_dim  # what to_k and to_v each read
        self.heads = heads
        self.dim_head = dim_head
        self.value_dim_head = value_dim_head or dim_head
        self.out_dim = out_dim or query_dim
        self.scale = 1.0 / math.sqrt(dim_head)

        self.to_q = nn.Linear(query_dim, heads * dim_head, bias=qkv_bias)
        self.to_k = nn.Linear(source_dim, heads * dim_head, bias=qkv_bias)
        self.to_v = nn.Linear(source_dim, heads * self.value_dim_head, bias=qkv_bias)
        self.to_out = nn.Sequential(nn.Linear(heads * self.value_dim_head, self.out_dim), nn.Dropout(dropout))
        # Callables run on every forward with (module, q, k, mask); the attention recorder uses them.
        self.hooks: dict[int, AttentionHook] = {}

    def extra_repr(self) -> str:
        return (
            f"query_dim={self.query_dim}, context_dim={self.context_dim if self.is_cross else None}, "
            f"heads={self.heads}, dim_head={self.dim_head}, value_dim_head={self.value_dim_head}"
            + (", split_context=True" if self.split_context else "")
        )

    def add_hook(self, hook: AttentionHook) -> Callable[[], None]:
        """Call ``hook(module, q, k, mask)`` on every forward; returns a function that removes it."""
        key = id(hook)
        self.hooks[key] = hook
        return lambda: self.hooks.pop(key, None)

    # -- projections ----------------------------------------------------------------------------
    def _check_inputs(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor) or x.ndim != 3 or x.shape[-1] != self.query_dim:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x must be [B, L, query_dim={self.query_dim}]; got {got}")
        check_input_dtype("x", x, self.to_q.weight)
        if context is None:
            return
        if not isinstance(context, torch.Tensor) or context.ndim != 3 or context.shape[-1] != self.context_dim:
            got = tuple(context.shape) if isinstance(context, torch.Tensor) else type(context).__name__
            raise ValueError(f"context must be [B, S, context_dim={self.context_dim}]; got {got}")
        check_input_dtype("context", context, self.to_k.weight)
        if context.shape[0] != x.shape[0]:
            raise ValueError(
                f"x and context must have the same batch size B; got x {tuple(x.shape)}, context {tuple(context.shape)}"
            )

    def project(
        self, x: torch.Tensor, context: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Project to per-head ``q [B, H, L, Dh]``, ``k [B, H, S, Dh]``, ``v [B, H, S, Dv]``."""
        self._check_inputs(x, context)
        source = x if context is None else context
        b, l, _ = x.shape
        s = source.shape[1]
        q = self.to_q(x).view(b, l, self.heads, self.dim_head).transpose(1, 2)  # (B, H, L, Dh)
        keys = values = source
        if self.split_context:
            keys, values = source.chunk(2, dim=-1)  # [key states ; value states]
        k = self.to_k(keys).view(b, s, self.heads, self.dim_head).transpose(1, 2)  # (B, H, S, Dh)
        v = self.to_v(values).view(b, s, self.heads, self.value_dim_head).transpose(1, 2)  # (B, H, S, Dv)
        return q, k, v

    # -- forward --------------------------------------------------------------------------------
    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor | Context | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        return_attention: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attend from ``x [B, L, query_dim]`` to ``context [B, S, context_dim]`` (or to ``x``).

        Args:
            x: queries' source, ``[B, L, query_dim]``.
            context: keys/values' source, a ``[B, S, context_dim]`` tensor or a :class:`Context`
                (whose mask is used unless ``mask`` is given); None for self-attention.
            mask: bool (True = may attend) or additive float; ``[B, S]``, ``[B, L, S]`` or
                broadcastable to ``[B, H, L, S]``. A query whose keys are all masked (in every
                head) gets a zero output; in some heads only, those heads contribute zeros.
            causal: query i sees key j only when ``j <= i + S - L``.
            return_attention: also return the probabilities ``[B, H, L, S]`` (float32),
                computed beside the fused output.
            cache: a :class:`KVCache` for step-by-step decoding. Self-attention (``context``
                None): the new positions' keys/values are appended to the cache and the queries
                attend over all cached positions (with ``causal``, the L queries are the last L
                positions); a key-padding ``mask`` must then cover all S cached positions.
                Cross-attention: the first call projects ``context`` into the cache, later calls
                reuse it (``context`` may then be None; the mask still comes from ``mask=`` or
                the Context). Hooks and returned probabilities see the full key set.

        Returns:
            ``[B, L, out_dim]``, or ``(output, probs)`` when ``return_attention``.
        """
        context, mask = unpack_context(context, mask)
        if cache is None:
            q, k, v = self.project(x, context)
        else:
            q, k, v = self._project_cached(x, context, cache)
        b, h, l, _ = q.shape
        s = k.shape[2]
        cached_padding = (
            cache is not None
            and cache.kind == "cross"
            and not causal
            and s > 0
            and isinstance(mask, torch.Tensor)
            and mask.ndim == 2
        )
        if cached_padding:
            mask, sdpa_mask, row_has_key = cache.padding(mask, h, q.dtype)
        else:
            mask = prepare_mask(mask, b, h, l, s, q.dtype)
        for hook in list(self.hooks.values()):
            hook(self, q, k, mask)
        if cached_padding:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask)  # (B, H, L, Dv)
        else:
            out, row_has_key = self._sdpa(q, k, v, mask, causal)  # (B, H, L, Dv)
        out = out.transpose(1, 2).reshape(b, l, h * self.value_dim_head)  # (B, L, H*Dv)
        out = self.to_out(out)
        if row_has_key is not None:
            # A query with no key to attend to (in any head) gets no update at all, bias included.
            out = out * row_has_key.any(dim=1).to(out.dtype)  # (B|1, L|1, 1)
        if return_attention:
            return out, attention_probs(q, k, mask, causal, self.scale)
        return out

    def attention_probs(
        self,
        x: torch.Tensor,
        context: torch.Tensor | Context | None = None,
        mask: torch.Tensor | None = None,
        causal: bool = False,
    ) -> torch.Tensor:
        """Only the attention probabilities ``[B, H, L, S]`` (float32) for these inputs."""
        context, mask = unpack_context(context, mask)
        q, k, _ = self.project(x, context)
        mask = prepare_mask(mask, q.shape[0], self.heads, q.shape[2], k.shape[2], q.dtype)
        return attention_probs(q, k, mask, causal, self.scale)

    def _project_cached(
        self, x: torch.Tensor, context: torch.Tensor | None, cache: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """:meth:`project` through ``cache``: ``q`` of the new queries, ``k``/``v`` of every cached position."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or None; got {type(cache).__name__}")
        cross = cache.kind == "cross" or (cache.kind is None and (context is not None or self.is_cross))
        if not cross:
            if context is not None:
                raise ValueError("this KVCache holds self-attention keys; it cannot be used with a context")
            q, k, v = self.project(x)
            k, v = cache.append(k, v)
            return q, k, v
        if cache.k is None or cache.v is None:
            if context is None:
                raise ValueError(
                    "a cross-attention KVCache is filled by its first call: pass the context (e.g. the encoder memory)"
                )
            q, k, v = self.project(x, context)
            cache.store(k, v)
            return q, k, v
        # The context was projected on the first call: only the queries are new.
        self._check_inputs(x, None)
        b, l, _ = x.shape
        if cache.k.shape[0] != b:
            raise ValueError(
                f"the cross-attention KVCache holds {cache.k.shape[0]} batch rows but x has B={b} "
                "(reorder the cache when the batch changes)"
            )
        q = self.to_q(x).view(b, l, self.heads, self.dim_head).transpose(1, 2)  # (B, H, L, Dh)
        return q, cache.k, cache.v

    def _sdpa(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, causal: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fused attention ``[B, H, L, Dv]`` and, when a mask is in play, ``row_has_key [*, L|1, 1]``."""
        l, s = q.shape[2], k.shape[2]
        if s == 0:
            # No key at all (an empty context): every query has nothing to read, exactly as a fully
            # masked row, so the output (bias included) is zero, with or without a mask.
            nothing = torch.zeros(1, 1, 1, 1, dtype=torch.bool, device=q.device)
            return q.new_zeros(*q.shape[:3], v.shape[-1]), nothing
        if mask is None:
            if not causal or l == s or (l == 1 and s > 0):
                # One query aligned to the last key (cached decoding) sees every key: no mask needed.
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal and l == s and l > 1), None
            if l > s:
                # The first L - S queries see no key at all: give them zeros. (4-D, as a prepared
                # mask: row_has_key must come out [1, 1, L, 1], whatever B.)
                mask = causal_mask(l, s, q.device)[None, None]
            else:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(l, s, q.device)), None
        elif causal:
            tri = causal_mask(l, s, q.device)
            mask = mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))
        mask, row_has_key = fix_empty_rows(mask)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        if row_has_key.shape[1] > 1:
            # Heads disagree on which rows are empty: zero those heads here. Otherwise the row is
            # zeroed once, after the output projection (see forward).
            out = out * row_has_key.to(out.dtype)
        return out, row_has_key


class MultiHeadAttention(CrossAttention):
    """Self-attention: :class:`CrossAttention` with keys and values from ``x`` itself."""

    def __init__(
        self,
        query_dim: int,
        heads: int = 8,
        dim_head: int = 64,
        value_dim_head: int | None = None,
        out_dim: int | None = None,
        dropout: float = 0.0,
        qkv_bias: bool = False,
    ) -> None:
        super().__init__(
            query_dim,
            None,
            heads=heads,
            dim_head=dim_head,
            value_dim_head=value_dim_head,
            out_dim=out_dim,
            dropout=dropout,
            qkv_bias=qkv_bias,
        )

    def forward(  # type: ignore[override]
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        causal: bool = False,
        return_attention: bool = False,
        cache: KVCache | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Self-attention over ``x [B, L, query_dim]``; ``mask`` and ``cache`` as in :meth:`CrossAttention.forward`."""
        return super().forward(x, None, mask=mask, causal=causal, return_attention=return_attention, cache=cache)
