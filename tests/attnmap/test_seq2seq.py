"""What each generated word read: decoder cross-attention through the recorder."""

from __future__ import annotations

import pytest
import torch

from mmx.attnmap.seq2seq import caption_word_maps, decoder_attention, region_maps, save_alignment
from mmx.decoding import greedy_decode
from mmx.models import ImageCaptioner, Seq2SeqTransformer
from mmx.nn import attention_probs


def _translator() -> Seq2SeqTransformer:
    torch.manual_seed(0)
    return Seq2SeqTransformer(
        src_vocab_size=20, tgt_vocab_size=20, d_model=32, heads=2, encoder_layers=1, decoder_layers=2, dropout=0.0
    ).eval()


def test_rows_are_the_attention_of_the_step_that_produced_each_token():
    model = _translator()
    src = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]])
    memory = model.encode(src, src != 0)
    tokens = greedy_decode(model, memory, max_len=6, stop_at_eos=False).tokens
    att = decoder_attention(model, memory, tokens)
    assert att.shape == (2, 6, 4)
    assert torch.allclose(att.sum(-1), torch.ones(2, 6), atol=1e-5)
    assert att[1, :, 2:].abs().max() == 0  # padding is never read
    # row t depends only on the tokens before t (the step that produced token t saw nothing later)
    changed = tokens.clone()
    changed[:, 3:] = 11
    assert torch.allclose(decoder_attention(model, memory, changed)[:, :4], att[:, :4], atol=1e-6)
    # the same probabilities as the decoder's own cross-attention layers, averaged over heads and layers
    bos = torch.full((2, 1), model.config.bos_id)
    inputs = torch.cat([bos, tokens[:, :-1]], 1)
    probs = []
    hooks = [
        block.attn2.add_hook(lambda m, q, k, mask: probs.append(attention_probs(q, k, mask, scale=m.scale).mean(1)))
        for block in model.decoder.blocks
    ]
    with torch.no_grad():
        model.decode(inputs, memory)
    for undo in hooks:
        undo()
    assert torch.allclose(torch.stack(probs).mean(0), att, atol=1e-5)


def test_caption_region_maps_lie_on_the_image():
    torch.manual_seed(0)
    model = ImageCaptioner(vocab_size=16, d_model=32, heads=2, decoder_layers=1, input_size=32, dropout=0.0).eval()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    memory = model.encode(images)
    assert memory.grid == (8, 8)
    tokens = greedy_decode(model, memory, max_len=3, stop_at_eos=False).tokens
    maps = region_maps(decoder_attention(model, memory, tokens), memory.grid, (32, 32))
    assert maps.shape == (2, 3, 32, 32)
    words = caption_word_maps(["a", "red", "circle"], maps[0])
    assert [w.index for w in words] == [0, 1, 2] and all(0 <= w.map.min() and w.map.max() <= 1 for w in words)
    with pytest.raises(ValueError, match="cannot lie on a 5x5 grid"):
        region_maps(torch.rand(1, 2, 64), (5, 5), (32, 32))


def test_alignment_picture_is_written(tmp_path):
    from mmx.data.seq2seq import ROMANISED

    path = save_alignment(
        torch.rand(3, 4).softmax(-1),
        ["a", "red", "circle", "left"],
        ["左边", "的", "红色"],
        tmp_path / "a.png",
        title="a red circle left -> 左边 的 红色",
        fallback_labels=ROMANISED,
    )
    assert path.stat().st_size > 1000
