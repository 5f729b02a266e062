"""CrossAttention / MultiHeadAttention against an explicit softmax(QK^T / sqrt(d)) V written here."""

import math

import pytest
import torch

from mmx import Context, CrossAttention, MultiHeadAttention

B, L, S, H, DH = 2, 6, 5, 3, 8


def reference(attn: CrossAttention, x, context=None, allowed=None, bias=None):
    """Explicit attention with the module's weights.

    ``allowed``: bool [B, H, L, S] (True = may attend) or None; ``bias``: float [B, H, L, S] or None.
    A query with no allowed key gets zeros in that head; with none in any head, a zero output row.
    """
    src = x if context is None else context
    q = x @ attn.to_q.weight.T
    k = src @ attn.to_k.weight.T
    v = src @ attn.to_v.weight.T
    if attn.to_q.bias is not None:
        q, k, v = q + attn.to_q.bias, k + attn.to_k.bias, v + attn.to_v.bias
    b, l, s = x.shape[0], x.shape[1], src.shape[1]
    q = q.reshape(b, l, attn.heads, attn.dim_head).permute(0, 2, 1, 3)
    k = k.reshape(b, s, attn.heads, attn.dim_head).permute(0, 2, 1, 3)
    v = v.reshape(b, s, attn.heads, attn.value_dim_head).permute(0, 2, 1, 3)
    scores = q @ k.transpose(-1, -2) / math.sqrt(attn.dim_head)
    if bias is not None:
        scores = scores + bias
    if allowed is None:
        allowed = torch.ones_like(scores, dtype=torch.bool)
    allowed = allowed.expand_as(scores)
    scores = scores.masked_fill(~allowed, -1e30)
    probs = torch.softmax(scores, dim=-1) * allowed.any(-1, keepdim=True)
    out = (probs @ v).permute(0, 2, 1, 3).reshape(b, l, -1)
    out = out @ attn.to_out[0].weight.T + attn.to_out[0].bias
    out = out * allowed.any(-1).any(1)[..., None]
    return out, probs


def _tensors(dtype=torch.float32, context_dim=12, query_dim=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, query_dim, generator=g, dtype=dtype)
    c = torch.randn(B, S, context_dim, generator=g, dtype=dtype)
    return x, c


@pytest.fixture
def cross():
    torch.manual_seed(0)
    return CrossAttention(16, context_dim=12, heads=H, dim_head=DH)


def test_self_attention_matches_reference():
    torch.manual_seed(0)
    attn = CrossAttention(16, heads=H, dim_head=DH, qkv_bias=True)
    x, _ = _tensors()
    out = attn(x)
    assert out.shape == (B, L, 16)
    torch.testing.assert_close(out, reference(attn, x)[0], atol=1e-5, rtol=1e-5)


def test_cross_attention_matches_reference(cross):
    x, c = _tensors()
    out = cross(x, c)
    assert out.shape == (B, L, 16)
    torch.testing.assert_close(out, reference(cross, x, c)[0], atol=1e-5, rtol=1e-5)


def test_value_width_and_out_dim_differ_from_query_width():
    torch.manual_seed(0)
    attn = CrossAttention(16, context_dim=12, heads=H, dim_head=DH, value_dim_head=5, out_dim=7)
    assert attn.to_v.out_features == H * 5 and attn.to_out[0].in_features == H * 5
    x, c = _tensors()
    out = attn(x, c)
    assert out.shape == (B, L, 7)
    torch.testing.assert_close(out, reference(attn, x, c)[0], atol=1e-5, rtol=1e-5)


def _key_pattern():
    """Sample 0 sees its first 3 keys, sample 1 all 5."""
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[0, 3:] = False
    return keep


MASK_FORMS = {
    "bool [B, S]": lambda keep: (keep, keep[:, None, None, :], None),
    "bool [B, L, S]": lambda keep: (
        keep[:, None, :].expand(B, L, S).clone(),
        keep[:, None, None, :],
        None,
    ),
    "bool [B, 1, 1, S]": lambda keep: (keep[:, None, None, :], keep[:, None, None, :], None),
    "bool [B, H, L, S]": lambda keep: (
        keep[:, None, None, :].expand(B, H, L, S).clone(),
        keep[:, None, None, :],
        None,
    ),
    "float [B, S] with -inf": lambda keep: (
        torch.zeros(B, S).masked_fill(~keep, float("-inf")),
        keep[:, None, None, :],
        None,
    ),
}


@pytest.mark.parametrize("form", list(MASK_FORMS))
def test_every_mask_form_matches_reference(cross, form):
    x, c = _tensors()
    mask, allowed, bias = MASK_FORMS[form](_key_pattern())
    out = cross(x, c, mask=mask)
    torch.testing.assert_close(out, reference(cross, x, c, allowed, bias)[0], atol=1e-5, rtol=1e-5)


def test_per_query_and_per_head_masks_differ_by_row(cross):
    x, c = _tensors()
    g = torch.Generator().manual_seed(3)
    allowed = torch.rand(B, H, L, S, generator=g) > 0.4
    allowed[..., 0] = True  # every row keeps at least one key here
    out = cross(x, c, mask=allowed)
    torch.testing.assert_close(out, reference(cross, x, c, allowed)[0], atol=1e-5, rtol=1e-5)


def test_additive_float_bias_broadcast_over_batch(cross):
    x, c = _tensors()
    bias = torch.randn(1, H, L, S)
    out = cross(x, c, mask=bias)
    torch.testing.assert_close(out, reference(cross, x, c, None, bias)[0], atol=1e-5, rtol=1e-5)


def test_context_object_brings_its_mask(cross):
    x, c = _tensors()
    keep = _key_pattern()
    out = cross(x, Context(tokens=c, mask=keep))
    torch.testing.assert_close(out, cross(x, c, mask=keep))
    # values of masked tokens cannot leak into the output
    c2 = c.clone()
    c2[0, 3:] = 1e3
    torch.testing.assert_close(out, cross(x, Context(tokens=c2, mask=keep)))


def test_causal_self_attention_matches_reference_and_never_sees_the_future():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, heads=H, dim_head=DH)
    x, _ = _tensors()
    tri = torch.ones(L, L, dtype=torch.bool).tril()
    out = attn(x, causal=True)
    torch.testing.assert_close(out, reference(attn, x, None, tri)[0], atol=1e-5, rtol=1e-5)
    x2 = x.clone()
    x2[:, 4:] = torch.randn(B, L - 4, 16)
    out2 = attn(x2, causal=True)
    torch.testing.assert_close(out2[:, :4], out[:, :4])
    assert not torch.allclose(out2[:, 4:], out[:, 4:])


def test_causal_combines_with_padding_mask():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, heads=H, dim_head=DH)
    x, _ = _tensors()
    keep = torch.ones(B, L, dtype=torch.bool)
    keep[1, 0] = False  # padding at the front: sample 1's first query then sees nothing
    allowed = keep[:, None, None, :] & torch.ones(L, L, dtype=torch.bool).tril()
    out = attn(x, mask=keep, causal=True)
    torch.testing.assert_close(out, reference(attn, x, None, allowed)[0], atol=1e-5, rtol=1e-5)
    assert torch.all(out[1, 0] == 0)


def test_causal_with_fewer_queries_than_keys_aligns_to_the_end():
    """Decoding with a cache: the last 2 queries of a 6-step sequence see keys up to their own position."""
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, heads=H, dim_head=DH)
    x, _ = _tensors()
    full = attn(x, causal=True)
    last = CrossAttention(16, 16, heads=H, dim_head=DH)
    last.load_state_dict(attn.state_dict())
    out = last(x[:, -2:], x, causal=True)
    torch.testing.assert_close(out, full[:, -2:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_all_masked_rows_give_zeros_and_finite_gradients(cross, kind):
    x, c = _tensors()
    x.requires_grad_(True)
    c.requires_grad_(True)
    keep = torch.ones(B, S, dtype=torch.bool)
    keep[1] = False  # sample 1 has no real key at all
    mask = keep if kind == "bool" else torch.zeros(B, S).masked_fill(~keep, float("-inf"))
    out = cross(x, c, mask=mask)
    assert torch.isfinite(out).all()
    assert torch.all(out[1] == 0), "an all-masked row must be zeros, not an average over padding"
    torch.testing.assert_close(out[0], cross(x[:1], c[:1])[0], atol=1e-5, rtol=1e-5)
    out.square().sum().backward()
    for t in (x.grad, c.grad, *(p.grad for p in cross.parameters())):
        assert torch.isfinite(t).all()
    assert torch.all(c.grad[1] == 0) and torch.all(x.grad[1] == 0)


def test_all_masked_in_some_heads_only():
    torch.manual_seed(0)
    attn = CrossAttention(16, 12, heads=H, dim_head=DH)
    x, c = _tensors()
    allowed = torch.ones(B, H, L, S, dtype=torch.bool)
    allowed[:, 0, 2] = False  # query 2 sees nothing in head 0 only
    out = attn(x, c, mask=allowed)
    torch.testing.assert_close(out, reference(attn, x, c, allowed)[0], atol=1e-5, rtol=1e-5)


def test_gradients_match_reference(cross):
    x, c = _tensors()
    keep = _key_pattern()
    inputs = [x.clone().requires_grad_(True), c.clone().requires_grad_(True)]
    ref_inputs = [x.clone().requires_grad_(True), c.clone().requires_grad_(True)]
    weight = torch.randn(B, L, 16)
    (cross(*inputs, mask=keep) * weight).sum().backward()
    grads = [t.grad for t in inputs] + [p.grad.clone() for p in cross.parameters()]
    cross.zero_grad()
    (reference(cross, *ref_inputs, keep[:, None, None, :])[0] * weight).sum().backward()
    ref_grads = [t.grad for t in ref_inputs] + [p.grad for p in cross.parameters()]
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_bf16_on_cpu_is_close_to_float32(cross):
    x, c = _tensors()
    keep = _key_pattern()
    want = reference(cross, x, c, keep[:, None, None, :])[0]
    half = CrossAttention(16, 12, heads=H, dim_head=DH).to(torch.bfloat16)
    half.load_state_dict(cross.state_dict())
    out = half(x.bfloat16(), c.bfloat16(), mask=keep)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=3e-2, rtol=3e-2)
    probs = half(x.bfloat16(), c.bfloat16(), mask=keep, return_attention=True)[1]
    assert probs.dtype == torch.float32
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, L))


def test_return_attention_gives_probs_beside_the_fused_output(cross):
    x, c = _tensors()
    keep = _key_pattern()
    out, probs = cross(x, c, mask=keep, return_attention=True)
    assert torch.equal(out, cross(x, c, mask=keep)), "the returned output must be the fused one"
    assert probs.shape == (B, H, L, S)
    torch.testing.assert_close(probs, reference(cross, x, c, keep[:, None, None, :])[1], atol=1e-6, rtol=1e-5)
    assert torch.all(probs[0, ..., 3:] == 0)
    torch.testing.assert_close(cross.attention_probs(x, c, mask=keep), probs)


def test_probabilities_for_causal_rows_sum_to_one_over_the_past():
    torch.manual_seed(0)
    attn = MultiHeadAttention(16, heads=H, dim_head=DH)
    x, _ = _tensors()
    _, probs = attn(x, causal=True, return_attention=True)
    assert torch.all(probs.triu(diagonal=1) == 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(B, H, L))


def test_multihead_attention_is_the_self_form():
    torch.manual_seed(0)
    mha = MultiHeadAttention(16, heads=H, dim_head=DH, value_dim_head=4)
    ca = CrossAttention(16, heads=H, dim_head=DH, value_dim_head=4)
    ca.load_state_dict(mha.state_dict())
    x, _ = _tensors()
    torch.testing.assert_close(mha(x), ca(x))


def test_parameter_names_match_diffusers_attention(cross):
    from diffusers.models.attention_processor import Attention

    theirs = Attention(16, cross_attention_dim=12, heads=H, dim_head=DH, bias=False, out_bias=True)
    theirs.load_state_dict(cross.state_dict())
    x, c = _tensors()
    torch.testing.assert_close(cross(x, c), theirs(x, encoder_hidden_states=c), atol=1e-5, rtol=1e-5)


def test_hooks_see_queries_keys_and_mask_and_can_be_removed(cross):
    seen = []
    remove = cross.add_hook(
        lambda module, q, k, mask: seen.append((q.shape, k.shape, None if mask is None else mask.shape))
    )
    x, c = _tensors()
    cross(x, c, mask=_key_pattern())
    assert seen == [((B, H, L, DH), (B, H, S, DH), (B, 1, 1, S))]
    remove()
    cross(x, c)
    assert len(seen) == 1


def test_split_context_reads_keys_from_the_first_half_and_values_from_the_second():
    torch.manual_seed(0)
    split = CrossAttention(16, context_dim=12, heads=H, dim_head=DH, split_context=True)
    assert split.to_k.in_features == split.to_v.in_features == 6
    plain = CrossAttention(16, context_dim=6, heads=H, dim_head=DH)
    plain.load_state_dict(split.state_dict())
    x, c = _tensors()
    keys, values = c[..., :6], c[..., 6:]
    _, probs = reference(plain, x, keys)
    expected = probs @ (values @ plain.to_v.weight.T).reshape(B, S, H, DH).permute(0, 2, 1, 3)
    expected = expected.permute(0, 2, 1, 3).reshape(B, L, -1) @ plain.to_out[0].weight.T + plain.to_out[0].bias
    torch.testing.assert_close(split(x, c), expected, atol=1e-5, rtol=1e-5)
    # where each query looks depends on the key half alone
    other_values = torch.cat([keys, torch.randn_like(values)], dim=-1)
    torch.testing.assert_close(split(x, other_values, return_attention=True)[1], probs, atol=1e-5, rtol=1e-5)
    assert "split_context=True" in repr(split)
    for context_dim in (None, 7):
        with pytest.raises(ValueError, match=f"split_context=True needs .*context_dim={context_dim}"):
            CrossAttention(16, context_dim=context_dim, split_context=True)


# -- errors name what was expected and what came ---------------------------------------------------
def test_wrong_query_width_names_shapes(cross):
    with pytest.raises(ValueError, match=r"query_dim=16.*\(2, 6, 15\)"):
        cross(torch.randn(2, 6, 15), torch.randn(2, 5, 12))


def test_wrong_context_width_names_shapes(cross):
    with pytest.raises(ValueError, match=r"context_dim=12.*\(2, 5, 10\)"):
        cross(torch.randn(2, 6, 16), torch.randn(2, 5, 10))


def test_batch_mismatch(cross):
    with pytest.raises(ValueError, match="same batch size"):
        cross(torch.randn(2, 6, 16), torch.randn(3, 5, 12))


@pytest.mark.parametrize("shape", [(2, 4), (3, 5), (2, 6, 4), (2, 2, 6, 5), (5,)])
def test_mask_that_cannot_broadcast(cross, shape):
    with pytest.raises(ValueError, match=r"mask"):
        cross(torch.randn(2, 6, 16), torch.randn(2, 5, 12), mask=torch.ones(shape, dtype=torch.bool))


def test_integer_mask_is_a_type_error_with_a_hint(cross):
    with pytest.raises(TypeError, match=r"int64.*mask\.bool\(\)"):
        cross(torch.randn(2, 6, 16), torch.randn(2, 5, 12), mask=torch.ones(2, 5, dtype=torch.long))


def test_non_divisible_heads():
    with pytest.raises(ValueError, match=r"query_dim=30, heads=4"):
        CrossAttention(30, heads=4, dim_head=None)
    assert CrossAttention(32, heads=4, dim_head=None).dim_head == 8


def test_bad_constructor_values():
    with pytest.raises(ValueError, match="heads"):
        CrossAttention(16, heads=0)
    with pytest.raises(ValueError, match="context_dim"):
        CrossAttention(16, context_dim=-3)
