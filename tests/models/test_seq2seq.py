"""Seq2SeqTransformer and ImageCaptioner: causal decoding, caches, padding, learning, save/load, input checks."""

import pytest
import torch
import torch.nn.functional as F

from mmx import Context
from mmx.decoding import generate
from mmx.models import MODELS, ImageCaptioner, Seq2SeqTransformer
from mmx.nn import TransformerDecoder, positions_from_mask, sinusoidal_positions

PAD, BOS, EOS = 0, 1, 2


def _seq2seq(**kwargs) -> Seq2SeqTransformer:
    torch.manual_seed(0)
    args = dict(
        src_vocab_size=11,
        tgt_vocab_size=13,
        d_model=32,
        heads=2,
        encoder_layers=1,
        decoder_layers=2,
        ff_mult=2,
        tie_output=False,
    )
    return Seq2SeqTransformer(**{**args, **kwargs}).eval()


def _captioner(**kwargs) -> ImageCaptioner:
    torch.manual_seed(0)
    args = dict(vocab_size=13, d_model=32, heads=2, decoder_layers=1, ff_mult=2, input_size=32)
    return ImageCaptioner(**{**args, **kwargs}).eval()


def _lively(model):
    """Random outputs that depend on the memory and end at different steps (the default init barely does)."""
    with torch.no_grad():
        model.decoder.out.weight.normal_(0, 0.5)
        model.decoder.out.bias[EOS] += 0.5
        for block in model.decoder.blocks:
            block.attn2.to_v.weight.mul_(3.0)
    return model


def _pad(rows: list[list[int]], side: str, extra: int = 0) -> torch.Tensor:
    """Pad id lists to one length (+ ``extra``) on the left or the right."""
    width = max(map(len, rows)) + extra
    out = torch.full((len(rows), width), PAD)
    for i, r in enumerate(rows):
        if side == "right":
            out[i, : len(r)] = torch.tensor(r)
        else:
            out[i, width - len(r) :] = torch.tensor(r)
    return out


def test_positions_count_real_tokens_and_sinusoids_follow_vaswani():
    mask = torch.tensor([[False, False, True, True], [True, True, True, False]])
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1], [0, 1, 2, 2]]
    pe = sinusoidal_positions(torch.tensor([[0, 3]]), 8)
    assert pe.shape == (1, 2, 8)
    i = torch.arange(4)
    expected = torch.cat([torch.sin(3 / 10000 ** (2 * i / 8)), torch.cos(3 / 10000 ** (2 * i / 8))])
    torch.testing.assert_close(pe[0, 1], expected)
    with pytest.raises(TypeError, match="bool"):
        positions_from_mask(mask.long())


def test_decoder_fed_one_token_at_a_time_equals_one_full_pass():
    torch.manual_seed(0)
    dec = TransformerDecoder(13, 32, heads=2, layers=2, ff_mult=2, context_dim=24).eval()
    memory = Context(tokens=torch.randn(2, 5, 24), mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5], dtype=torch.bool))
    tokens = torch.randint(0, 13, (2, 7))
    full = dec(tokens, memory)
    cache = dec.new_cache()
    steps = [dec(tokens[:, :3], memory, cache=cache)]
    steps += [dec(tokens[:, i : i + 1], memory, cache=cache) for i in range(3, 7)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=0)
    assert cache.length == 7 and len(cache.layers) == 2

    # A left-padded prefix, then one token at a time: positions continue over real tokens only.
    tokens_mask = torch.tensor([[False, False, True, True, True, True, True], [True] * 7])
    full = dec(tokens, memory, tokens_mask=tokens_mask)
    cache = dec.new_cache()
    steps = [dec(tokens[:, :4], memory, tokens_mask=tokens_mask[:, :4], cache=cache)]
    steps += [dec(tokens[:, i : i + 1], None, memory_mask=memory.mask, cache=cache) for i in range(4, 7)]
    stepped = torch.cat(steps, 1)
    torch.testing.assert_close(stepped[0, 2:], full[0, 2:], atol=1e-5, rtol=0)
    torch.testing.assert_close(stepped[1], full[1], atol=1e-5, rtol=0)
    unpadded = dec(tokens[:1, 2:], memory[0])
    torch.testing.assert_close(full[0, 2:], unpadded[0], atol=1e-5, rtol=0)


def test_decoder_cache_reorder_follows_the_rows():
    torch.manual_seed(0)
    dec = TransformerDecoder(13, 32, heads=2, layers=1, ff_mult=2).eval()
    memory = torch.randn(3, 4, 32)
    tokens = torch.randint(0, 13, (3, 5))
    cache = dec.new_cache()
    dec(tokens[:, :4], memory, tokens_mask=torch.ones(3, 4, dtype=torch.bool), cache=cache)
    index = torch.tensor([2, 2, 0])
    cache.reorder(index)
    last = dec(tokens[index, 4:], None, cache=cache)
    torch.testing.assert_close(last, dec(tokens[index], memory[index])[:, 4:], atol=1e-5, rtol=0)
    cache.reset()
    assert cache.length == 0 and cache.mask is None and len(cache.layers[0].self_attn) == 0


@pytest.mark.parametrize("kind", ["seq2seq", "captioner"])
def test_no_position_sees_the_future(kind):
    model = _seq2seq() if kind == "seq2seq" else _captioner(encoder_layers=1)
    inputs = torch.randint(3, 11, (2, 6)) if kind == "seq2seq" else torch.rand(2, 3, 24, 24) * 2 - 1
    tgt = torch.randint(3, 13, (2, 8))
    logits = model(inputs, tgt)
    changed = tgt.clone()
    changed[:, 5:] = torch.randint(3, 13, (2, 3))
    changed[:, 5] = (tgt[:, 5] + 1 - 3) % 10 + 3  # position 5 surely differs
    logits2 = model(inputs, changed)
    torch.testing.assert_close(logits2[:, :5], logits[:, :5], atol=1e-5, rtol=0)
    assert not torch.allclose(logits2[:, 5:], logits[:, 5:])


def test_padding_on_either_side_changes_nothing():
    model = _lively(_seq2seq())
    rows = [[5, 3, 9], [4, 4, 7, 8, 10, 6], [10, 3, 3, 5, 6]]
    variants = [_pad(rows, "right"), _pad(rows, "left"), _pad(rows, "right", extra=3), _pad(rows, "left", extra=2)]
    memories = [model.encode(src) for src in variants]
    reference = [m.tokens[m.mask] for m in memories]
    for real in reference[1:]:
        torch.testing.assert_close(real, reference[0], atol=1e-5, rtol=0)
    for method, kwargs in (("greedy", {}), ("beam", {"beam_size": 3})):
        outs = [generate(model, src, method=method, max_len=10, **kwargs) for src in variants]
        assert len(set(outs[0].lengths.tolist())) > 1, "the check needs rows that end at different steps"
        for out in outs[1:]:
            assert torch.equal(out.tokens, outs[0].tokens) and torch.equal(out.lengths, outs[0].lengths)
            torch.testing.assert_close(out.scores, outs[0].scores, atol=1e-4, rtol=0)
    # An explicit mask is used as given (here the same as src != pad).
    src = variants[1]
    torch.testing.assert_close(model.encode(src, src != PAD).tokens, memories[1].tokens)


def _copy_batch(n: int, g: torch.Generator, vocab: int = 12) -> tuple[torch.Tensor, ...]:
    """Random sequences of ids 3..vocab-1, length 3-6, right-padded; target = source + END."""
    lengths = torch.randint(3, 7, (n,), generator=g)
    src = torch.randint(3, vocab, (n, int(lengths.max())), generator=g)
    src = src.masked_fill(torch.arange(src.shape[1])[None] >= lengths[:, None], PAD)
    tgt_out = torch.cat([src, torch.full((n, 1), PAD)], 1)
    tgt_out[torch.arange(n), lengths] = EOS
    tgt_in = torch.cat([torch.full((n, 1), BOS), src], 1)
    return src, tgt_in, tgt_out, lengths


def test_a_tiny_seq2seq_learns_to_copy():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    model = Seq2SeqTransformer(
        12, 12, d_model=64, heads=4, encoder_layers=2, decoder_layers=2, ff_mult=2, dropout=0.0, share_embeddings=True
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    for _ in range(300):
        src, tgt_in, tgt_out, _ = _copy_batch(64, g)
        loss = F.cross_entropy(model(src, tgt_in).flatten(0, 1), tgt_out.flatten(), ignore_index=PAD)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    src, _, tgt_out, lengths = _copy_batch(200, g)
    out = generate(model, src, max_len=8)
    exact = [o == t[: n + 1] for o, t, n in zip(out.to_lists(), tgt_out.tolist(), lengths.tolist())]
    assert sum(exact) / len(exact) >= 0.9


@pytest.mark.parametrize("kind", ["seq2seq", "shared", "captioner"])
def test_save_pretrained_round_trip(tmp_path, kind):
    if kind == "captioner":
        model, cls = _captioner(encoder_layers=1), ImageCaptioner
        inputs = torch.rand(2, 3, 20, 28) * 2 - 1
    else:
        kwargs = {"share_embeddings": True, "src_vocab_size": 13, "tie_output": True} if kind == "shared" else {}
        model, cls = _seq2seq(**kwargs), Seq2SeqTransformer
        inputs = torch.randint(3, 11, (2, 6))
    tgt = torch.randint(0, 13, (2, 5))
    logits = model(inputs, tgt)
    model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "config.json").is_file()
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = cls.from_pretrained(tmp_path / "m").eval()
    assert torch.equal(loaded(inputs, tgt), logits)
    if kind == "shared":
        assert loaded.src_embed is None and not hasattr(loaded.decoder, "out")


def test_registry_and_captioner_memory_grid():
    assert MODELS.get("seq2seq") is Seq2SeqTransformer and MODELS.get("captioner") is ImageCaptioner
    model = _captioner()
    memory = model.encode(torch.rand(2, 3, 40, 40) * 2 - 1)  # resized to 32x32, layer1: 8x8 tokens
    assert memory.grid == (8, 8) and memory.tokens.shape == (2, 64, 32) and bool(memory.mask.all())
    with pytest.raises(ValueError, match="norm='batch'"):
        model.load_trunk("IMAGENET1K_V1")


def test_load_trunk_reads_a_local_torchvision_state_dict(tmp_path):
    import torchvision

    torch.manual_seed(1)
    state = {
        k: v
        for k, v in torchvision.models.resnet18().state_dict().items()
        if k.split(".")[0] in ("conv1", "bn1", "layer1")
    }
    torch.save(state, tmp_path / "resnet18.pth")
    model = _captioner(norm="batch")
    model.load_trunk(str(tmp_path / "resnet18.pth"))
    torch.testing.assert_close(model.trunk.layer1[0].conv1.weight, state["layer1.0.conv1.weight"])


def test_bad_inputs_are_clear_errors():
    model = _seq2seq()
    src, tgt = torch.randint(3, 11, (2, 6)), torch.randint(0, 13, (2, 5))
    with pytest.raises(ValueError, match=r"max id 11.*vocab size is 11"):
        model(torch.full((2, 6), 11), tgt)
    with pytest.raises(ValueError, match=r"max id 13.*vocab size is 13"):
        model(src, torch.full((2, 5), 13))
    with pytest.raises(ValueError, match="min id -1"):
        model.encode(torch.full((2, 6), -1))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model.encode(src[0])
    with pytest.raises(TypeError, match="integer token ids"):
        model.encode(src.float())
    with pytest.raises(TypeError, match="bool"):
        model.encode(src, (src != PAD).long())
    with pytest.raises(ValueError, match="src_mask must be"):
        model.encode(src, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(TypeError, match="bool"):
        model(src, tgt, tgt_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="same batch size"):
        model(src, tgt[:1])
    with pytest.raises(ValueError, match="share_embeddings"):
        Seq2SeqTransformer(10, 12, share_embeddings=True)
    with pytest.raises(ValueError, match="eos_id"):
        Seq2SeqTransformer(10, 12, eos_id=12)
    with pytest.raises(ValueError, match="divisible"):
        Seq2SeqTransformer(10, 12, d_model=30, heads=4)
    captioner = _captioner()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        captioner.encode(torch.rand(2, 1, 16, 16))
    with pytest.raises(TypeError, match="floating"):
        captioner.encode(torch.zeros(2, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"max id 20.*vocab size is 13"):
        captioner(torch.rand(2, 3, 16, 16), torch.full((2, 3), 20))


def test_colour_stream_trunk_sees_intensity_and_tokens_get_region_colour():
    model = _captioner(colour_stream=True)
    seen = {}
    model.trunk.register_forward_pre_hook(lambda m, args: seen.update(input=args[0]))
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    memory = model.encode(images)
    x = seen["input"]
    assert torch.allclose(x[:, 0], images.mean(1)) and torch.equal(x[:, 0], x[:, 2])
    # a colour change that keeps each pixel's intensity changes the tokens only through the colour path
    swapped = images[:, [2, 0, 1]]
    seen.clear()
    other = model.encode(swapped)
    assert torch.allclose(seen["input"], x, atol=1e-6) and not torch.allclose(other.tokens, memory.tokens)
    pooled = lambda im: torch.nn.functional.adaptive_avg_pool2d(im, (8, 8)).flatten(2).transpose(1, 2)  # noqa: E731
    with torch.no_grad():
        colour_change = model.colour(pooled(swapped)) - model.colour(pooled(images))
    assert torch.allclose(other.tokens - memory.tokens, colour_change, atol=1e-5)


def test_position_table_equals_the_sinusoids_and_is_not_saved():
    from mmx.nn.seq2seq import sinusoidal_positions

    model = _seq2seq()
    decoder = model.decoder
    positions = torch.tensor([[0, 1, 2, 70], [5, 5, 6, 7]])
    assert torch.equal(decoder._positions(positions), sinusoidal_positions(positions, decoder.d_model))
    assert decoder._position_table.shape[0] >= 71
    assert not any("position" in k for k in model.state_dict())
