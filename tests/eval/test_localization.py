"""Localization score: thresholded maps against object masks, word alignment with the caption."""

import torch

from mmx.attnmap import WordMap
from mmx.context import WordSpan
from mmx.data import ShapesDataset
from mmx.eval import binarize, detect_objects, detection_masks, iou, object_words, word_ious


def test_binarize_and_iou():
    heat = torch.tensor([[0.0, 1.0], [2.0, 10.0]])
    assert binarize(heat).tolist() == [[False, False], [False, True]]
    assert binarize(heat, 0.05).tolist() == [[False, True], [True, True]]
    a = torch.tensor([[True, True], [False, False]])
    assert iou(a, a) == 1.0 and iou(a, ~a) == 0.0 and iou(a, torch.tensor([[True, False], [False, False]])) == 0.5


def test_object_words_follow_the_caption_order():
    caption = "a blue square at the top and a blue circle on the left"
    found = object_words(caption)
    assert [(c.colour, c.shape, c.position) for c, _, _ in found] == [
        ("blue", "square", "top"),
        ("blue", "circle", "left"),
    ]
    assert [(ci, si) for _, ci, si in found] == [(1, 2), (8, 9)]


def _perfect_maps(sample):
    """Word maps equal to the true masks for object words, flat elsewhere."""
    maps = []
    for i, word in enumerate(sample["caption"].split()):
        mask = sample["word_masks"].get(i)
        heat = mask.float() if mask is not None else torch.ones(32, 32)
        maps.append(WordMap(word, i, WordSpan(word, i + 1, i + 2), heat))
    return maps


def test_perfect_maps_score_one_with_dataset_and_detector_masks():
    data = ShapesDataset(split="heldout", length=8, seed=3)
    for k in range(8):
        sample = data[k]
        maps = _perfect_maps(sample)
        scores = word_ious(maps, sample["word_masks"])
        assert scores and all(v == 1.0 for v in scores.values())
        detected = detection_masks(sample["caption"], detect_objects(sample["image"]))
        assert set(detected) == set(sample["word_masks"])
        assert all(v > 0.95 for v in word_ious(maps, detected).values())


def test_maps_on_the_wrong_object_score_low():
    data = ShapesDataset(split="train", length=50, seed=0, max_objects=2)
    sample = next(s for s in (data[i] for i in range(50)) if len(s["objects"]) == 2)
    first, second = sample["objects"]
    swapped = {i: (second.mask if m is first.mask else first.mask) for i, m in sample["word_masks"].items()}
    scores = word_ious(_perfect_maps(sample), swapped)
    assert all(v == 0.0 for v in scores.values())


def test_pointing_game_checks_the_peak_of_object_words():
    from mmx.context import WordSpan
    from mmx.eval import word_pointing

    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:4, 2:4] = True
    inside, outside = torch.zeros(8, 8), torch.zeros(8, 8)
    inside[3, 3], outside[6, 6] = 1.0, 1.0
    maps = [
        WordMap("red", 1, WordSpan("red", 1, 2), inside),
        WordMap("circle", 2, WordSpan("circle", 2, 3), outside),
        WordMap("a", 0, WordSpan("a", 0, 1), inside),
    ]
    assert word_pointing(maps, {0: mask, 1: mask, 2: mask}) == {1: True, 2: False}
