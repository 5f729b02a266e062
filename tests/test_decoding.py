"""Greedy and beam decoding: cached equals uncached, beam 1 is greedy, scores are the model's, padding is harmless."""

import pytest
import torch

from mmx.decoding import Decoded, beam_search, generate, greedy_decode
from mmx.models import ImageCaptioner, Seq2SeqTransformer

PAD, BOS, EOS = 0, 1, 2


def _lively(model, eos_bias: float = 0.5):
    """Random outputs that depend on the memory and end at different steps (the default init barely does)."""
    with torch.no_grad():
        model.decoder.out.weight.normal_(0, 0.5)
        model.decoder.out.bias[EOS] += eos_bias
        for block in model.decoder.blocks:
            block.attn2.to_v.weight.mul_(3.0)
    return model


def _model(kind: str):
    """A tiny random model in eval mode and a batch of its inputs."""
    torch.manual_seed(0)
    if kind == "seq2seq":
        model = Seq2SeqTransformer(
            11, 13, d_model=32, heads=2, encoder_layers=1, decoder_layers=2, ff_mult=2, tie_output=False
        )
        src = torch.tensor([[5, 3, 9, 0, 0, 0], [4, 4, 7, 8, 10, 6], [10, 3, 3, 5, 6, 0], [7, 0, 0, 0, 0, 0]])
        return _lively(model).eval(), src
    model = ImageCaptioner(13, d_model=32, heads=2, decoder_layers=2, ff_mult=2, input_size=32, tie_output=False)
    model = _lively(model, eos_bias=-1.5).eval()
    return model, torch.rand(4, 3, 32, 32) * 2 - 1


def _teacher_forced_logp(model, memory, tokens, lengths):
    """Per row, the sum of log-probs of its first ``lengths`` generated tokens under teacher forcing."""
    tgt_in = torch.cat([torch.full((tokens.shape[0], 1), BOS), tokens[:, :-1]], 1)
    with torch.no_grad():
        logp = model.decode(tgt_in, memory).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    keep = torch.arange(tokens.shape[1])[None] < lengths[:, None]
    return (logp * keep).sum(-1)


@pytest.mark.parametrize("kind", ["seq2seq", "captioner"])
def test_cached_decoding_equals_uncached_decoding(kind):
    model, inputs = _model(kind)
    memory = model.encode(inputs)
    for method, kwargs in ((greedy_decode, {}), (beam_search, {"beam_size": 3})):
        cached = method(model, memory, max_len=12, use_cache=True, **kwargs)
        uncached = method(model, memory, max_len=12, use_cache=False, **kwargs)
        assert len({tuple(r) for r in cached.tokens.tolist()}) > 1, "the check needs outputs that differ"
        assert torch.equal(cached.tokens, uncached.tokens), method.__name__
        assert torch.equal(cached.lengths, uncached.lengths)
        torch.testing.assert_close(cached.scores, uncached.scores, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", ["seq2seq", "captioner"])
def test_beam_of_one_is_greedy(kind):
    model, inputs = _model(kind)
    memory = model.encode(inputs)
    greedy = greedy_decode(model, memory, max_len=12)
    beam = beam_search(model, memory, beam_size=1, max_len=12, length_penalty=0.0)
    assert torch.equal(beam.tokens, greedy.tokens) and torch.equal(beam.lengths, greedy.lengths)
    torch.testing.assert_close(beam.scores, greedy.scores, atol=1e-5, rtol=0)
    penalised = beam_search(model, memory, beam_size=1, max_len=12, length_penalty=1.0)
    assert torch.equal(penalised.tokens, greedy.tokens)
    torch.testing.assert_close(penalised.scores, greedy.scores / ((5 + greedy.lengths) / 6), atol=1e-5, rtol=0)


def test_greedy_rows_stop_at_end_and_scores_are_the_model_log_probs():
    model, src = _model("seq2seq")
    memory = model.encode(src)
    out = greedy_decode(model, memory, max_len=12)
    assert isinstance(out, Decoded) and out.tokens.dtype == torch.long and not out.scores.requires_grad
    assert out.tokens.shape == (4, int(out.lengths.max()))
    assert len(set(out.lengths.tolist())) > 1, "the check needs rows that end at different steps"
    for row, n in zip(out.tokens.tolist(), out.lengths.tolist()):
        if n < 12:
            assert row[n - 1] == EOS and EOS not in row[: n - 1] and all(t == PAD for t in row[n:])
    expected = _teacher_forced_logp(model, memory, out.tokens, out.lengths)
    torch.testing.assert_close(out.scores, expected, atol=1e-4, rtol=0)
    assert out.to_lists()[0] == out.tokens[0, : out.lengths[0]].tolist()

    # stop_at_eos=False: exactly max_len tokens, the same prefix up to END.
    full = greedy_decode(model, memory, max_len=12, stop_at_eos=False)
    assert full.tokens.shape == (4, 12) and full.lengths.tolist() == [12] * 4
    for row, ref, n in zip(full.tokens.tolist(), out.tokens.tolist(), out.lengths.tolist()):
        assert row[:n] == ref[:n]


def test_decoding_stops_early_once_every_row_has_finished():
    model, src = _model("seq2seq")
    with torch.no_grad():
        model.decoder.out.bias[EOS] += 100.0
    calls = []
    model.decoder.register_forward_hook(lambda *a: calls.append(1))
    out = greedy_decode(model, model.encode(src), max_len=50)
    assert out.tokens.tolist() == [[EOS]] * 4 and out.lengths.tolist() == [1] * 4
    assert len(calls) <= 4, "decoding must stop within a few steps of the last END"
    beam = beam_search(model, model.encode(src), beam_size=2, max_len=50)
    assert beam.tokens.tolist() == [[EOS]] * 4


@pytest.mark.parametrize("length_penalty", [0.0, 0.6, 1.0])
def test_beam_scores_are_penalised_log_probs_and_padded_batches_match_single_rows(length_penalty):
    model, src = _model("seq2seq")
    memory = model.encode(src)
    out = beam_search(model, memory, beam_size=3, max_len=10, length_penalty=length_penalty)
    raw = _teacher_forced_logp(model, memory, out.tokens, out.lengths)
    torch.testing.assert_close(out.scores, raw / ((5 + out.lengths) / 6) ** length_penalty, atol=1e-4, rtol=0)
    # Each input of the padded batch decodes as it would alone, without padding.
    for i in range(src.shape[0]):
        real = src[i : i + 1, src[i] != PAD]
        alone = beam_search(model, model.encode(real), beam_size=3, max_len=10, length_penalty=length_penalty)
        n = int(alone.lengths[0])
        assert out.tokens[i, :n].tolist() == alone.tokens[0, :n].tolist() and int(out.lengths[i]) == n
        torch.testing.assert_close(out.scores[i], alone.scores[0], atol=1e-4, rtol=0)


def test_generate_encodes_and_dispatches():
    model, src = _model("seq2seq")
    greedy = generate(model, src, max_len=8)
    assert torch.equal(greedy.tokens, greedy_decode(model, model.encode(src), max_len=8).tokens)
    masked = generate(model, src, src != PAD, method="beam", beam_size=2, max_len=8)
    assert torch.equal(masked.tokens, beam_search(model, model.encode(src), beam_size=2, max_len=8).tokens)
    captioner, images = _model("captioner")
    assert generate(captioner, images, method="beam", beam_size=2, max_len=6).tokens.shape[0] == 4
    model.train()
    generate(model, src, max_len=2)
    assert model.training, "decoding leaves the train/eval mode alone"


def test_bad_decoding_arguments_are_clear_errors():
    model, src = _model("seq2seq")
    memory = model.encode(src)
    with pytest.raises(ValueError, match="unknown decoding method 'sample'; valid: greedy, beam"):
        generate(model, src, method="sample")
    with pytest.raises(TypeError, match="Context"):
        greedy_decode(model, memory.tokens)
    with pytest.raises(ValueError, match="max_len"):
        greedy_decode(model, memory, max_len=0)
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(model, memory, beam_size=0)
    with pytest.raises(TypeError, match="bos_id"):
        greedy_decode(torch.nn.Linear(2, 2), memory)
