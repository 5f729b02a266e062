"""A key/value cache of one attention layer for step-by-step decoding (self- or cross-attention)."""

from __future__ import annotations

import torch

from mmx.nn.masks import fix_empty_rows, prepare_mask

__all__ = ["KVCache"]


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
        fits = (
            buffers is not None
            and n + added <= buffers[0].shape[2]
            and buffers[0].shape[:2] == k.shape[:2]
            and buffers[0].shape[3] == k.shape[3]
            and buffers[1].shape[3] == v.shape[3]
            and buffers[0].dtype == k.dtype
            and buffers[0].device == k.device
        )
        if not fits:  # (re)allocate with room for as many positions again, keeping what is cached
            capacity = max(2 * (n + added), 16)
            kb = k.new_empty(k.shape[0], k.shape[1], capacity, k.shape[3])
            vb = v.new_empty(v.shape[0], v.shape[1], capacity, v.shape[3])
            if n:
                kb[:, :, :n] = self.k
                vb[:, :, :n] = self.v
            buffers = self._buffers = (kb, vb)
        buffers[0][:, :, n : n + added] = k
        buffers[1][:, :, n : n + added] = v
        self.k, self.v, self.kind = buffers[0][:, :, : n + added], buffers[1][:, :, : n + added], "self"
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
        sdpa_mask, row_has_key = fix_empty_rows(prepared)
        if bool(row_has_key.all()):  # one host synchronisation per memory, not per step
            row_has_key = None
            if prepared.dtype == torch.bool and bool(prepared.all()):
                sdpa_mask = None
        self._padding = (mask, mask._version, dtype, prepared, sdpa_mask, row_has_key)
        return prepared, sdpa_mask, row_has_key
