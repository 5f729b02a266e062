"""Hostile texts through the real text encoders: MiniLM (HFTextEncoder) and CLIP ViT-B-32 (random weights).

Empty strings, whitespace only, 10,000 words, non-ASCII, emoji, control characters, NUL and mixed
batches of them must give a correct Context (finite tokens, a mask holding at least the special
tokens, word spans that are the text's whitespace words in order and inside the real tokens,
truncation with a warning), or a clear error naming the text. Never a hang, a NaN, or an error
from inside the tokenizer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from mmx.context import Context  # noqa: E402
from mmx.encoders import CLIPTextEncoder, HFTextEncoder  # noqa: E402
from mmx.encoders.base import TextEncoder, spans_from_counts, spans_from_prefixes  # noqa: E402

FEW = settings(max_examples=max(4, settings.default.max_examples // 4))  # each example runs both encoders

TEN_THOUSAND_WORDS = " ".join(f"word{i % 97}" for i in range(10_000))
NAMED = {
    "empty": "",
    "whitespace": " \t\n\r\x0b\x0c  \u00a0\u2003\u3000",
    "ten_thousand_words": TEN_THOUSAND_WORDS,
    "non_ascii": "Ça coûte 5€ — naïve façade, 東京タワー, Москва, שלום עולם, مرحبا",
    "emoji": "a 🐱 on a 🚗 👩‍👩‍👧‍👦 🇫🇷 🏳️‍🌈 ❤️",
    "control": "a\x01b\x02 c\x1b[31m red\x7f \x85 next\u2028line",
    "nul": "a\x00b \x00 c\x00",
    "zero_width": "\u200b\u200d \ufeffhi \u2060",
    "combining": "e\u0301\u0301\u0301 Z\u0351\u0352\u0353\u0354\u0355",
    "bidi": "\u202eabc\u202c \u2066x\u2069",
    "one_long_word": "a" * 20_000,
    "mojibake": "Ã© â€™ Ã¼ber",
    "html": "&amp; &lt;b&gt; &#x1F431; &nbsp;",
}

# Characters that break tokenizers: controls, separators, format characters, emoji, combining marks.
HOSTILE_CHARS = st.one_of(
    st.characters(codec="utf-8"),  # anything encodable (no lone surrogates)
    st.sampled_from(list("\x00\x01\x1b\x7f\x85\u00a0\u200b\u200d\u2028\u202e\ufeff\ufffd🐱👩‍👧é\u0301 \t\n")),
)
HOSTILE_TEXT = st.one_of(
    st.text(HOSTILE_CHARS, max_size=40),
    st.sampled_from(list(NAMED.values())),
    st.lists(st.text(HOSTILE_CHARS, min_size=1, max_size=8), max_size=200).map(" ".join),  # many words
)


@pytest.fixture(scope="module")
def minilm(minilm_path: str) -> HFTextEncoder:
    return HFTextEncoder(minilm_path)


@pytest.fixture(scope="module")
def clip() -> CLIPTextEncoder:
    torch.manual_seed(0)
    return CLIPTextEncoder("ViT-B-32", pretrained=None)


@pytest.fixture(scope="module", params=["hf", "clip"])
def encoder(request: pytest.FixtureRequest) -> TextEncoder:
    return request.getfixturevalue("minilm" if request.param == "hf" else "clip")


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextmanager
def warnings_of_mmx() -> Iterator[list[str]]:
    """The WARNING messages mmx.encoders logs inside the block (caplog is function-scoped: not for @given)."""
    handler, logger = _Records(), logging.getLogger("mmx.encoders")
    logger.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logger.removeHandler(handler)


def check_context(encoder: TextEncoder, texts: list[str], ctx: Context, warnings: list[str]) -> None:
    """The invariants every encoded batch must satisfy, whatever the texts."""
    b = len(texts)
    s = ctx.tokens.shape[1]
    assert ctx.tokens.shape == (b, s, encoder.dim) and torch.isfinite(ctx.tokens).all()
    assert ctx.pooled is not None and ctx.pooled.shape == (b, encoder.pooled_dim) and torch.isfinite(ctx.pooled).all()
    assert ctx.mask.dtype == torch.bool and ctx.mask.shape == (b, s)
    limit = encoder.max_length if isinstance(encoder, HFTextEncoder) else encoder.context_length
    assert s <= limit
    tok = encoder.tokenize(texts)
    for i, text in enumerate(texts):
        real = int(ctx.mask[i].sum())
        assert real >= 2, f"text {i}: the start and end special tokens are always real"
        assert ctx.mask[i, :real].all() and not ctx.mask[i, real:].any(), "real tokens first, then padding"
        words = ctx.words[i]
        assert [w.word for w in words] == text.split(), "one span per whitespace word, in order"
        previous_start = 1
        for w in words:
            assert 1 <= w.start <= w.end <= real - 1, f"{w} must lie between the special tokens (real={real})"
            assert w.start >= previous_start, "spans are in text order"
            previous_start = w.start
        if tok.cut[i]:
            assert real == limit, "a truncated text fills the whole limit"
            assert any("cut by truncation" in m and f"text {i}: {tok.cut[i]}" in m for m in warnings), warnings
        assert all(len(m) < 2_000 for m in warnings), "log lines quote long texts shortened"


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_hostile_texts(encoder: TextEncoder, name: str) -> None:
    text = NAMED[name]
    start = time.perf_counter()
    with warnings_of_mmx() as warnings:
        ctx = encoder([text, "a red circle"])
    check_context(encoder, [text, "a red circle"], ctx, warnings)
    assert time.perf_counter() - start < 30, "no hang: even 10,000 words encode in seconds"
    if name == "ten_thousand_words":
        assert ctx.mask[0].all() and len(ctx.words[0]) == 10_000
        assert any("cut by truncation" in m for m in warnings)


def test_mixed_batch_of_everything(encoder: TextEncoder) -> None:
    texts = list(NAMED.values())
    with warnings_of_mmx() as warnings:
        ctx = encoder(texts)
    check_context(encoder, texts, ctx, warnings)
    # padding never leaks into a row: the short texts encode as they do alone
    alone = encoder([NAMED["emoji"]])
    row = texts.index(NAMED["emoji"])
    n = int(alone.mask[0].sum())
    torch.testing.assert_close(ctx.tokens[row, :n], alone.tokens[0, :n], atol=1e-4, rtol=1e-4)


@FEW
@given(st.lists(HOSTILE_TEXT, min_size=1, max_size=4))
def test_random_hostile_batches(minilm: HFTextEncoder, clip: CLIPTextEncoder, texts: list[str]) -> None:
    for encoder in (minilm, clip):
        with warnings_of_mmx() as warnings:
            ctx = encoder(texts)
        check_context(encoder, texts, ctx, warnings)


@FEW
@given(st.lists(HOSTILE_TEXT, min_size=1, max_size=3), st.data())
def test_lone_surrogates_are_a_clear_error(
    minilm: HFTextEncoder, clip: CLIPTextEncoder, texts: list[str], data: st.DataObject
) -> None:
    """A lone surrogate (JSON "\\ud800", surrogateescape-decoded bytes) is not Unicode: mmx says where it is."""
    row = data.draw(st.integers(0, len(texts) - 1))
    at = data.draw(st.integers(0, len(texts[row])))
    texts[row] = texts[row][:at] + data.draw(st.sampled_from(["\ud800", "\udfff", "\udc80"])) + texts[row][at:]
    for encoder in (minilm, clip):
        with pytest.raises(ValueError, match="lone surrogate") as info:
            encoder(texts)
        assert f"texts[{row}]" in str(info.value) and f"position {at}" in str(info.value)


def test_clip_approximate_spans_of_a_long_text_are_fast(clip: CLIPTextEncoder) -> None:
    """Regression: when word tokens differ from the whole text's, spans counted every prefix (quadratic).

    "\\x85" splits words for str.split() but not for CLIP's cleaning, so the fallback runs; 10,000
    words took about 5 minutes, and must now take well under a few seconds.
    """
    text = "\x85_ " + TEN_THOUSAND_WORDS
    start = time.perf_counter()
    with warnings_of_mmx() as warnings:
        tok = clip.tokenize(text)
    assert time.perf_counter() - start < 15
    assert any("approximate" in m for m in warnings) and all(len(m) < 500 for m in warnings)
    assert len(tok.words[0]) == 10_001 and tok.words[0][-1].start == tok.words[0][-1].end == 76


@given(st.lists(st.integers(0, 4), max_size=60), st.integers(1, 3), st.integers(0, 80))
def test_prefix_spans_equal_counting_every_prefix(pieces: list[int], start: int, limit: int) -> None:
    """The bisection in spans_from_prefixes gives what counting every prefix gives, with fewer counts."""
    words = [f"w{i}" for i in range(len(pieces))]
    tokens = {w: n for w, n in zip(words, pieces)}
    calls = []

    def count(prefix: str) -> int:
        calls.append(prefix)
        return sum(tokens[w] for w in prefix.split())

    expected = spans_from_counts(words, pieces, start, limit)
    assert spans_from_prefixes(words, count, start, limit) == expected
    assert len(calls) <= len(words) + 1
