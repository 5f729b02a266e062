"""Run a frozen text encoder once per distinct text: training on captions pays for each caption once."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mmx.context import Context

__all__ = ["CachedTextEncoder"]


class CachedTextEncoder:
    """Wraps a frozen text encoder; ``cached(texts)`` returns the same Context as ``encoder(texts)``.

    Only each text's real tokens are kept (their states do not depend on padding, since the
    encoders mask padding). A batch is padded to its longest text, or to ``max_tokens``.
    """

    def __init__(self, encoder: Any, max_tokens: int | None = None) -> None:
        self.encoder, self.max_tokens = encoder, max_tokens
        self._rows: dict[str, Context] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        """Forget every cached text (e.g. after changing the encoder's weights)."""
        self._rows.clear()

    def __call__(self, texts: Sequence[str], device: torch.device | str | None = None) -> Context:
        """Context ``[B, S, D]`` of ``texts`` on ``device`` (default: where the cache lives)."""
        texts = list(texts)
        missing = list(dict.fromkeys(t for t in texts if t not in self._rows))
        if missing:
            with torch.no_grad():
                ctx = self.encoder(missing)
            for i, text in enumerate(missing):
                n = int(ctx.mask[i].sum())
                self._rows[text] = Context(
                    tokens=ctx.tokens[i : i + 1, :n],
                    mask=ctx.mask[i : i + 1, :n],
                    pooled=None if ctx.pooled is None else ctx.pooled[i : i + 1],
                    words=None if ctx.words is None else [ctx.words[i]],
                )
        rows = [self._rows[t] for t in texts]
        s = self.max_tokens or max(r.tokens.shape[1] for r in rows)
        device = device if device is not None else rows[0].tokens.device
        tokens = torch.zeros(len(rows), s, rows[0].dim, dtype=rows[0].tokens.dtype, device=device)  # (B, S, D)
        mask = torch.zeros(len(rows), s, dtype=torch.bool, device=device)  # (B, S)
        for i, r in enumerate(rows):
            n = min(r.tokens.shape[1], s)
            tokens[i, :n] = r.tokens[0, :n]
            mask[i, :n] = r.mask[0, :n]
        pooled = None if rows[0].pooled is None else torch.cat([r.pooled for r in rows]).to(device)
        words = None if rows[0].words is None else [r.words[0] for r in rows]
        return Context(tokens=tokens, mask=mask, pooled=pooled, words=words)
