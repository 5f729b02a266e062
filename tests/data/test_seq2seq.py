"""Translation pairs, canonical captions and the word tokenizer of the sequence tasks."""

from __future__ import annotations

import pytest
import torch

from mmx.data import (
    POSITION_WORDS,
    CaptioningDataset,
    ShapesDataset,
    TranslationDataset,
    WordTokenizer,
    source_vocabulary,
    target_vocabulary,
)
from mmx.data.seq2seq import TARGET_WORDS, canonical_caption
from mmx.data.shapes import ShapeSpec


def test_translation_source_is_the_shapes_caption_and_alignment_pairs_translate():
    pairs = TranslationDataset("train", length=200, seed=3)
    shapes = ShapesDataset("train", length=200, seed=3)
    for i in range(len(pairs)):
        item = pairs[i]
        assert item["source"] == shapes[i]["caption"]
        src, tgt = item["source"].split(), item["target"].split()
        # every colour, shape and place word and every "and" is aligned, to its own translation
        content = [t for t, w in enumerate(tgt) if w in TARGET_WORDS.values()]
        assert sorted(t for t, _ in item["alignment"]) == content
        for t, s in item["alignment"]:
            assert tgt[t] == TARGET_WORDS[POSITION_WORDS.get(src[s], src[s])]


def test_translation_puts_the_place_first_and_is_a_function_of_the_source():
    item = TranslationDataset("train", length=50, seed=0)
    seen: dict[str, str] = {}
    for i in range(50):
        x = item[i]
        assert seen.setdefault(x["source"], x["target"]) == x["target"]
    specs = [ShapeSpec("red", "circle", "left")]
    from mmx.data.seq2seq import translate
    from mmx.data.shapes import ObjectWords

    caption = "a red circle on the left"
    target, _ = translate(caption, specs, [ObjectWords(1, 2, (5,))], [0])
    assert target == "左边 的 红色 圆形"


def test_heldout_translation_pairs_contain_a_heldout_composition():
    data = TranslationDataset("heldout", length=100)
    for i in range(len(data)):
        assert any(data.shapes.is_heldout(o.colour, o.shape, o.position) for o in data[i]["objects"])
    train = TranslationDataset("train", length=300)
    for i in range(len(train)):
        assert not any(train.shapes.is_heldout(o.colour, o.shape, o.position) for o in train[i]["objects"])


def test_every_target_word_has_a_romanisation_for_pictures():
    from mmx.data.seq2seq import ROMANISED

    assert set(target_vocabulary()) == set(ROMANISED)
    assert all(label.isascii() for label in ROMANISED.values())


def test_vocabularies_cover_every_sentence():
    src, tgt = set(source_vocabulary()), set(target_vocabulary())
    data = TranslationDataset("heldout", length=200, seed=5)
    for i in range(len(data)):
        assert set(data[i]["source"].split()) <= src
        assert set(data[i]["target"].split()) <= tgt


def test_canonical_caption_is_in_reading_order_and_unique_per_image():
    a = [ShapeSpec("red", "circle", "bottom"), ShapeSpec("blue", "square", "top")]
    caption, refs, order = canonical_caption(a)
    assert caption == "a blue square at the top and a red circle at the bottom"
    assert order == [1, 0]
    assert canonical_caption(a[::-1])[0] == caption
    words = caption.split()
    assert [words[r.colour] for r in refs] == ["blue", "red"]
    assert [words[r.shape] for r in refs] == ["square", "circle"]
    assert [words[r.position[0]] for r in refs] == ["top", "bottom"]
    with pytest.raises(ValueError, match="at least one object"):
        canonical_caption([])


def test_captioning_items_have_masks_on_their_words():
    data = CaptioningDataset("heldout", length=20, seed=2)
    for i in range(len(data)):
        item = data[i]
        words = item["caption"].split()
        assert item["image"].shape == (3, 32, 32)
        for obj in item["objects"]:
            assert words[obj.words[0]] == obj.colour and words[obj.words[1]] == obj.shape
            assert item["word_masks"][obj.words[0]].equal(obj.mask) and obj.mask.any()
            # the object's pixels carry its colour
            assert item["image"][:, obj.mask].std(dim=1).max() < 1e-6


def test_word_tokenizer_round_trip_padding_and_files(tmp_path):
    tok = WordTokenizer(target_vocabulary())
    ids, mask = tok.encode(["左边 的 红色 圆形", "中间 和"], bos=True, eos=True)
    assert ids.dtype == torch.long and mask.dtype == torch.bool
    assert ids.shape == (2, 6) and mask.sum(1).tolist() == [6, 4]
    assert ids[0, 0] == tok.bos_id and ids[0, -1] == tok.eos_id and ids[1, 4:].eq(tok.pad_id).all()
    assert tok.decode(ids) == ["左边 的 红色 圆形", "中间 和"]
    left, left_mask = tok.encode(["左边 的 红色 圆形", "中间 和"], padding_side="left")
    assert left_mask[1].tolist() == [False, False, True, True] and tok.decode(left)[1] == "中间 和"
    assert tok.unknown_words("左边 purple") == ["purple"]
    assert tok.encode("purple")[0].item() == tok.unk_id
    again = WordTokenizer.from_file(tok.save(tmp_path))
    assert again.words == tok.words and again.encode("的 在")[0].equal(tok.encode("的 在")[0])


def test_word_tokenizer_errors_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="without whitespace"):
        WordTokenizer(["two words"])
    with pytest.raises(FileNotFoundError, match="tokenizer file not found"):
        WordTokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        WordTokenizer.from_file(bad)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        WordTokenizer(["a"]).decode(torch.tensor([[4, 99]]))
