"""Multi-head scaled dot-product attention: one class for self- and cross-attention.

Queries come from ``x`` (image features, action steps, decoder tokens); keys and values come from
``context`` (text tokens, observation tokens, encoder memory), or from ``x`` itself when
``context`` is None (Vaswani et al., 2017, "Attention Is All You Need").

The output always comes from :func:`torch.nn.functional.scaled_dot_product_attention` (fused
kernels on GPU and CPU); attention probabilities are computed beside it, only when asked for.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from mmx.context import Context, unpack_context

__all__ = [
    "CrossAttention", "MultiHeadAttention", "KVCache", "prepare_mask", "attention_probs", "query_grid", "AttentionHook",
    "check_input_dtype", "AttentionCapture", "mask_kl",
]

# A hook sees (module, q [B, H, L, Dh], k [B, H, S, Dh], mask) for every call; see ``CrossAttention.hooks``.
AttentionHook = Callable[["CrossAttention", torch.Tensor, torch.Tensor, "torch.Tensor | None"], None]


def check_input_dtype(name: str, tensor: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise a TypeError naming ``name`` unless ``tensor`` can go through a layer whose weight is ``weight``.

    ``tensor`` must be floating point, and of the weight's dtype (under ``torch.autocast``, which
    casts float32/16 tensors by itself, only float64 ones must match). Without this check the
    error comes from deep inside ``nn.Linear`` / ``nn.LayerNorm`` ("expected m1 and m2 to have the
    same dtype").
    """
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (the weights are {weight.dtype}); got {tensor.dtype}. "
            f"Token ids must be embedded first; other values convert with .to({weight.dtype})."
        )
    # autocast casts float32/16 inputs and weights by itself, but never a float64 one
    autocast = torch.is_autocast_enabled(tensor.device.type) and torch.float64 not in (tensor.dtype, weight.dtype)
    if tensor.dtype != weight.dtype and weight.is_floating_point() and not autocast:
        raise TypeError(
            f"{name} is {tensor.dtype} but the weights are {weight.dtype}; cast the input with "
            f".to({weight.dtype}) or the module with .to({tensor.dtype}), or run under torch.autocast"
        )


def prepare_mask(
    mask: torch.Tensor | None, batch: int, heads: int, queries: int, keys: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Check a user mask and shape it to broadcast against ``[B, H, L, S]``.

    Accepted forms (bool: True = may attend; floating: added to the scores, ``-inf`` = masked):
      * ``[B, S]`` key padding (the usual text mask),
      * ``[B, L, S]`` per query,
      * ``[B | 1, H | 1, L | 1, S]`` anything broadcastable to ``[B, H, L, S]``.
    A float mask is cast to ``dtype`` (the query dtype) as SDPA requires. Its values must be finite
    or ``-inf``: a NaN or ``+inf`` would turn whole rows of the output into NaN, so it is a
    ValueError (checking costs one host synchronisation, for float masks only; bool masks are the
    fast path).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None; got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"mask must be bool (True = may attend) or floating (additive, -inf = masked); got {mask.dtype}. "
            "A 0/1 integer attention_mask from a tokenizer converts with mask.bool()."
        )
    expected = (batch, heads, queries, keys)
    if mask.ndim == 2:
        if tuple(mask.shape) != (batch, keys):
            raise ValueError(f"a 2-D mask is key padding [B, S] = {(batch, keys)}; got {tuple(mask.shape)}")
        mask = mask[:, None, None, :]  # (B, 1, 1, S)
    elif mask.ndim == 3:
        mask = mask[:, None, :, :]  # (B, 1, L, S)
    elif mask.ndim != 4:
        raise ValueError(
            f"mask must be [B, S], [B, L, S] or broadcastable to [B, H, L, S] = {expected}; "
            f"got {mask.ndim}-D shape {tuple(mask.shape)}"
        )
    if any(m not in (1, e) for m, e in zip(mask.shape, expected)) or mask.shape[-1] != keys:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} cannot broadcast to [B, H, L, S] = {expected} "
            "(the key dimension S must match exactly)"
        )
    if mask.is_floating_point():
        if not bool((mask < float("inf")).all()):  # NaN compares False too
            bad = "NaN" if bool(mask.isnan().any()) else "+inf"
            raise ValueError(
                f"a float mask is added to the attention scores, so its values must be finite or -inf (masked); "
                f"this one holds {bad}. Use a bool mask (True = may attend) or -inf for masked keys."
            )
        if mask.dtype != dtype:
            mask = mask.to(dtype)
    return mask


def _fix_empty_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmask rows that have no key left, so softmax stays finite; return the mask and a row keep-factor.

    Returns ``(safe_mask, row_has_key)`` where ``row_has_key`` is ``[*, 1]`` broadcastable to the
    output ``[B, H, L, Dv]``; multiplying by it zeroes those rows (and their gradients).
    No host synchronisation: everything stays on the device.
    """
    allowed = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    row_has_key = allowed.any(dim=-1, keepdim=True)  # (B|1, H|1, L|1, 1)
    if mask.dtype == torch.bool:
        safe = mask | ~row_has_key
    else:
        safe = mask.masked_fill(~row_has_key, 0.0)
    return safe, row_has_key


def _causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """Bool ``[L, S]``: query i may see key j when ``j <= i + (S - L)`` (aligned to the last key).

    With L == S this is the usual lower triangle; with fewer queries than keys (decoding with a
    key/value cache) the queries are the last L positions of the sequence.
    """
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)


def attention_probs(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, causal: bool = False,
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
        tri = _causal_mask(q.shape[-2], k.shape[-2], q.device)
        allowed = tri if allowed is None else allowed & tri
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
        row_has_key = allowed.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~row_has_key, 0.0)
        return scores.softmax(dim=-1) * row_has_key
    return scores.softmax(dim=-1)


def query_grid(image_size: tuple[int, int], queries: int) -> tuple[int, int]:
    """``(h, w)`` of the L queries of a layer that saw an ``(H, W)`` image downsampled by an integer f."""
    h, w = image_size
    f = round(math.sqrt(h * w / queries))
    if f < 1 or (h // f) * (w // f) != queries:
        raise ValueError(
            f"cannot lay {queries} queries on a grid of the {h}x{w} image (expected (H/f)*(W/f) for an integer f)"
        )
    return h // f, w // f


class KVCache:
    """Projected keys and values of ONE attention layer, kept across decoding steps.

    * Self-attention: every call appends the keys/values of its new queries' positions, so step
      t attends over positions ``0..t`` without re-projecting the prefix.
    * Cross-attention: the first call projects the context (e.g. the encoder memory) and stores
      it; later calls reuse it and project nothing but the queries.

    The cache learns which of the two it is on its first use (``kind``: ``"self"`` / ``"cross"``).

    Self-attention keys/values live in buffers with room to spare (capacity doubles when full), so
    a step writes only its new positions instead of copying the whole prefix (``torch.cat``), and
    ``k`` / ``v`` are views of the filled part.

    Attributes:
        k: ``[B, H, S, Dh]`` cached keys, or None while empty.
        v: ``[B, H, S, Dv]`` cached values, or None while empty.
        kind: ``"self"``, ``"cross"`` or None while empty.
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.kind: str | None = None
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # self-attention: (k, v) with spare room
        # Cross-attention: (user mask, its _version, dtype, prepared, SDPA mask, row_has_key), see padding()
        self._padding: tuple | None = None

    def __len__(self) -> int:
        """Number of cached key positions S (0 when empty)."""
        return 0 if self.k is None else self.k.shape[2]

    def __repr__(self) -> str:
        shape = None if self.k is None else tuple(self.k.shape)
        return f"KVCache(kind={self.kind!r}, k={shape})"

    @property
    def is_empty(self) -> bool:
        return self.k is None

    def reset(self) -> None:
        """Forget everything (the next call fills the cache again)."""
        self.k = self.v = None
        self.kind = None
        self._padding = None
        self._buffers = None

    def reorder(self, index: torch.Tensor) -> None:
        """Keep batch rows ``index`` (a ``[B']`` long tensor, repeats allowed), e.g. the surviving beams."""
        if self.k is None or self.v is None:
            return
        if not isinstance(index, torch.Tensor) or index.ndim != 1 or index.dtype not in (torch.int64, torch.int32):
            got = f"{index.dtype} {tuple(index.shape)}" if isinstance(index, torch.Tensor) else type(index).__name__
            raise TypeError(f"KVCache.reorder needs a 1-D long tensor of batch rows; got {got}")
        index = index.to(self.k.device)
        self._padding = None
        if self._buffers is not None:  # keep the spare room: select rows of the whole buffers
            n = self.k.shape[2]
            self._buffers = (self._buffers[0].index_select(0, index), self._buffers[1].index_select(0, index))
            self.k, self.v = self._buffers[0][:, :, :n], self._buffers[1][:, :, :n]
            return
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Self-attention: add the new positions ``k [B, H, L, Dh]``, ``v [B, H, L, Dv]``; return all of them."""
        if self.k is not None and self.v is not None:
            if self.k.shape[0] != k.shape[0]:
                raise ValueError(
                    f"the KVCache holds {self.k.shape[0]} batch rows but the new keys have {k.shape[0]} "
                    "(reorder the cache when the batch changes, e.g. with beams)"
                )
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Writing into a buffer that earlier steps' graphs saved would break their backward pass.
            if self.k is not None and self.v is not None:
                k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
            self.k, self.v, self.kind, self._buffers = k, v, "self", None
            return k, v
        n, added = len(self), k.shape[2]
        buffers = self._buffers
        fits = (buffers is not None and n + added <= buffers[0].shape[2]
                and buffers[0].shape[:2] == k.shape[:2] and buffers[0].shape[3] == k.shape[3]
                and buffers[1].shape[3] == v.shape[3] and buffers[0].dtype == k.dtype and buffers[0].device == k.device)
        if not fits:  # (re)allocate with room for as many positions again, keeping what is cached
            capacity = max(2 * (n + added), 16)
            kb = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            vb = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            if n:
                kb[:, :, :n] = self.k
                vb[:, :, :n] = self.v
            buffers = self._buffers = (kb, vb)
        buffers[0][:, :, n:n + added] = k
        buffers[1][:, :, n:n + added] = v
        self.k, self.v, self.kind = buffers[0][:, :, :n + added], buffers[1][:, :, :n + added], "self"
        return self.k, self.v

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """Cross-attention: keep the projected context ``k [B, H, S, Dh]``, ``v [B, H, S, Dv]``."""
        self.k, self.v, self.kind = k, v, "cross"
        self._padding = None
        self._buffers = None

    def padding(
        self, mask: torch.Tensor, heads: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Cross-attention: a ``[B, S]`` key-padding mask of the cached context, prepared once.

        The memory's mask is the same at every decoding step, so its checks, its empty-row fix and
        the host synchronisation that tells whether it masks anything run on the first step only
        (again when another mask, or this one modified in place, comes). Returns ``(prepared, sdpa_mask,
        row_has_key)``: the mask hooks see (:func:`prepare_mask`), the mask for SDPA (None when every
        key may be read, so the unmasked kernel runs), and the keep-factor of rows without keys
        (None when every row has one).
        """
        cached = self._padding
        if cached is not None and cached[0] is mask and cached[1] == mask._version and cached[2] == dtype:
            return cached[3:]
        assert self.k is not None, "padding() needs the projected context"
        b, _, s, _ = self.k.shape
        prepared = prepare_mask(mask, b, heads, 1, s, dtype)  # [B, 1, 1, S]: the same for any L
        sdpa_mask, row_has_key = _fix_empty_rows(prepared)
        if bool(row_has_key.all()):  # one host synchronisation per memory, not per step
            row_has_key = None
            if prepared.dtype == torch.bool and bool(prepared.all()):
                sdpa_mask = None
        self._padding = (mask, mask._version, dtype, prepared, sdpa_mask, row_has_key)
        return prepared, sdpa_mask, row_has_key


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
            raise ValueError(f"split_context=True needs cross-attention to an even context_dim (keys and values "
                             f"side by side); got context_dim={context_dim!r}")
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
        cached_padding = (cache is not None and cache.kind == "cross" and not causal and s > 0
                          and isinstance(mask, torch.Tensor) and mask.ndim == 2)
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
                mask = _causal_mask(l, s, q.device)[None, None]
            else:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=_causal_mask(l, s, q.device)), None
        elif causal:
            tri = _causal_mask(l, s, q.device)
            mask = mask & tri if mask.dtype == torch.bool else mask.masked_fill(~tri, float("-inf"))
        mask, row_has_key = _fix_empty_rows(mask)
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
            query_dim, None, heads=heads, dim_head=dim_head, value_dim_head=value_dim_head,
            out_dim=out_dim, dropout=dropout, qkv_bias=qkv_bias,
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


class AttentionCapture:
    """Context manager keeping the q/k/mask of every cross-attention call of ``model``, for a loss on the maps.

    The hooks see the same q and k the fused attention used, with their gradients, so a loss on
    :meth:`mean_probs` (or on ``calls``) trains the projections that made them.
    """

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
        self._undo = []

    def mean_probs(self) -> torch.Tensor:
        """The attention probabilities of the captured calls averaged over heads and calls, ``[B, L, S]``
        (differentiable; all calls must share L and S, e.g. the cross-attention layers of a decoder)."""
        if not self.calls:
            raise RuntimeError("no cross-attention ran inside the AttentionCapture")
        return torch.stack([attention_probs(q, k, mask, scale=scale).mean(1) for q, k, mask, scale in self.calls]).mean(0)


def mask_kl(maps: torch.Tensor, masks: torch.Tensor, grid: tuple[int, int], valid: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of KL(mask || map): how far each attention map is from covering its mask evenly.

    Args:
        maps: ``[B, R, h*w]`` non-negative maps over the positions of an ``h x w`` grid (each row is
            normalised to sum 1 here), e.g. a word's attention over image regions.
        masks: ``[B, R, H, W]`` the region each row should cover, at any resolution; area-pooled to
            ``grid`` and normalised, so a position counts by how much of it the mask covers.
        grid: ``(h, w)``.
        valid: ``[B, R]`` bool, the rows to count (default all); rows with an empty mask never count.

    Zero when every map is its mask; no host synchronisation (0 when no row counts).
    """
    want = F.adaptive_avg_pool2d(masks.float(), grid).flatten(2)  # (B, R, h*w)
    mass = want.sum(-1)
    rows = mass > 0 if valid is None else valid & (mass > 0)
    want = want / mass[..., None].clamp_min(1e-12)
    have = maps.float() / maps.float().sum(-1, keepdim=True).clamp_min(1e-12)
    kl = (want * (want.clamp_min(1e-12).log() - have.clamp_min(1e-8).log())).sum(-1)  # (B, R)
    rows = rows.float()
    return (kl * rows).sum() / rows.sum().clamp_min(1.0)
