"""Key/value caches: step-by-step attention equals one full pass; the memory is projected once."""

import pytest
import torch

from mmx import Context
from mmx.nn import BlockCache, CrossAttention, KVCache, TransformerBlock


def _steps(fn, x, sizes):
    """Run ``fn`` on consecutive chunks of ``x [B, T, D]`` of the given sizes; concatenate the outputs."""
    outs, start = [], 0
    for n in sizes:
        outs.append(fn(x[:, start : start + n], start, start + n))
        start += n
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("sizes", [[1] * 6, [2, 1, 3], [6]])
def test_self_attention_with_cache_equals_full_causal_attention(sizes):
    torch.manual_seed(0)
    attn = CrossAttention(16, heads=2, dim_head=8).eval()
    x = torch.randn(3, 6, 16)
    full = attn(x, causal=True)
    cache = KVCache()
    stepped = _steps(lambda chunk, a, b: attn(chunk, causal=True, cache=cache), x, sizes)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    assert len(cache) == 6 and cache.kind == "self" and cache.k.shape == (3, 2, 6, 8)


def test_self_attention_cache_with_key_padding_covering_all_cached_positions():
    torch.manual_seed(0)
    attn = CrossAttention(16, heads=2, dim_head=8).eval()
    x = torch.randn(2, 5, 16)
    mask = torch.tensor([[False, False, True, True, True], [True, True, True, True, False]])
    full = attn(x, mask=mask, causal=True)
    cache = KVCache()
    stepped = _steps(lambda chunk, a, b: attn(chunk, mask=mask[:, :b], causal=True, cache=cache), x, [1, 2, 1, 1])
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=0)
    assert torch.all(stepped[0, :2] == 0), "a query with no real key gets no update"


def test_cross_attention_cache_projects_the_context_once():
    torch.manual_seed(0)
    attn = CrossAttention(16, 12, heads=2, dim_head=8).eval()
    ctx = Context(tokens=torch.randn(2, 4, 12), mask=torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool))
    calls = []
    attn.to_k.register_forward_hook(lambda *a: calls.append(1))
    cache = KVCache()
    x1, x2 = torch.randn(2, 1, 16), torch.randn(2, 3, 16)
    torch.testing.assert_close(attn(x1, ctx, cache=cache), attn(x1, ctx))
    assert len(cache) == 4 and cache.kind == "cross"
    n = len(calls)
    # Later calls reuse the stored keys/values: the context may be omitted, the mask still applies.
    out = attn(x2, None, mask=ctx.mask, cache=cache)
    assert len(calls) == n, "the context must not be projected again"
    torch.testing.assert_close(out, attn(x2, ctx), atol=1e-6, rtol=0)
    torch.testing.assert_close(attn(x2, ctx, cache=cache), out)  # a context given again is ignored


def test_cross_attention_cache_prepares_the_memory_mask_once_and_notices_changes(monkeypatch):
    import mmx.nn.attention as attention
    import mmx.nn.kv_cache as kv_cache

    torch.manual_seed(0)
    attn = CrossAttention(16, 12, heads=2, dim_head=8).eval()
    memory = torch.randn(3, 4, 12)
    mask = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)  # row 1 reads nothing
    prepared = []
    real = attention.prepare_mask
    for module in (attention, kv_cache):  # the layer's own calls and the cache's
        monkeypatch.setattr(module, "prepare_mask", lambda *a, **k: prepared.append(1) or real(*a, **k))
    cache = KVCache()
    for _ in range(3):
        x = torch.randn(3, 1, 16)
        out = attn(x, memory, mask=mask, cache=cache)
        torch.testing.assert_close(out, attn(x, memory, mask=mask), atol=1e-6, rtol=0)
        assert torch.all(out[1] == 0), "a query whose keys are all masked gets no update"
    n = len(prepared)
    assert n == 1 + 3, "the cached path prepares the mask once; each uncached call once"
    mask[1, 0] = True  # changed in place: noticed through the tensor's version counter
    x = torch.randn(3, 1, 16)
    torch.testing.assert_close(attn(x, memory, mask=mask, cache=cache), attn(x, memory, mask=mask), atol=1e-6, rtol=0)
    full = torch.ones(3, 4, dtype=torch.bool)  # another mask object; nothing masked: the unmasked kernel
    torch.testing.assert_close(attn(x, memory, mask=full, cache=cache), attn(x, memory), atol=1e-6, rtol=0)
    assert cache._padding[4] is None and cache._padding[5] is None


def test_reorder_selects_batch_rows_and_decoding_continues_on_them():
    torch.manual_seed(0)
    attn = CrossAttention(8, heads=2, dim_head=4).eval()
    x = torch.randn(3, 4, 8)
    cache = KVCache()
    attn(x[:, :3], causal=True, cache=cache)
    k, v = cache.k.clone(), cache.v.clone()
    index = torch.tensor([2, 0, 0])
    cache.reorder(index)
    assert torch.equal(cache.k, k[index]) and torch.equal(cache.v, v[index])
    last = attn(x[index, 3:], causal=True, cache=cache)
    torch.testing.assert_close(last, attn(x[index], causal=True)[:, 3:], atol=1e-5, rtol=0)
    cache.reset()
    assert len(cache) == 0 and cache.k is None and cache.kind is None
    KVCache().reorder(index)  # an empty cache has nothing to reorder
    cache.append(k, v)
    with pytest.raises(TypeError, match="1-D long"):
        cache.reorder(torch.tensor([0.0, 1.0]))


def test_self_attention_cache_writes_new_positions_into_spare_room_and_keeps_gradients_safe():
    torch.manual_seed(0)
    cache = KVCache()
    ks, vs = torch.randn(2, 3, 40, 4), torch.randn(2, 3, 40, 5)
    pointers = set()
    for t in range(40):
        k, v = cache.append(ks[:, :, t : t + 1], vs[:, :, t : t + 1])
        assert torch.equal(k, ks[:, :, : t + 1]) and torch.equal(v, vs[:, :, : t + 1])
        pointers.add(k.data_ptr())
    assert len(pointers) <= 3, "the prefix is not copied at every step: buffers grow by doubling"
    cache.reorder(torch.tensor([1, 1]))
    k, _ = cache.append(ks[:1, :, :1].expand(2, -1, -1, -1), vs[:1, :, :1].expand(2, -1, -1, -1))
    assert torch.equal(k[:, :, :40], ks[[1, 1]]) and len(cache) == 41
    # with gradients, earlier steps' graphs hold the keys: nothing is written in place
    attn = CrossAttention(8, heads=2, dim_head=4)
    x = torch.randn(2, 5, 8, requires_grad=True)
    cache = KVCache()
    out = torch.cat([attn(x[:, i : i + 1], causal=True, cache=cache) for i in range(5)], dim=1)
    out.sum().backward()
    full = x.detach().clone().requires_grad_(True)
    attn(full, causal=True).sum().backward()
    torch.testing.assert_close(x.grad, full.grad, atol=1e-5, rtol=0)


def test_hooks_see_the_full_key_set():
    torch.manual_seed(0)
    attn = CrossAttention(8, heads=2, dim_head=4).eval()
    seen = []
    attn.add_hook(lambda module, q, k, mask: seen.append((q.shape[2], k.shape[2])))
    cache = KVCache()
    x = torch.randn(1, 3, 8)
    for i in range(3):
        attn(x[:, i : i + 1], causal=True, cache=cache)
    assert seen == [(1, 1), (1, 2), (1, 3)]
    _, probs = attn(torch.randn(1, 1, 8), causal=True, cache=cache, return_attention=True)
    assert probs.shape == (1, 2, 1, 4)
    torch.testing.assert_close(probs.sum(-1), torch.ones(1, 2, 1))


def test_cache_misuse_is_a_clear_error():
    attn = CrossAttention(8, heads=2, dim_head=4)
    cross = CrossAttention(8, 6, heads=2, dim_head=4)
    cache = KVCache()
    attn(torch.randn(2, 1, 8), cache=cache)
    with pytest.raises(ValueError, match="self-attention keys"):
        attn(torch.randn(2, 1, 8), torch.randn(2, 3, 8), cache=cache)
    with pytest.raises(ValueError, match="batch rows"):
        attn(torch.randn(3, 1, 8), cache=cache)
    with pytest.raises(ValueError, match="pass the context"):
        cross(torch.randn(2, 1, 8), None, cache=KVCache())
    with pytest.raises(TypeError, match="KVCache"):
        attn(torch.randn(2, 1, 8), cache={})
    filled = KVCache()
    cross(torch.randn(2, 1, 8), torch.randn(2, 3, 6), cache=filled)
    with pytest.raises(ValueError, match="batch rows"):
        cross(torch.randn(4, 1, 8), None, cache=filled)


def test_transformer_block_with_cache_equals_full_pass():
    torch.manual_seed(0)
    block = TransformerBlock(16, 12, heads=2, dim_head=8, gated_ff=False).eval()
    x = torch.randn(2, 5, 16)
    ctx = Context(tokens=torch.randn(2, 3, 12), mask=torch.tensor([[1, 1, 0], [1, 1, 1]], dtype=torch.bool))
    full = block(x, ctx, causal=True)
    cache = BlockCache()
    outs = [block(x[:, :2], ctx, causal=True, cache=cache)]
    for i in range(2, 5):  # the projected context is in the cache: only its mask is passed
        outs.append(block(x[:, i : i + 1], None, mask=ctx.mask, causal=True, cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-5, rtol=0)
    assert len(cache) == 5 and len(cache.cross_attn) == 3
    cache.reorder(torch.tensor([1, 1]))
    assert torch.equal(cache.self_attn.k[0], cache.self_attn.k[1])
    cache.reset()
    with pytest.raises(ValueError, match="context=None"):
        block(x[:, :1], None, causal=True, cache=cache)
