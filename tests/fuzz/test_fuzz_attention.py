"""Hostile inputs to the attention blocks: random shapes (empty ones too), dtypes and masks.

Each call either gives the right answer (checked against a float64 reference written out with an
explicit softmax), finite in forward and backward, or raises a clear TypeError / ValueError from
mmx itself, never an error from inside torch and never a NaN.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from mmx import CrossAttention, MultiHeadAttention, SpatialTransformer, TemporalTransformer, TransformerBlock
from mmx.nn.masks import prepare_mask

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-9, torch.bfloat16: 0.1, torch.float16: 0.05}
MASK_KINDS = ("none", "bool_pad", "bool_query", "bool_head", "bool_bcast", "float_pad", "float_query")
BAD_MASK_KINDS = ("int", "wrong_keys", "wrong_batch", "one_dim", "five_dim", "nan", "posinf", "list")


def _mmx_frame(err: BaseException) -> bool:
    """Whether the innermost frame of ``err``'s traceback is in mmx (a clear error of ours, not torch's)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and "/mmx/" in tb.tb_frame.f_code.co_filename.replace("\\", "/")


def _make_mask(kind: str, b: int, h: int, l: int, s: int, g: torch.Generator) -> torch.Tensor | None:
    """A mask of ``kind``; random rows are fully masked (every key False / -inf)."""
    if kind == "none":
        return None
    shapes = {
        "bool_pad": (b, s),
        "float_pad": (b, s),
        "bool_query": (b, l, s),
        "float_query": (b, l, s),
        "bool_head": (b, h, l, s),
        "bool_bcast": (1, 1, 1, s),
    }
    allowed = torch.rand(shapes[kind], generator=g) < 0.6
    if allowed.ndim >= 2 and allowed.numel() > 0:
        empty_rows = torch.rand(allowed.shape[:-1], generator=g) < 0.3
        allowed &= ~empty_rows[..., None]  # some rows see no key at all
    if kind.startswith("bool"):
        return allowed
    bias = torch.randn(allowed.shape, generator=g)  # finite additive values where allowed
    return bias.masked_fill(~allowed, float("-inf"))


def _bad_mask(kind: str, b: int, l: int, s: int) -> Any:
    return {
        "int": torch.ones(b, s, dtype=torch.long),
        "wrong_keys": torch.ones(b, s + 1, dtype=torch.bool),
        "wrong_batch": torch.ones(b + 1, s, dtype=torch.bool),
        "one_dim": torch.ones(s, dtype=torch.bool),
        "five_dim": torch.ones(1, 1, 1, 1, s, dtype=torch.bool),
        "nan": torch.full((b, s), float("nan")),
        "posinf": torch.full((b, s), float("inf")),
        "list": [[True] * s] * b,
    }[kind]


def _mask4(mask: torch.Tensor | None, b: int, h: int, l: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(allowed bool [B, H, L, S], additive float64 [B, H, L, S]) of a user mask, for the reference."""
    allowed = torch.ones(b, h, l, s, dtype=torch.bool)
    additive = torch.zeros(b, h, l, s, dtype=torch.float64)
    if mask is None:
        return allowed, additive
    m = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None] if mask.ndim == 3 else mask
    m = m.expand(b, h, l, s)
    if m.dtype == torch.bool:
        return m.clone(), additive
    return ~torch.isneginf(m), m.double().masked_fill(torch.isneginf(m), 0.0)


def _reference(
    att: CrossAttention, x: torch.Tensor, context: torch.Tensor | None, mask: torch.Tensor | None, causal: bool
) -> torch.Tensor:
    """Explicit float64 attention: empty rows read nothing, and a query with no key in any head gets zeros."""
    ref = copy.deepcopy(att).double()
    with torch.no_grad():
        q, k, v = ref.project(x.double(), None if context is None else context.double())
        b, h, l, _ = q.shape
        s = k.shape[2]
        allowed, additive = _mask4(mask, b, h, l, s)
        if causal:
            allowed &= torch.ones(l, s, dtype=torch.bool).tril(diagonal=s - l)
        scores = q @ k.transpose(-1, -2) * ref.scale + additive
        scores = scores.masked_fill(~allowed, float("-inf"))
        has_key = allowed.any(-1, keepdim=True)  # (B, H, L, 1)
        probs = scores.masked_fill(~has_key, 0.0).softmax(-1) * has_key
        out = (probs @ v).transpose(1, 2).reshape(b, l, h * ref.value_dim_head)
        return ref.to_out(out) * has_key.any(1)  # (B, L, D)


@st.composite
def attention_case(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "b": draw(st.integers(0, 3)),
        "l": draw(st.integers(0, 5)),
        "s": draw(st.integers(0, 6)),
        "heads": draw(st.integers(1, 3)),
        "dim_head": draw(st.sampled_from([1, 2, 4, 8])),
        "query_dim": draw(st.sampled_from([1, 3, 8])),
        "context_dim": draw(st.sampled_from([None, 2, 5])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "mask": draw(st.sampled_from(MASK_KINDS)),
        "causal": draw(st.booleans()),
        "scale": draw(st.sampled_from([1.0, 1e-3, 30.0])),  # tiny and large activations
        "seed": draw(st.integers(0, 2**16)),
    }


@given(attention_case())
def test_cross_attention_matches_reference_and_stays_finite(case: dict[str, Any]) -> None:
    b, l, heads = case["b"], case["l"], case["heads"]
    g = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    cross = case["context_dim"] is not None
    att = CrossAttention(case["query_dim"], case["context_dim"], heads=heads, dim_head=case["dim_head"], qkv_bias=True)
    dtype = case["dtype"]
    s = case["s"] if cross else l
    x = (torch.randn(b, l, case["query_dim"], generator=g) * case["scale"]).to(dtype).requires_grad_()
    context = torch.randn(b, s, case["context_dim"], generator=g).to(dtype).requires_grad_() if cross else None
    mask = _make_mask(case["mask"], b, heads, l, s, g)
    expected = _reference(att, x.detach(), None if context is None else context.detach(), mask, case["causal"])
    att = att.to(dtype)

    out = att(x, context, mask=mask, causal=case["causal"])

    assert out.shape == (b, l, case["query_dim"]) and out.dtype == dtype
    assert torch.isfinite(out).all(), "finite inputs must give a finite output"
    tol = TOLERANCE[dtype] * max(1.0, case["scale"])
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=tol)
    if out.numel():
        out.float().square().sum().backward()
        for name, grad in (("x", x.grad), ("context", None if context is None else context.grad)):
            assert grad is None or torch.isfinite(grad).all(), f"non-finite gradient of {name}"
        for name, p in att.named_parameters():
            assert p.grad is None or torch.isfinite(p.grad).all(), f"non-finite gradient of {name}"


@given(attention_case(), st.sampled_from(BAD_MASK_KINDS))
def test_bad_masks_are_clear_errors_of_mmx(case: dict[str, Any], kind: str) -> None:
    b, l, s = max(case["b"], 1), max(case["l"], 1), max(case["s"], 1)
    att = CrossAttention(8, 5, heads=case["heads"], dim_head=case["dim_head"])
    x, context = torch.randn(b, l, 8), torch.randn(b, s, 5)
    mask = _bad_mask(kind, b, l, s)
    with pytest.raises((TypeError, ValueError)) as info:
        att(x, context, mask=mask)
    assert _mmx_frame(info.value), f"the error must come from mmx, not from inside torch: {info.value!r}"
    message = str(info.value)
    if kind == "int":
        assert "torch.int64" in message and ".bool()" in message
    elif kind in ("nan", "posinf"):
        assert ("NaN" if kind == "nan" else "+inf") in message
    elif kind != "list":
        assert str(tuple(mask.shape)) in message, "a shape error names the shape it got"


@given(
    st.sampled_from([torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]),
    st.sampled_from(["x", "context"]),
)
def test_non_floating_inputs_are_type_errors(dtype: torch.dtype, which: str) -> None:
    att = CrossAttention(4, 3, heads=2, dim_head=2)
    x, context = torch.randn(2, 3, 4), torch.randn(2, 5, 3)
    if which == "x":
        x = torch.ones(2, 3, 4, dtype=dtype)
    else:
        context = torch.ones(2, 5, 3, dtype=dtype)
    with pytest.raises(TypeError, match=which) as info:
        att(x, context)
    assert str(dtype) in str(info.value) and _mmx_frame(info.value)


@given(st.sampled_from(DTYPES), st.sampled_from(DTYPES))
def test_input_and_weight_dtypes_must_agree_outside_autocast(weights: torch.dtype, inputs: torch.dtype) -> None:
    att = CrossAttention(4, 3, heads=2, dim_head=2).to(weights)
    x, context = torch.randn(1, 2, 4, dtype=inputs), torch.randn(1, 3, 3, dtype=inputs)
    if weights == inputs:
        assert torch.isfinite(att(x, context)).all()
        return
    with pytest.raises(TypeError, match="cast") as info:
        att(x, context)
    assert str(inputs) in str(info.value) and str(weights) in str(info.value) and _mmx_frame(info.value)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts by itself, but never a float64 input
        if torch.float64 in (inputs, weights):
            with pytest.raises(TypeError, match="float64"):
                att(x, context)
        else:
            assert torch.isfinite(att(x, context).float()).all()


@given(
    st.integers(0, 3),
    st.integers(0, 5),
    st.integers(1, 2),
    st.sampled_from(["none", "bool_pad", "bool_query"]),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_multi_head_self_attention_causal_and_masked(
    b: int, l: int, heads: int, kind: str, causal: bool, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    att = MultiHeadAttention(6, heads=heads, dim_head=3)
    x = torch.randn(b, l, 6, generator=g)
    mask = _make_mask(kind, b, heads, l, l, g)
    out = att(x, mask=mask, causal=causal)
    torch.testing.assert_close(out.double(), _reference(att, x, None, mask, causal), atol=1e-4, rtol=1e-4)


@st.composite
def block_case(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "b": draw(st.integers(0, 3)),
        "l": draw(st.integers(0, 5)),
        "s": draw(st.integers(0, 5)),
        "context_dim": draw(st.sampled_from([None, 3])),
        "self_attention": draw(st.booleans()),
        "dtype": draw(st.sampled_from(DTYPES)),
        "all_masked": draw(st.booleans()),
        "training": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@given(block_case())
def test_transformer_block_is_finite_forward_and_backward(case: dict[str, Any]) -> None:
    assume(case["self_attention"] or case["context_dim"] is not None)
    torch.manual_seed(case["seed"])
    b, l, s, dtype = case["b"], case["l"], case["s"], case["dtype"]
    block = TransformerBlock(8, case["context_dim"], heads=2, dim_head=4, self_attention=case["self_attention"])
    block = block.to(dtype).train(case["training"])
    x = torch.randn(b, l, 8, dtype=dtype, requires_grad=True)
    context = mask = None
    if case["context_dim"] is not None:
        context = torch.randn(b, s, 3, dtype=dtype)
        mask = torch.zeros(b, s, dtype=torch.bool) if case["all_masked"] else torch.rand(b, s) < 0.5
    out = block(x, context, mask=mask)
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
    if case["all_masked"] and context is not None and not case["self_attention"]:
        # nothing to read: the cross-attention adds nothing; only the feed-forward acts
        torch.testing.assert_close(out, x + block.ff(block.norm3(x)))
    out.float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@given(st.sampled_from([torch.int64, torch.bool]), st.sampled_from(["block", "spatial", "temporal"]))
def test_blocks_reject_integer_inputs_clearly(dtype: torch.dtype, which: str) -> None:
    module, x = {
        "block": (TransformerBlock(8, 3, heads=2, dim_head=4), torch.ones(1, 2, 8, dtype=dtype)),
        "spatial": (SpatialTransformer(8, 3, heads=2, dim_head=4), torch.ones(1, 8, 2, 2, dtype=dtype)),
        "temporal": (TemporalTransformer(8, 3, heads=2, dim_head=4), torch.ones(1, 8, 3, dtype=dtype)),
    }[which]
    with pytest.raises(TypeError, match="floating-point") as info:
        module(x, torch.randn(1, 2, 3))
    assert _mmx_frame(info.value)


@st.composite
def spatial_case(draw: st.DrawFn) -> dict[str, Any]:
    return {
        "b": draw(st.integers(0, 3)),
        "channels": draw(st.sampled_from([4, 8, 64])),
        "grid": draw(st.sampled_from([(0, 3), (3, 0), (1, 1), (1, 4), (2, 3), (4, 4)])),
        "s": draw(st.integers(0, 5)),
        "mask": draw(st.sampled_from(["none", "bool_pad", "float_pad"])),
        "dtype": draw(st.sampled_from(DTYPES)),
        "training": draw(st.booleans()),
        "temporal": draw(st.booleans()),
        "seed": draw(st.integers(0, 2**16)),
    }


@given(spatial_case())
def test_spatial_and_temporal_transformers_on_any_grid(case: dict[str, Any]) -> None:
    torch.manual_seed(case["seed"])
    g = torch.Generator().manual_seed(case["seed"])
    b, c, s, dtype = case["b"], case["channels"], case["s"], case["dtype"]
    cls = TemporalTransformer if case["temporal"] else SpatialTransformer
    grid = (case["grid"][0] * case["grid"][1],) if case["temporal"] else case["grid"]
    module = cls(c, 3, heads=2, dim_head=4)
    torch.nn.init.normal_(module.proj_out.weight)  # not the identity it starts as, so the blocks matter
    module = module.to(dtype).train(case["training"])
    x = torch.randn(b, c, *grid, generator=g).to(dtype).requires_grad_()
    context = torch.randn(b, s, 3, generator=g).to(dtype)
    mask = _make_mask(case["mask"], b, 2, math.prod(grid), s, g)
    group = c // module.norm.num_groups
    if b * group * math.prod(grid) == 1:  # torch's GroupNorm refuses it in any mode; mmx says why
        with pytest.raises(ValueError, match="single value per group"):
            module(x, context, mask=mask)
        return
    out = module(x, context, mask=mask)
    assert out.shape == x.shape and out.dtype == dtype and torch.isfinite(out).all()
    if out.numel():
        out.float().sum().backward()
        assert torch.isfinite(x.grad).all()


def test_causal_cross_attention_with_more_queries_than_keys() -> None:
    """Regression: with L > S and no mask, the causal mask was 2-D and zeroed the wrong axis (or crashed)."""
    att = CrossAttention(2, 3, heads=1, dim_head=2, qkv_bias=True)
    torch.nn.init.normal_(att.to_out[0].bias)
    x, context = torch.randn(2, 2, 2), torch.randn(2, 1, 3)  # query_dim == L: a wrong broadcast went unnoticed
    out = att(x, context, causal=True)
    assert out.shape == (2, 2, 2)
    assert torch.equal(out[:, 0], torch.zeros(2, 2))  # query 0 sees no key (j <= i + S - L = -1)
    torch.testing.assert_close(out.double(), _reference(att, x, context, None, True))


def test_empty_context_gives_zero_update_with_or_without_mask() -> None:
    """S = 0 is a query with nothing to read: zero output, as for a fully masked row (bias included)."""
    att = CrossAttention(4, 3, heads=2, dim_head=2, qkv_bias=True)
    torch.nn.init.normal_(att.to_out[0].bias)
    x, empty = torch.randn(2, 3, 4), torch.randn(2, 0, 3)
    for mask in (None, torch.zeros(2, 0, dtype=torch.bool)):
        assert torch.equal(att(x, empty, mask=mask), torch.zeros(2, 3, 4))
    full_mask = torch.zeros(2, 2, dtype=torch.bool)
    assert torch.equal(att(x, torch.randn(2, 2, 3), mask=full_mask), torch.zeros(2, 3, 4))


def test_float_mask_check_is_prepare_mask_level() -> None:
    """prepare_mask refuses NaN / +inf itself (every caller of it is covered), and keeps -inf."""
    ok = torch.tensor([[0.0, float("-inf")]])
    assert torch.equal(prepare_mask(ok, 1, 1, 1, 2, torch.float32), ok[:, None, None, :])
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="finite or -inf"):
            prepare_mask(torch.tensor([[0.0, bad]]), 1, 1, 1, 2, torch.float32)


def test_profile_is_loaded() -> None:
    """The CI profile is derandomized (reproducible); MMX_FUZZ=full switches to the full profile."""
    import os

    profile = settings.default  # outside @given: the profile tests/fuzz/conftest.py loaded
    if os.environ.get("MMX_FUZZ", "").lower() == "full":
        assert not profile.derandomize and profile.max_examples >= 100
    else:
        assert profile.derandomize and profile.deadline is None
