"""Context: the currency every encoder returns and every block accepts."""

import pytest
import torch

from mmx import Context, WordSpan


def _ctx(b=3, s=4, d=6, words=True):
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 2:] = False
    spans = [[WordSpan(f"w{i}", 1, 2)] for i in range(b)] if words else None
    return Context(tokens=torch.randn(b, s, d), mask=mask, pooled=torch.randn(b, 5), words=spans)


def test_shapes_are_validated_with_clear_messages():
    with pytest.raises(ValueError, match=r"tokens must be a tensor \[B, S, D\]; got \(2, 3\)"):
        Context(tokens=torch.zeros(2, 3), mask=torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool tensor"):
        Context(tokens=torch.zeros(2, 3, 4), mask=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\[B, S\] = \(2, 3\); got \(2, 4\)"):
        Context(tokens=torch.zeros(2, 3, 4), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="pooled"):
        Context(tokens=torch.zeros(2, 3, 4), mask=torch.ones(2, 3, dtype=torch.bool), pooled=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="grid"):
        Context(tokens=torch.zeros(2, 6, 4), mask=torch.ones(2, 6, dtype=torch.bool), grid=(2, 2))


def test_indexing_keeps_words_aligned_with_samples():
    ctx = _ctx()
    one = ctx[1]
    assert one.tokens.shape == (1, 4, 6) and one.words == [ctx.words[1]]
    picked = ctx[torch.tensor([2, 0, 2])]
    assert picked.batch_size == 3 and [w[0].word for w in picked.words] == ["w2", "w0", "w2"]
    torch.testing.assert_close(picked.tokens[1], ctx.tokens[0])
    assert ctx[1:].words == ctx.words[1:] and ctx[-1].words == [ctx.words[-1]]
    assert ctx[torch.tensor([True, False, True])].words == [ctx.words[0], ctx.words[2]]


def test_cat_joins_sources_along_tokens_with_their_masks():
    a, b = _ctx(words=True), _ctx(s=2, words=False)
    joined = Context.cat([a, b])
    assert joined.tokens.shape == (3, 6, 6) and joined.mask.shape == (3, 6)
    assert torch.equal(joined.mask[:, :4], a.mask) and joined.pooled.shape == (3, 10)
    assert joined.words is None
    with pytest.raises(ValueError, match="token width"):
        Context.cat([a, _ctx(d=7)])


def test_to_casts_floats_and_keeps_the_mask_bool():
    half = _ctx().to(dtype=torch.bfloat16)
    assert half.tokens.dtype == torch.bfloat16 and half.pooled.dtype == torch.bfloat16
    assert half.mask.dtype == torch.bool and half.dim == 6
