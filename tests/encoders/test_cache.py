"""CachedTextEncoder: the cached Context equals running the encoder, and each text runs once."""

import torch

from mmx.encoders import CachedTextEncoder, HFTextEncoder


class Counting:
    def __init__(self, encoder):
        self.encoder, self.seen = encoder, []

    def __call__(self, texts):
        self.seen += texts
        return self.encoder(texts)


def test_cache_equals_direct_encoding_and_runs_each_text_once(minilm_path):
    encoder = HFTextEncoder(minilm_path)
    counting = Counting(encoder)
    cached = CachedTextEncoder(counting)
    texts = ["a red circle", "a blue square at the top and a green triangle", "a red circle"]
    first = cached(texts)
    direct = encoder(texts)
    torch.testing.assert_close(first.tokens[first.mask], direct.tokens[direct.mask], atol=1e-5, rtol=1e-5)
    assert torch.equal(first.mask, direct.mask) and first.words == direct.words
    cached(["a red circle", "x"])
    assert counting.seen == ["a red circle", "a blue square at the top and a green triangle", "x"]
    padded = CachedTextEncoder(encoder, max_tokens=20)(["a red circle"])
    assert padded.tokens.shape == (1, 20, 384) and padded.mask.sum() == 5
