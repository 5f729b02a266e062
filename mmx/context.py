"""The currency of conditioning: every encoder returns a :class:`Context`, every block accepts one.

Letters used for shapes across mmx: B batch, L queries, S keys (context tokens), H heads,
D width, T time steps, C channels.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import NamedTuple

import torch

__all__ = ["Context", "WordSpan", "unpack_context", "conditional_rows", "current_conditional_rows"]

# Which batch rows of the model call under way carry the real prompts (the rest are the
# unconditional rows of classifier-free guidance). Set by the sampling loop around each call, read
# by observers such as the attention recorder, so they never have to guess the batch layout.
_CONDITIONAL_ROWS: contextvars.ContextVar[slice | None] = contextvars.ContextVar("mmx_conditional_rows", default=None)


@contextlib.contextmanager
def conditional_rows(rows: slice) -> Iterator[None]:
    """Declare, for the model calls inside the block, which batch rows are conditional."""
    token = _CONDITIONAL_ROWS.set(rows)
    try:
        yield
    finally:
        _CONDITIONAL_ROWS.reset(token)


def current_conditional_rows() -> slice | None:
    """The conditional rows declared by the enclosing :func:`conditional_rows`, or None."""
    return _CONDITIONAL_ROWS.get()


class WordSpan(NamedTuple):
    """One whitespace word of an input text and its token span ``tokens[start:end]``.

    ``start == end`` means the word produced no token (it was cut by truncation, or cleaned away).
    """

    word: str
    start: int
    end: int


@dataclass(frozen=True)
class Context:
    """Keys/values for cross-attention, as produced by every mmx encoder.

    Attributes:
        tokens: ``[B, S, D]`` token states.
        mask: ``[B, S]`` bool, True where a token is real (may be attended to).
        pooled: ``[B, Dp]`` one vector per sample (e.g. CLIP's projected end-of-text feature), or None.
        words: per sample, the list of :class:`WordSpan` of its text, or None for non-text sources.
        grid: ``(h, w)`` when the S tokens are an ``h x w`` image grid in row-major order, else None.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor | None = None
    words: list[list[WordSpan]] | None = None
    grid: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.tokens, torch.Tensor) or self.tokens.ndim != 3:
            raise ValueError(
                f"Context.tokens must be a tensor [B, S, D]; got "
                f"{tuple(self.tokens.shape) if isinstance(self.tokens, torch.Tensor) else type(self.tokens).__name__}"
            )
        b, s, _ = self.tokens.shape
        if not isinstance(self.mask, torch.Tensor) or self.mask.dtype != torch.bool:
            got = self.mask.dtype if isinstance(self.mask, torch.Tensor) else type(self.mask).__name__
            raise TypeError(f"Context.mask must be a bool tensor [B, S] (True = real token); got {got}")
        if tuple(self.mask.shape) != (b, s):
            raise ValueError(f"Context.mask must have shape [B, S] = {(b, s)}; got {tuple(self.mask.shape)}")
        if self.pooled is not None and (self.pooled.ndim != 2 or self.pooled.shape[0] != b):
            raise ValueError(f"Context.pooled must have shape [B={b}, Dp]; got {tuple(self.pooled.shape)}")
        if self.words is not None and len(self.words) != b:
            raise ValueError(f"Context.words must hold one list per sample (B={b}); got {len(self.words)}")
        if self.grid is not None and self.grid[0] * self.grid[1] != s:
            raise ValueError(f"Context.grid {self.grid} does not cover S={s} tokens")

    @property
    def batch_size(self) -> int:
        """B."""
        return self.tokens.shape[0]

    @property
    def dim(self) -> int:
        """D, the token width (the ``context_dim`` a block must be built with)."""
        return self.tokens.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tokens.dtype

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Context:
        """Move tokens and pooled to ``device`` / cast them to floating ``dtype``; the mask stays bool."""
        tokens = self.tokens.to(device=device, dtype=dtype)
        pooled = None if self.pooled is None else self.pooled.to(device=device, dtype=dtype)
        return replace(self, tokens=tokens, mask=self.mask.to(device=device), pooled=pooled)

    def detach(self) -> Context:
        """A copy whose tensors carry no autograd history."""
        pooled = None if self.pooled is None else self.pooled.detach()
        return replace(self, tokens=self.tokens.detach(), pooled=pooled)

    def __getitem__(self, index: int | slice | Sequence[int] | torch.Tensor) -> Context:
        """Select samples along B (int, slice, index list or bool/long tensor); B stays a dimension."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        pooled = None if self.pooled is None else self.pooled[index]
        words = None
        if self.words is not None:
            picks = (
                range(self.batch_size)[index] if isinstance(index, slice) else _as_index_list(index, self.batch_size)
            )
            words = [self.words[i] for i in picks]
        tokens = self.tokens[index]
        return Context(tokens=tokens, mask=self.mask[index], pooled=pooled, words=words, grid=self.grid)

    @staticmethod
    def cat(contexts: Sequence[Context]) -> Context:
        """Join sources along S (e.g. observation tokens and instruction tokens) with their masks.

        ``pooled`` vectors are concatenated along their feature dimension when every source has
        one; ``words`` and ``grid`` are dropped, as token positions no longer match one source.
        """
        if not contexts:
            raise ValueError("Context.cat needs at least one Context")
        dims = {c.dim for c in contexts}
        batches = {c.batch_size for c in contexts}
        if len(dims) != 1 or len(batches) != 1:
            raise ValueError(
                "Context.cat needs equal batch size and token width; got "
                f"[B, S, D] = {[tuple(c.tokens.shape) for c in contexts]}"
            )
        pooled = None
        if all(c.pooled is not None for c in contexts):
            pooled = torch.cat([c.pooled for c in contexts], dim=-1)
        return Context(
            tokens=torch.cat([c.tokens for c in contexts], dim=1),
            mask=torch.cat([c.mask for c in contexts], dim=1),
            pooled=pooled,
        )


def _as_index_list(index: Sequence[int] | torch.Tensor, size: int) -> list[int]:
    if isinstance(index, torch.Tensor):
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        return [int(i) % size for i in index.tolist()]
    return [int(i) % size for i in index]


def unpack_context(
    context: Context | torch.Tensor | None, mask: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Return ``(tokens, mask)`` from a Context or a plain ``[B, S, D]`` tensor.

    An explicit ``mask`` wins over ``context.mask``.
    """
    if isinstance(context, Context):
        return context.tokens, (context.mask if mask is None else mask)
    return context, mask
