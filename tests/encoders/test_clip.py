"""CLIPTextEncoder: open_clip's own tokens and features, word spans, truncation, freezing, loading."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

open_clip = pytest.importorskip("open_clip")

from mmx.context import Context  # noqa: E402
from mmx.encoders import CLIPTextEncoder  # noqa: E402

LONG_CAPTION = " ".join(f"word{i}" for i in range(100))


@pytest.fixture(scope="module")
def vitb32() -> CLIPTextEncoder:
    """The real ViT-B-32 architecture, random weights."""
    torch.manual_seed(0)
    return CLIPTextEncoder("ViT-B-32", pretrained=None)


@pytest.fixture(scope="module")
def tiny(tiny_clip_names: dict[str, str]) -> CLIPTextEncoder:
    torch.manual_seed(0)
    return CLIPTextEncoder(tiny_clip_names["clip"])


def test_vitb32_pooled_equals_open_clip_encode_text(vitb32: CLIPTextEncoder) -> None:
    texts = ["a photo of a cat", "an unbelievably photorealistic dog on the grass", ""]
    ctx = vitb32(texts)
    ids = open_clip.get_tokenizer("ViT-B-32")(texts)
    assert isinstance(ctx, Context)
    assert torch.equal(vitb32.tokenize(texts).ids, ids)  # the very ids open_clip's tokenizer makes
    assert ctx.tokens.shape == (3, 77, 512) and ctx.pooled.shape == (3, 512)
    assert (vitb32.dim, vitb32.pooled_dim) == (512, 512)
    with torch.no_grad():
        expected = vitb32.model.encode_text(ids)
    torch.testing.assert_close(ctx.pooled, expected)
    # pooled is the projected end-of-text token state
    eot = ids.argmax(-1)
    torch.testing.assert_close(ctx.tokens[torch.arange(3), eot] @ vitb32.model.text_projection, expected)


def test_vitb32_mask_stops_after_end_of_text(vitb32: CLIPTextEncoder) -> None:
    tok = vitb32.tokenize(["a photo of a cat", "", "   \t "])
    eot = vitb32.tokenizer.eot_token_id
    for ids, mask in zip(tok.ids, tok.mask):
        last = int((ids == eot).nonzero()[0])
        assert mask[: last + 1].all() and not mask[last + 1 :].any()
    assert tok.mask.sum(-1).tolist() == [7, 2, 2]  # SOT + 5 words + EOT; empty and blank: SOT + EOT
    assert tok.words[1:] == [[], []]


def test_vitb32_word_spans_are_the_words_tokens(vitb32: CLIPTextEncoder) -> None:
    text = "An unbelievably photorealistic  cat, sleeping"
    tok = vitb32.tokenize(text)
    words = tok.words[0]
    assert [w.word for w in words] == text.split()
    assert words[0].start == 1  # after start-of-text
    for span in words:
        assert tok.ids[0, span.start : span.end].tolist() == vitb32.tokenizer.encode(span.word)
    assert {w.word: w.end - w.start for w in words}["photorealistic"] > 1  # a multi-token word
    assert all(a.end == b.start for a, b in zip(words, words[1:]))  # contiguous, in order


def test_vitb32_truncation_warns_and_clips_spans(vitb32: CLIPTextEncoder, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="mmx.encoders"):
        ctx = vitb32([LONG_CAPTION, "short"])
    full = len(vitb32.tokenizer.encode(LONG_CAPTION)) + 2
    assert f"{full - 77} token(s) cut" in caplog.text
    ids = open_clip.get_tokenizer("ViT-B-32")([LONG_CAPTION, "short"])
    assert torch.equal(vitb32.tokenize([LONG_CAPTION, "short"]).ids, ids)  # truncated exactly as open_clip does
    assert ctx.mask[0].all()
    spans = ctx.words[0]
    assert len(spans) == 100 and max(s.end for s in spans) <= 76  # no word reaches the EOT at 76
    assert spans[-1].start == spans[-1].end  # fully cut words are empty
    kept = [s for s in spans if s.end > s.start]
    assert kept[-1].end == 76


def test_vision_tower_is_dropped(vitb32: CLIPTextEncoder) -> None:
    assert vitb32.model.visual is None
    assert not any(name.startswith("model.visual") for name, _ in vitb32.named_parameters())


def test_frozen_by_default_and_stays_in_eval(tiny: CLIPTextEncoder) -> None:
    parent = nn.ModuleDict({"enc": tiny, "head": nn.Linear(2, 2)}).train()
    assert not tiny.training and not tiny.model.training and parent["head"].training
    assert not any(p.requires_grad for p in tiny.parameters())
    assert not tiny("a cat").tokens.requires_grad


def test_unfrozen_encoder_trains(tiny_clip_names: dict[str, str]) -> None:
    enc = CLIPTextEncoder(tiny_clip_names["clip"], freeze=False).train()
    assert enc.training
    ctx = enc(["a red cat", "a dog"])
    ctx.tokens.sum().backward()
    assert enc.model.token_embedding.weight.grad is not None


def test_bf16_follows_module(tiny: CLIPTextEncoder) -> None:
    enc = copy.deepcopy(tiny).to(torch.bfloat16)
    ctx = enc(["a red cat", ""])
    assert ctx.tokens.dtype == torch.bfloat16 and ctx.pooled.dtype == torch.bfloat16
    assert ctx.mask.dtype == torch.bool


def test_rejects_non_str(tiny: CLIPTextEncoder) -> None:
    with pytest.raises(TypeError, match="int"):
        tiny(3)
    with pytest.raises(TypeError, match="NoneType"):
        tiny(["a cat", None])


def test_context_length_override(tiny_clip_names: dict[str, str], caplog: pytest.LogCaptureFixture) -> None:
    enc = CLIPTextEncoder(tiny_clip_names["clip"], context_length=16)
    with caplog.at_level(logging.WARNING, logger="mmx.encoders"):
        ctx = enc(LONG_CAPTION)
    assert ctx.tokens.shape[1] == 16 and "at the 16-token limit" in caplog.text
    torch.testing.assert_close(ctx.pooled, enc.model.encode_text(enc.tokenize(LONG_CAPTION).ids))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_pretrained_local_checkpoint(tiny_clip_names: dict[str, str], tmp_path, suffix: str) -> None:
    name = tiny_clip_names["clip"]
    torch.manual_seed(1)
    reference = open_clip.create_model(name).eval()
    path = tmp_path / f"clip{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(path))
    else:
        torch.save(reference.state_dict(), path)
    enc = CLIPTextEncoder(name, pretrained=path)
    texts = ["a red circle", "two dogs"]
    with torch.no_grad():
        expected = reference.encode_text(open_clip.get_tokenizer(name)(texts))
    torch.testing.assert_close(enc(texts).pooled, expected)


def test_pretrained_tag_offline_names_tag(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(RuntimeError, match="pretrained='openai'.*local checkpoint"):
        CLIPTextEncoder("ViT-B-32", pretrained="openai")


def test_bad_names_list_the_valid_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match="ViT-B-32") as err:
        CLIPTextEncoder("ViT-X-99")
    assert "unknown open_clip model 'ViT-X-99'" in str(err.value)
    with pytest.raises(ValueError, match="laion2b_s34b_b79k"):
        CLIPTextEncoder("ViT-B-32", pretrained="not-a-tag")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        CLIPTextEncoder("ViT-B-32", pretrained=str(tmp_path / "missing.pt"))


def test_coca_is_not_supported() -> None:
    with pytest.raises(NotImplementedError, match="coca_ViT-B-32"):
        CLIPTextEncoder("coca_ViT-B-32")


def test_custom_text_tower(tiny_clip_names: dict[str, str]) -> None:
    enc = CLIPTextEncoder(tiny_clip_names["custom"])
    assert isinstance(enc.model, open_clip.CustomTextCLIP)
    texts = ["a photorealistic cat", ""]
    ctx = enc(texts)
    assert ctx.tokens.shape == (2, 77, 32) and ctx.pooled.shape == (2, 24)
    torch.testing.assert_close(ctx.pooled, enc.model.encode_text(enc.tokenize(texts).ids))


def test_hf_text_tower_uses_offsets_for_words(tiny_clip_names: dict[str, str]) -> None:
    name = tiny_clip_names["hf"]
    enc = CLIPTextEncoder(name)
    texts = ["An unbelievably photorealistic cat", "   "]
    ctx = enc(texts)
    ids = open_clip.get_tokenizer(name)(texts)
    tok = enc.tokenize(texts)
    assert torch.equal(tok.ids, ids)
    assert ctx.tokens.shape == (2, 32, 384) and (enc.dim, enc.pooled_dim) == (384, 24)
    torch.testing.assert_close(ctx.pooled, enc.model.encode_text(ids))
    assert tok.mask.sum(-1).tolist()[1] == 2  # [CLS] [SEP]
    pieces = enc.tokenizer.tokenizer.convert_ids_to_tokens(tok.ids[0].tolist())
    for span in ctx.words[0]:
        assert "".join(p.removeprefix("##") for p in pieces[span.start : span.end]) == span.word.lower()
    assert ctx.words[0][1].end - ctx.words[0][1].start > 1  # "unbelievably" is several word pieces


def test_word_spans_fall_back_when_words_tokenize_differently(
    tiny: CLIPTextEncoder, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    encode = tiny.tokenizer.encode
    merged = encode("new")[:1]  # pretend the tokenizer merges "new york" into one token

    def contextual(text: str) -> list[int]:
        return merged if text == "new york" else encode(text)

    monkeypatch.setattr(tiny.tokenizer, "encode", contextual)
    with caplog.at_level(logging.WARNING, logger="mmx.encoders"):
        tok = tiny.tokenize("new york")
    assert "word spans are approximate" in caplog.text
    assert tok.ids[0, :3].tolist() == [tiny.tokenizer.sot_token_id, *merged, tiny.tokenizer.eot_token_id]
    assert [tuple(w) for w in tok.words[0]] == [("new", 1, 2), ("york", 2, 2)]


def test_state_dict_holds_each_weight_once(tiny: CLIPTextEncoder, tmp_path) -> None:
    from safetensors.torch import save_file

    keys = list(tiny.state_dict())
    assert all(k.startswith("model.") for k in keys)
    save_file({k: v.contiguous() for k, v in tiny.state_dict().items()}, str(tmp_path / "enc.safetensors"))
