"""Shared pieces of the encoders: the registry, the text-encoder base class, word spans.

Letters: B batch, S tokens, D width, C channels, H/W input height/width, h/w feature grid.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmx.context import Context, WordSpan
from mmx.registry import Registry

__all__ = ["ENCODERS", "ImageFeatures", "TextEncoder", "TokenizedText"]

logger = logging.getLogger(__name__)

ENCODERS: Registry[nn.Module] = Registry("encoder")

_WORD = re.compile(r"\S+")


@dataclass(frozen=True)
class TokenizedText:
    """Token ids of a batch of texts, their mask, word spans and how many tokens truncation cut.

    Attributes:
        ids: ``[B, S]`` long token ids on the encoder's device.
        mask: ``[B, S]`` bool, True for real tokens (special tokens included), False for padding.
        words: per text, one :class:`WordSpan` per whitespace word (``text.split()``).
        cut: per text, the number of tokens truncation removed (0 if none).
    """

    ids: torch.Tensor
    mask: torch.Tensor
    words: list[list[WordSpan]]
    cut: list[int]


@dataclass(frozen=True)
class ImageFeatures:
    """A feature map and the same features as a token sequence (row-major over the grid).

    Attributes:
        map: ``[B, C, h, w]`` features.
        tokens: ``[B, h*w, C]`` the same features, token ``i * w + j`` is ``map[:, :, i, j]``.
    """

    map: torch.Tensor
    tokens: torch.Tensor

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)`` of the feature map."""
        return int(self.map.shape[-2]), int(self.map.shape[-1])

    def context(self) -> Context:
        """The features as a :class:`Context`: every token real, pooled = spatial mean ``[B, C]``."""
        b, s, _ = self.tokens.shape
        mask = torch.ones(b, s, dtype=torch.bool, device=self.tokens.device)  # [B, S]
        pooled = self.map.mean(dim=(-2, -1))  # [B, C]
        return Context(tokens=self.tokens, mask=mask, pooled=pooled, grid=self.grid)


class TextEncoder(nn.Module):
    """Base of the text encoders: freezing, device handling, input checks and ``forward``.

    Subclasses implement :meth:`tokenize` and :meth:`encode`, and the ``dim`` / ``pooled_dim`` properties.
    """

    def __init__(self, name: str, freeze: bool) -> None:
        super().__init__()
        self.frozen = bool(freeze)
        self._label = f"{type(self).__name__}({name})"  # names the encoder in log messages
        self._tokenizer: Any = None

    def _finish_init(self) -> None:
        """Apply ``freeze`` once the wrapped model exists."""
        if self.frozen:
            self.requires_grad_(False)
            self.train(False)

    def train(self, mode: bool = True) -> TextEncoder:
        """Set training mode; a frozen encoder stays in eval mode whatever the parent asks."""
        return super().train(False if self.frozen else mode)

    @property
    def device(self) -> torch.device:
        """The device of the encoder's parameters (where token ids are created)."""
        return next(self.parameters()).device

    @property
    def dim(self) -> int:
        """D, the width of the returned tokens."""
        raise NotImplementedError

    @property
    def pooled_dim(self) -> int:
        """Dp, the width of the returned pooled vector."""
        raise NotImplementedError

    @property
    def tokenizer(self) -> Any:
        """The tokenizer the model was trained with."""
        return self._tokenizer

    def tokenize(self, texts: str | Sequence[str]) -> TokenizedText:
        """Token ids ``[B, S]`` on the encoder's device, mask ``[B, S]`` and word spans of ``texts``.

        Logs a warning naming how many tokens were cut when a text exceeds the model's limit.
        """
        texts = check_texts(texts)
        ids, mask, words, cut = self._tokenize(texts)  # [B, S], [B, S]
        warn_truncation(cut, ids.shape[1], self._label)
        device = self.device
        return TokenizedText(ids=ids.to(device), mask=mask.to(device), words=words, cut=cut)

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[WordSpan]], list[int]]:
        """ids ``[B, S]``, mask ``[B, S]``, word spans and per-text cut counts, on the CPU."""
        raise NotImplementedError

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Run the model on ids ``[B, S]`` -> (tokens ``[B, S, D]``, pooled ``[B, Dp]``)."""
        raise NotImplementedError

    def forward(self, texts: str | Sequence[str]) -> Context:
        """Encode one text or a list of texts into a :class:`Context` with word spans."""
        tok = self.tokenize(texts)
        grad = torch.no_grad() if self.frozen else contextlib.nullcontext()
        with grad:
            tokens, pooled = self.encode(tok.ids, tok.mask)  # [B, S, D], [B, Dp]
        return Context(tokens=tokens, mask=tok.mask, pooled=pooled, words=tok.words)


def check_texts(texts: Any) -> list[str]:
    """Return ``texts`` as a list of str; a TypeError names any other type.

    A text holding a lone UTF-16 surrogate (e.g. ``"\\ud800"`` from JSON, or a file name decoded
    with ``surrogateescape``) is not valid Unicode: a ValueError names the text and position,
    instead of an error from inside the tokenizer.
    """
    if isinstance(texts, str):
        texts = [texts]
    elif not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a str or a list of str; got {type(texts).__name__}")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts must be a str or a list of str; texts[{i}] is a {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"texts[{i}] = {preview(text)} is not valid Unicode: {err.object[err.start]!r} at position "
                f"{err.start} is a lone surrogate; decode the source with errors='replace' or drop it"
            ) from None
    return list(texts)


def preview(text: str, limit: int = 60) -> str:
    """``repr(text)`` cut to about ``limit`` characters, for log and error messages."""
    if len(text) <= limit:
        return repr(text)
    return f"{text[:limit]!r}... ({len(text)} characters)"


def word_char_spans(text: str) -> list[tuple[str, int, int]]:
    """The whitespace words of ``text`` (as ``text.split()``) with their character spans."""
    return [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]


def spans_from_counts(words: Sequence[str], counts: Sequence[int], start: int, limit: int) -> list[WordSpan]:
    """Spans of consecutive words with ``counts`` tokens each from position ``start``, clipped to ``limit``."""
    spans = []
    pos = start
    for word, n in zip(words, counts):
        spans.append(WordSpan(word, min(pos, limit), min(pos + n, limit)))
        pos += n
    return spans


def spans_from_prefixes(words: Sequence[str], count: Callable[[str], int], start: int, limit: int) -> list[WordSpan]:
    """Spans from token counts of prefixes ``" ".join(words[:k])`` (a tokenizer-agnostic fallback).

    Prefix counts are taken as non-decreasing in k, so a run of words between two prefixes with
    equal counts adds no token and need not be counted, and past ``limit`` nothing is kept:
    bisection counts O(min(W, T log W)) prefixes for W words and T kept tokens, instead of all
    W (tokenizing every prefix of a 10,000-word text is quadratic and takes minutes).
    """
    n = len(words)
    budget = max(limit - start, 0)  # tokens that fit between the leading specials and the limit
    ends = [0] * (n + 1)  # ends[k]: tokens of the first k words (non-decreasing)

    def prefix(k: int) -> int:
        return count(" ".join(words[:k])) if k > 0 else 0

    def fill(lo: int, hi: int, at_lo: int, at_hi: int) -> None:
        """Set ends[lo+1 .. hi] knowing the counts at both ends (iterative, to bound the stack)."""
        stack = [(lo, hi, at_lo, at_hi)]
        while stack:
            lo, hi, at_lo, at_hi = stack.pop()
            at_hi = max(at_hi, at_lo)  # keep spans monotonic
            if hi - lo <= 1 or at_hi == at_lo or at_lo >= budget:
                # adjacent, or no token added in between, or everything here is cut by truncation
                ends[lo + 1 : hi] = [at_lo] * (hi - lo - 1)
                ends[hi] = at_hi
                continue
            mid = (lo + hi) // 2
            at_mid = min(max(prefix(mid), at_lo), at_hi)
            stack.append((mid, hi, at_mid, at_hi))
            stack.append((lo, mid, at_lo, at_mid))

    if n:
        fill(0, n, 0, prefix(n))
    counts = [ends[k] - ends[k - 1] for k in range(1, n + 1)]
    return spans_from_counts(words, counts, start, limit)


def spans_from_offsets(
    words: Sequence[tuple[str, int, int]],
    offsets: Sequence[tuple[int, int]],
    content: Sequence[bool],
    first: int,
) -> list[WordSpan]:
    """Map words with character spans to token spans through a tokenizer's offsets mapping.

    ``content[i]`` is False for special and padding tokens; ``first`` is where content starts.
    A word without tokens (cut by truncation or cleaned away) gets an empty span where its
    tokens would have been.
    """
    positions = [i for i, c in enumerate(content) if c]
    end_of_content = positions[-1] + 1 if positions else first
    spans = []
    for word, ws, we in words:
        hits = [i for i in positions if offsets[i][0] < we and offsets[i][1] > ws and offsets[i][1] > offsets[i][0]]
        if hits:
            spans.append(WordSpan(word, hits[0], hits[-1] + 1))
        else:
            after = [i for i in positions if offsets[i][0] >= we]
            pos = after[0] if after else end_of_content
            spans.append(WordSpan(word, pos, pos))
    return spans


def warn_truncation(cut: Sequence[int], limit: int, who: str) -> None:
    """Log one warning naming how many tokens truncation removed from which texts."""
    cuts = {i: n for i, n in enumerate(cut) if n > 0}
    if cuts:
        detail = ", ".join(f"text {i}: {n}" for i, n in cuts.items())
        logger.warning(
            "%s: %d token(s) cut by truncation at the %d-token limit (%s)", who, sum(cuts.values()), limit, detail
        )


def hf_tokenize(
    tokenizer: Any,
    texts: list[str],
    max_length: int,
    *,
    pad_to_max: bool,
    clean: Callable[[str], str] | None = None,
    who: str = "tokenizer",
) -> tuple[torch.Tensor, torch.Tensor, list[list[WordSpan]], list[int]]:
    """Tokenize with a HuggingFace tokenizer; words come from its offsets mapping.

    ``clean`` is applied word by word (as open_clip's HFTokenizer cleans whole texts) so that
    character offsets still point into known words. Returns ids ``[B, S]``, mask ``[B, S]``,
    words and the per-text truncation counts.
    """
    inputs, char_words, fallback = [], [], []
    for text in texts:
        words = word_char_spans(text)
        if clean is None:
            inputs.append(text)
            char_words.append(words)
            fallback.append(False)
            continue
        joined, spans, pos = [], [], 0
        for word, _, _ in words:
            cw = clean(word)
            if cw:
                pos += 1 if joined else 0
                joined.append(cw)
            spans.append((word, pos, pos + len(cw)))
            pos += len(cw)
        cleaned = " ".join(joined)
        whole = clean(text)
        ok = cleaned == whole
        if not ok:
            logger.warning(
                "%s: word-by-word cleaning differs from cleaning %s; word spans are approximate", who, preview(text)
            )
        inputs.append(cleaned if ok else whole)
        char_words.append(spans)
        fallback.append(not ok)

    n_special = tokenizer.num_special_tokens_to_add(pair=False)
    # verbose=False: this untruncated count is ours; mmx warns about the cut below, transformers need not.
    counted = tokenizer(inputs, add_special_tokens=False, verbose=False)["input_ids"]
    lengths = [len(ids) + n_special for ids in counted]
    cut = [max(0, n - max_length) for n in lengths]
    use_offsets = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(
        inputs,
        max_length=max_length,
        truncation=True,
        padding="max_length" if pad_to_max else "longest",
        return_offsets_mapping=use_offsets,
        return_special_tokens_mask=True,
        return_tensors="pt",
    )
    ids, mask = enc["input_ids"], enc["attention_mask"].bool()  # [B, S]
    content = (enc["special_tokens_mask"] == 0) & mask  # [B, S]
    first = _leading_specials(tokenizer)

    def count(prefix: str) -> int:
        prefix = clean(prefix) if clean is not None else prefix
        return len(tokenizer(prefix, add_special_tokens=False, verbose=False)["input_ids"])

    words: list[list[WordSpan]] = []
    for b in range(len(texts)):
        row = content[b].tolist()
        if use_offsets and not fallback[b]:
            words.append(spans_from_offsets(char_words[b], enc["offset_mapping"][b].tolist(), row, first))
        else:
            limit = first + sum(row)
            words.append(spans_from_prefixes([w for w, _, _ in char_words[b]], count, first, limit))
    return ids, mask, words, cut


def _leading_specials(tokenizer: Any) -> int:
    """How many special tokens a tokenizer puts before the content (1 for BERT's [CLS], 0 for T5)."""
    row = tokenizer("a", return_special_tokens_mask=True)["special_tokens_mask"]
    return row.index(0) if 0 in row else 0
