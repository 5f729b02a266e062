"""image_text_probs: the image -> text block of the full softmax, from chunks no larger than the result."""

import pytest
import torch

from mmx.attnmap.pipelines.joint import chunk_size, image_text_probs


def _full(q, k, mask=None, scale=None):
    scores = q.double() @ k.double().transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    return scores.softmax(-1)  # (B, H, L, S): what attention-map-diffusers materialises


@pytest.mark.parametrize("chunk", [None, 1, 3, 100])
@pytest.mark.parametrize("text_first", [False, True])
def test_the_image_text_block_equals_the_full_softmax_for_any_chunk(chunk, text_first):
    g = torch.Generator().manual_seed(0)
    b, h, n_img, n_txt, d = 2, 3, 10, 4, 8
    q, k = torch.randn(b, h, n_img + n_txt, d, generator=g) * 2, torch.randn(b, h, n_img + n_txt, d, generator=g) * 2
    img, txt = (slice(n_txt, None), slice(0, n_txt)) if text_first else (slice(0, n_img), slice(n_img, None))
    want = _full(q, k)[:, :, img, txt].sum(1)
    got = image_text_probs(q, k, img, txt, chunk=chunk)
    assert got.shape == (b, n_img, n_txt) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert (got.sum(-1) < h).all(), "a joint row also reads image keys: its text block sums to less than one per head"


def test_masks_scale_and_rows_that_read_nothing():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 2, 6, 4, generator=g), torch.randn(1, 2, 5, 4, generator=g)
    keep = torch.ones(1, 1, 6, 5, dtype=torch.bool)
    keep[..., 3:] = False  # the last two keys are padding
    got = image_text_probs(q, k, slice(None), slice(None), scale=0.3, mask=keep)
    torch.testing.assert_close(got.double(), _full(q, k, keep, 0.3).sum(1), rtol=1e-5, atol=1e-6)
    assert torch.all(got[..., 3:] == 0)
    additive = torch.zeros(1, 1, 1, 5).masked_fill(~keep[:, :, :1], float("-inf"))
    torch.testing.assert_close(image_text_probs(q, k, slice(None), slice(None), 0.3, additive), got)
    none = torch.zeros(1, 1, 6, 5, dtype=torch.bool)
    assert torch.all(image_text_probs(q, k, slice(None), slice(None), mask=none) == 0), "no key: zeros, never NaN"


def test_chunks_never_hold_more_scores_than_the_result():
    for img, txt, heads in ((4096, 512, 24), (4096, 333, 24), (64, 77, 8), (16, 3, 64)):
        c = chunk_size(img, txt, img + txt, heads)
        assert c >= 1 and (c == 1 or heads * c * (img + txt) <= img * txt)
