"""Synthetic shapes: determinism, the compositional split, masks and word alignment, batching."""

import re
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mmx.data import (
    COLOURS,
    DATASETS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SHAPE_POSITION,
    PALETTE,
    POSITIONS,
    SHAPES,
    ShapesDataset,
    ShapeSpec,
    caption_for,
    caption_with_words,
    collate,
    object_masks,
    render,
)
from mmx.registry import UnknownNameError

PLACE_WORDS = {
    "left": {"left"},
    "right": {"right"},
    "top": {"top"},
    "bottom": {"bottom"},
    "centre": {"centre", "middle"},
}


@pytest.fixture(scope="module")
def train_specs():
    ds = ShapesDataset("train", length=2000, seed=0)
    return [ds.specs(i) for i in range(len(ds))]


def test_same_seed_and_index_give_the_same_sample():
    a, b = ShapesDataset(seed=3, length=50), ShapesDataset(seed=3, length=50)
    _ = [b[i] for i in range(20, 0, -1)]  # access order must not matter
    for i in (0, 7, 49):
        sa, sb = a[i], b[i]
        assert sa["caption"] == sb["caption"] and torch.equal(sa["image"], sb["image"])
    assert torch.equal(a[-1]["image"], a[49]["image"])
    other = ShapesDataset(seed=4, length=50)
    assert [a[i]["caption"] for i in range(20)] != [other[i]["caption"] for i in range(20)]
    with pytest.raises(IndexError):
        a[50]


def test_train_never_shows_or_names_a_heldout_pair(train_specs):
    ds = ShapesDataset("train", length=2000, seed=0)
    for objects in train_specs:
        for o in objects:
            assert (o.colour, o.shape) not in HELDOUT_COLOUR_SHAPE
            assert (o.shape, o.position) not in HELDOUT_SHAPE_POSITION
    for i in range(0, 2000, 10):  # the caption names exactly the drawn objects
        sample = ds[i]
        words = sample["caption"].split()
        for o in sample["objects"]:
            assert (words[o.words[0]], words[o.words[1]]) == (o.colour, o.shape)


def test_every_colour_shape_and_position_occurs_in_train(train_specs):
    seen = [o for objects in train_specs for o in objects]
    assert {o.colour for o in seen} == set(COLOURS)
    assert {o.shape for o in seen} == set(SHAPES)
    assert {o.position for o in seen} == set(POSITIONS)
    assert {len(objects) for objects in train_specs} == {1, 2}
    for objects in train_specs:  # two objects never share a position
        assert len({o.position for o in objects}) == len(objects)


def test_every_heldout_sample_has_a_heldout_object():
    ds = ShapesDataset("heldout", length=500, seed=0)
    kinds = set()
    for i in range(len(ds)):
        objects = ds.specs(i)
        pairs = [o for o in objects if ds.is_heldout(o.colour, o.shape, o.position)]
        assert pairs, objects
        kinds |= {(o.colour, o.shape) for o in pairs} | {(o.shape, o.position) for o in pairs}
    assert set(HELDOUT_COLOUR_SHAPE) | set(HELDOUT_SHAPE_POSITION) <= kinds


def test_custom_heldout_pairs_and_invalid_ones():
    ds = ShapesDataset("train", length=300, heldout_colour_shape=[("green", "square")], heldout_shape_position=[])
    assert all((o.colour, o.shape) != ("green", "square") for i in range(300) for o in ds.specs(i))
    assert any((o.shape, o.position) == ("circle", "top") for i in range(300) for o in ds.specs(i))
    with pytest.raises(ValueError, match="no training object with shape circle"):
        ShapesDataset(heldout_shape_position=[("circle", p) for p in POSITIONS])
    with pytest.raises(ValueError, match="purple"):
        ShapesDataset(heldout_colour_shape=[("purple", "circle")])
    with pytest.raises(ValueError, match="needs at least one held-out pair"):
        ShapesDataset("heldout", heldout_colour_shape=[], heldout_shape_position=[])
    with pytest.raises(ValueError, match="unknown split"):
        ShapesDataset("test")


def test_channel_gaps_name_the_channels_a_heldout_shape_was_never_drawn_in():
    # Four colours: only blue lights B, so a held-out blue circle has no circle in B to learn from;
    # red triangles are covered by yellow ones (R), green circles by yellow ones (G).
    assert ShapesDataset().channel_gaps() == {("blue", "circle"): "B"}
    assert ShapesDataset(heldout_colour_shape=[("red", "triangle"), ("green", "circle")]).channel_gaps() == {}
    six = ("red", "green", "blue", "yellow", "cyan", "magenta")
    assert ShapesDataset(colours=six).channel_gaps() == {}  # cyan and magenta circles light B
    # With both held out, only green and blue squares are left: no square in R.
    assert ShapesDataset(heldout_colour_shape=[("yellow", "square"), ("red", "square")]).channel_gaps() == {
        ("yellow", "square"): "R",
        ("red", "square"): "R",
    }


def test_the_t2i_recipe_holds_out_only_channel_covered_pairs():
    from mmx.config import load_config
    from mmx.recipes.text_to_image import TextToImageConfig

    cfg = load_config(Path(__file__).parents[2] / "configs" / "shapes_t2i.yaml", TextToImageConfig)
    spec = {k: v for k, v in cfg.data.items() if k != "name"}
    assert ShapesDataset(**spec).channel_gaps() == {}
    held = {k: v for k, v in cfg.eval.data.items() if k != "name"}
    assert ShapesDataset(**held).heldout_colour_shape == ShapesDataset(**spec).heldout_colour_shape


def test_colours_option_draws_every_chosen_colour_and_keeps_the_default_data():
    six = ("red", "green", "blue", "yellow", "cyan", "magenta")
    ds = ShapesDataset("train", length=400, seed=3, colours=six)
    seen = [o for i in range(len(ds)) for o in ds.specs(i)]
    assert {o.colour for o in seen} == set(six)
    assert all(ds.is_heldout(o.colour, o.shape, o.position) is False for o in seen)
    item = ds[next(i for i in range(400) if any(o.colour == "magenta" for o in ds.specs(i)))]
    magenta = next(o for o in item["objects"] if o.colour == "magenta")
    pixels = ((item["image"].permute(1, 2, 0) + 1) * 127.5).round()[magenta.mask]  # [N, 3]
    assert (pixels == torch.tensor(PALETTE["magenta"], dtype=pixels.dtype)).all()
    assert "magenta" in item["caption"].split()
    default = ShapesDataset("train", length=50, seed=3)
    listed = ShapesDataset("train", length=50, seed=3, colours=list(COLOURS))
    assert [default[i]["caption"] for i in range(50)] == [listed[i]["caption"] for i in range(50)]
    two = ShapesDataset(
        "heldout", length=200, seed=3, colours=["blue", "cyan"], heldout_colour_shape=[("cyan", "circle")]
    )
    assert {o.colour for i in range(200) for o in two.specs(i)} == {"blue", "cyan"}
    with pytest.raises(ValueError, match=r"unknown \['purple'\].*choose from red, green, blue, yellow, cyan, magenta"):
        ShapesDataset(colours=["red", "purple"])
    with pytest.raises(ValueError, match="repeated"):
        ShapesDataset(colours=["red", "red"])
    with pytest.raises(TypeError, match="non-empty list"):
        ShapesDataset(colours="red")
    with pytest.raises(ValueError, match="held-out.*'red', 'triangle'"):  # a held-out pair names a colour not chosen
        ShapesDataset(colours=["green", "blue", "yellow"])


def test_captions_are_lower_case_words_with_paraphrases():
    ds = ShapesDataset("train", length=400)
    captions = [ds[i]["caption"] for i in range(400)]
    allowed = set(string.ascii_lowercase + " ")
    assert all(set(c) <= allowed and c == " ".join(c.split()) for c in captions)
    assert len({c.split()[0] for c in captions}) >= 3  # several templates start differently
    joined = " ".join(captions)
    for phrase in ("in the middle", "in the centre", "on the left", "at the top", " and "):
        assert phrase in joined


def test_masks_cover_the_object_pixels_and_align_with_words():
    ds = ShapesDataset("train", length=200)
    for i in range(0, 200, 5):
        sample = ds[i]
        image, words = sample["image"], sample["caption"].split()
        coloured = (image > 0).any(dim=0)  # [H, W] non-background pixels
        union = torch.zeros_like(coloured)
        for o in sample["objects"]:
            assert o.mask.dtype == torch.bool and o.mask.shape == (32, 32) and o.mask.sum() >= 30
            assert not (union & o.mask).any()  # objects never overlap
            union |= o.mask
            rgb = torch.tensor(COLOURS[o.colour]) / 127.5 - 1
            assert torch.allclose(image[:, o.mask], rgb[:, None].expand(3, int(o.mask.sum())))
            assert words[o.words[0]] == o.colour and words[o.words[1]] == o.shape
            assert {words[j] for j in o.position_words} <= PLACE_WORDS[o.position] and o.position_words
            assert torch.equal(sample["word_masks"][o.words[0]], o.mask)
            assert torch.equal(sample["word_masks"][o.words[1]], o.mask)
        assert torch.equal(union, coloured)
        assert len(sample["word_masks"]) == 2 * len(sample["objects"])


def test_objects_keep_a_gap_at_every_pair_of_positions():
    for size in (32, 64):
        for shape in SHAPES:
            masks = object_masks([ShapeSpec("red", shape, p) for p in POSITIONS], size)
            grown = []
            for m in masks:  # dilate by one pixel (8-neighbourhood)
                t = torch.from_numpy(m)[None, None].float()
                grown.append(torch.nn.functional.max_pool2d(t, 3, 1, 1)[0, 0].bool().numpy())
            for a in range(len(masks)):
                assert not masks[a][[0, -1], :].any() and not masks[a][:, [0, -1]].any()  # off the border
                for b in range(a + 1, len(masks)):
                    assert not (grown[a] & masks[b]).any(), (size, shape, a, b)


def test_render_shapes_sizes_and_antialias():
    objects = [ShapeSpec("blue", "circle", "centre"), ShapeSpec("yellow", "triangle", "left")]
    crisp = render(objects, 32)
    assert crisp.dtype == np.uint8 and crisp.shape == (32, 32, 3)
    assert {tuple(p) for p in crisp.reshape(-1, 3)} == {(0, 0, 0), COLOURS["blue"], COLOURS["yellow"]}
    soft = render(objects, 32, antialias=True)
    assert len({tuple(p) for p in soft.reshape(-1, 3)}) > 3  # blended edges
    areas = [m.sum() for m in object_masks([ShapeSpec("red", s, "centre") for s in SHAPES], 64)]
    assert areas[1] == 256 and 0.7 < areas[0] / 256 < 0.85 and 0.4 < areas[2] / 256 < 0.6  # square, circle, triangle
    big = ShapesDataset(size=64, length=3)[0]
    assert big["image"].shape == (3, 64, 64) and big["objects"][0].mask.shape == (64, 64)


def test_caption_for_is_deterministic_by_rng():
    objects = [ShapeSpec("green", "square", "bottom"), ShapeSpec("red", "circle", "centre")]
    first = caption_for(objects, np.random.default_rng(1))
    assert first == caption_for(objects, np.random.default_rng(1))
    text, refs = caption_with_words(objects, np.random.default_rng(1))
    assert text == first and [text.split()[r.shape] for r in refs] == ["square", "circle"]
    assert "and" in text.split()


def test_dataloader_with_collate_and_registry():
    ds = DATASETS.build("shapes", split="heldout", length=10, seed=1)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate)))
    assert batch["image"].shape == (4, 3, 32, 32) and batch["image"].dtype == torch.float32
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1
    assert len(batch["caption"]) == 4 and isinstance(batch["caption"][0], str)
    assert len(batch["objects"]) == 4 and len(batch["word_masks"]) == 4
    with pytest.raises(UnknownNameError, match="imagefolder, shapes"):
        DATASETS.get("mnist")


def test_drop_attribute_leaves_one_attribute_out_and_keeps_the_default_data_unchanged():
    from mmx.data.shapes import COLOURS, POSITION_WORDS, SHAPES

    plain, also_plain = ShapesDataset(length=20, seed=3), ShapesDataset(length=20, seed=3, drop_attribute=0.0)
    assert [plain[i]["caption"] for i in range(20)] == [also_plain[i]["caption"] for i in range(20)]
    dropped = ShapesDataset(length=60, seed=3, drop_attribute=1.0)
    kinds = set()
    for i in range(60):
        item = dropped[i]
        for clause in item["caption"].split(" and "):
            words = clause.split()
            present = (
                any(w in COLOURS for w in words),
                any(w in SHAPES for w in words),
                any(w in POSITION_WORDS for w in words),
            )
            assert sum(present) == 2, clause  # exactly one of colour / shape / place is left out
            kinds.add(present)
            if not present[1]:
                assert "shape" in words  # "a red shape on the left"
        named = [w for w in item["word_masks"]]
        assert all(item["caption"].split()[w] in COLOURS or item["caption"].split()[w] in SHAPES for w in named)
    assert len(kinds) == 3
    with pytest.raises(ValueError, match="drop_attribute"):
        ShapesDataset(drop_attribute=1.5)


def test_droppable_limits_which_attribute_is_left_out_and_defaults_to_all_three():
    from mmx.data.shapes import ATTRIBUTES, COLOURS, POSITION_WORDS, SHAPES

    every = ShapesDataset(length=30, seed=3, drop_attribute=0.5)
    named = ShapesDataset(length=30, seed=3, drop_attribute=0.5, droppable=list(ATTRIBUTES))
    assert [every[i]["caption"] for i in range(30)] == [named[i]["caption"] for i in range(30)]
    no_colour = ShapesDataset(length=40, seed=3, drop_attribute=1.0, droppable=["colour"])
    for i in range(40):
        item = no_colour[i]
        for clause in item["caption"].split(" and "):
            words = clause.split()
            assert not any(w in COLOURS for w in words), clause
            assert any(w in SHAPES for w in words) and any(w in POSITION_WORDS for w in words), clause
        assert all(o.words[0] == -1 and o.words[1] >= 0 for o in item["objects"])  # (colour, shape) indices
    for bad in ("colour", [], ["size"], ["shape", "shape"]):
        with pytest.raises(ValueError, match=f"droppable must be .*; got {re.escape(repr(bad))}"):
            ShapesDataset(droppable=bad)


def test_jitter_moves_objects_by_whole_pixels_and_keeps_captions_split_and_gaps():
    from mmx.data.shapes import MAX_JITTER
    from mmx.eval.detector import caption_correct

    plain, still = ShapesDataset(length=40, seed=3), ShapesDataset(length=40, seed=3, jitter=0.0)
    assert all(torch.equal(plain[i]["image"], still[i]["image"]) for i in range(40))  # no draw without jitter
    moved = ShapesDataset(length=150, seed=3, jitter=MAX_JITTER)
    base = ShapesDataset(length=150, seed=3)
    offsets = set()
    for i in range(150):
        item, anchored = moved[i], base[i]
        assert item["caption"] == anchored["caption"]  # the captions are those of the anchored data
        specs = moved.specs(i)
        assert [(s.colour, s.shape, s.position) for s in specs] == [
            (s.colour, s.shape, s.position) for s in base.specs(i)
        ]
        for spec, obj, plain_obj in zip(specs, item["objects"], anchored["objects"]):
            dx, dy = (round(o * 32) for o in spec.offset)
            assert (dx * 1.0, dy * 1.0) == (spec.offset[0] * 32, spec.offset[1] * 32)  # whole pixels
            offsets.add((dx, dy))
            # an exact translation of the anchored drawing (nothing wrapped round: the object stays whole)
            assert torch.equal(torch.roll(plain_obj.mask, (dy, dx), dims=(0, 1)), obj.mask)
        if len(item["objects"]) == 2:  # one background pixel between the objects (8-neighbourhood)
            a, b = (o.mask[None, None].float() for o in item["objects"])
            assert not (torch.nn.functional.max_pool2d(a, 3, 1, 1).bool() & b.bool()).any(), i
        assert caption_correct(item["image"], item["caption"])  # the detector still reads every place
    assert offsets == {(dx, dy) for dx in range(-2, 3) for dy in range(-2, 3)}
    heldout = ShapesDataset("heldout", length=100, seed=1, jitter=MAX_JITTER)
    assert all(any(heldout.is_heldout(s.colour, s.shape, s.position) for s in heldout.specs(i)) for i in range(100))
    train = ShapesDataset("train", length=300, seed=0, jitter=MAX_JITTER)
    assert not any(train.is_heldout(s.colour, s.shape, s.position) for i in range(300) for s in train.specs(i))
    assert "jitter=0.0625" in repr(moved)
    for size, reach in ((8, 0), (64, 4)):  # below 16 pixels the anchors leave less than a pixel: no endless redraw
        crowded = ShapesDataset(length=30, size=size, seed=3, jitter=MAX_JITTER, max_objects=5)
        moves = {round(abs(o) * size) for i in range(30) for s in crowded.specs(i) for o in s.offset}
        assert max(moves) == reach and all(crowded[i]["image"].shape == (3, size, size) for i in range(30))
    never = ShapesDataset(length=40, seed=3, jitter=MAX_JITTER, jitter_share=0.0)
    assert all(torch.equal(plain[i]["image"], never[i]["image"]) for i in range(40))
    half = ShapesDataset(length=200, seed=3, jitter=MAX_JITTER, jitter_share=0.5)
    still = [s.offset == (0.0, 0.0) for i in range(200) for s in half.specs(i)]
    assert 0.4 < sum(still) / len(still) < 0.65  # half stay, and 1 in 25 of the rest draw no move
    with pytest.raises(ValueError, match="jitter_share must be a probability in \\[0, 1\\]; got 1.5"):
        ShapesDataset(jitter_share=1.5)
    for bad in (-0.01, 0.07):
        with pytest.raises(ValueError, match=f"jitter must be in \\[0, 0.0625\\].*got {bad}"):
            ShapesDataset(jitter=bad)
    with pytest.raises(TypeError, match="jitter must be a number; got str '1'"):
        ShapesDataset(jitter="1")
