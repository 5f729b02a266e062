"""Caption accuracy: the detector reads clean and slightly degraded renders, and rejects wrong captions."""

import itertools
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mmx.data import PALETTE, POSITION_PHRASES, POSITIONS, SHAPES, TEMPLATES, ShapesDataset, ShapeSpec, render
from mmx.eval import accuracy_by_pair, caption_accuracy, caption_correct, detect_objects, parse_caption
from mmx.eval.detector import Claim, check_caption, classify_pixels

logger = logging.getLogger(__name__)


def as_tensor(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float [3, H, W] in [-1, 1]."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blur [B, 3, H, W] with a Gaussian of ``sigma`` pixels."""
    radius = int(np.ceil(2 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :]).expand(3, 1, 2 * radius + 1, 2 * radius + 1).contiguous()
    return F.conv2d(F.pad(images, [radius] * 4, mode="replicate"), kernel, groups=3)


@pytest.fixture(scope="module")
def renders():
    """600 clean samples: 350 train and 250 held-out, as ([B, 3, H, W], captions)."""
    train, heldout = ShapesDataset("train", length=350, seed=11), ShapesDataset("heldout", length=250, seed=11)
    samples = [train[i] for i in range(len(train))] + [heldout[i] for i in range(len(heldout))]
    return torch.stack([s["image"] for s in samples]), [s["caption"] for s in samples]


def test_clean_renders_are_read_correctly(renders):
    images, captions = renders
    accuracy = caption_accuracy(images, captions)
    logger.info("clean accuracy %.4f on %d samples", accuracy, len(captions))
    assert accuracy >= 0.99, f"clean accuracy {accuracy:.4f}"


def test_antialiased_and_larger_renders(renders):
    for kwargs in ({"antialias": True}, {"size": 64}, {"size": 64, "antialias": True}):
        ds = ShapesDataset("heldout", length=60, seed=5, **kwargs)
        accuracy = caption_accuracy([ds[i]["image"] for i in range(60)], [ds[i]["caption"] for i in range(60)])
        assert accuracy >= 0.99, (kwargs, accuracy)


def test_six_colour_data_is_read_correctly_and_mismatches_fail():
    six = ShapesDataset("heldout", length=300, seed=7, colours=list(PALETTE))
    images = torch.stack([six[i]["image"] for i in range(len(six))])
    captions = [six[i]["caption"] for i in range(len(six))]
    assert {w for c in captions for w in c.split()} >= {"cyan", "magenta"}
    assert caption_accuracy(images, captions) >= 0.99
    shuffled = np.random.default_rng(0).permutation(len(captions))
    assert caption_accuracy(images, [captions[j] for j in shuffled]) < 0.15


def test_mismatched_captions_score_near_chance(renders):
    images, captions = renders
    order = np.random.default_rng(0).permutation(len(captions))
    accuracy = caption_accuracy(images, [captions[j] for j in order])
    logger.info("shuffled-caption accuracy %.4f", accuracy)
    assert accuracy < 0.15, f"shuffled-caption accuracy {accuracy:.4f}"


def test_noisy_and_blurred_renders_are_still_read(renders):
    images, captions = renders
    generator = torch.Generator().manual_seed(0)
    noisy = (images + 0.1 * torch.randn(images.shape, generator=generator)).clamp(-1, 1)
    accuracy = caption_accuracy(noisy, captions)
    logger.info("noisy (std 0.1) accuracy %.4f", accuracy)
    assert accuracy >= 0.95, f"noisy accuracy {accuracy:.4f}"
    soft = (gaussian_blur(images[:200], 0.8) + 0.1 * torch.randn((200, 3, 32, 32), generator=generator)).clamp(-1, 1)
    dim = images[:200] * 0.6 - 0.2  # dark grey background, colours at 60% saturation
    for name, degraded in (("blur+noise", soft), ("dim", dim)):
        accuracy = caption_accuracy(degraded, captions[:200])
        assert accuracy >= 0.95, f"{name} accuracy {accuracy:.4f}"


def test_wrong_extra_or_missing_objects_fail():
    scene = [ShapeSpec("red", "circle", "left"), ShapeSpec("blue", "square", "top")]
    image = as_tensor(render(scene))
    assert caption_correct(image, "a red circle on the left and a blue square at the top")
    assert caption_correct(image, "at the top there is a blue square and a red circle is on the left side")
    assert not caption_correct(image, "a red circle on the left")  # extra object
    assert not caption_correct(image, "a green circle on the left and a blue square at the top")  # colour
    assert not caption_correct(image, "a red triangle on the left and a blue square at the top")  # shape
    assert not caption_correct(image, "a red circle on the right and a blue square at the top")  # position
    three = as_tensor(render(scene + [ShapeSpec("yellow", "triangle", "centre")]))
    check = check_caption(three, "a red circle on the left and a blue square at the top")
    assert not check.correct and [d.shape for d in check.extra] == ["triangle"] and not check.missing
    assert sorted(d.describe() for d in check.detections) == [
        "blue square top",
        "red circle left",
        "yellow triangle centre",
    ]
    bar = np.zeros((32, 32, 3), dtype=np.uint8)
    bar[14:17, 2:30] = PALETTE["green"]  # too elongated for any shape
    assert [d.describe() for d in detect_objects(bar)] == ["green ? centre"]
    lonely = as_tensor(render(scene[:1]))
    check = check_caption(lonely, "a red circle on the left and a blue square at the top")
    assert check.missing == [Claim("blue", "square", "top")] and not check.extra


def test_specks_are_ignored_and_two_same_colour_objects_stay_apart():
    pixels = render([ShapeSpec("green", "triangle", "centre"), ShapeSpec("green", "square", "right")])
    pixels[2, 2] = pixels[30, 5] = pixels[3, 4] = (255, 0, 0)  # isolated red specks
    detections = detect_objects(pixels)
    assert sorted((d.colour, d.shape, d.position) for d in detections) == [
        ("green", "square", "right"),
        ("green", "triangle", "centre"),
    ]
    assert sum(d.pixels for d in detections) == sum(d.mask.sum() for d in detections)


def test_every_object_kind_is_detected_at_every_size():
    for size in (32, 64):
        for colour, shape, position in itertools.product(PALETTE, SHAPES, POSITIONS):
            (found,) = detect_objects(render([ShapeSpec(colour, shape, position)], size))
            assert (found.colour, found.shape, found.position) == (colour, shape, position)


def test_image_forms_agree():
    pixels = render([ShapeSpec("yellow", "circle", "bottom")])
    forms = [pixels, as_tensor(pixels), torch.from_numpy(pixels).permute(2, 0, 1), Image.fromarray(pixels)]
    results = [[(d.colour, d.shape, d.position, d.pixels) for d in detect_objects(f)] for f in forms]
    assert all(r == results[0] for r in results) and len(results[0]) == 1
    with pytest.raises(ValueError, match="caption_accuracy"):
        detect_objects(as_tensor(pixels)[None])
    with pytest.raises(TypeError, match="uint8"):
        detect_objects(pixels.astype(np.float32))


def test_pixel_colours_tolerate_shading_but_not_greys():
    colours = {
        "red": (200, 40, 30),
        "yellow": (170, 160, 20),
        "green": (40, 180, 60),
        "blue": (30, 40, 220),
        "cyan": (20, 190, 200),
        "magenta": (210, 30, 190),
        None: (128, 128, 128),
    }
    others = [(255, 255, 255), (20, 20, 20), (150, 120, 130)]  # white, near black, a dull pink (chroma 0.12)
    names = list(PALETTE)
    pixels = np.array([list(colours.values()) + others], dtype=np.uint8)  # [1, 10, 3]
    labels = classify_pixels(pixels)[0].tolist()
    assert [names[k - 1] if k else None for k in labels] == list(colours) + [None] * len(others)


def test_parse_caption_covers_every_template():
    for template, (position, phrases) in itertools.product(TEMPLATES, POSITION_PHRASES.items()):
        for phrase in phrases:
            caption = template.format(colour="green", shape="triangle", position=phrase)
            assert parse_caption(caption) == [Claim("green", "triangle", position)], caption
    two = parse_caption("a blue square at the top and on the right there is a green triangle")
    assert two == [Claim("blue", "square", "top"), Claim("green", "triangle", "right")]
    assert parse_caption("A red circle in the center.") == [Claim("red", "circle", "centre")]
    with pytest.raises(ValueError, match="'a purple circle on the left'.*purple"):
        parse_caption("a purple circle on the left")
    with pytest.raises(ValueError, match="0 shapes"):
        parse_caption("a red on the left")
    with pytest.raises(ValueError, match="2 positions"):
        parse_caption("a red circle on the left at the top")


def test_caption_accuracy_checks_lengths():
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        caption_accuracy(torch.zeros(2, 3, 32, 32), ["a red circle on the left"])


def test_accuracy_by_pair_counts_each_caption_under_every_held_out_pair_it_names():
    captions = [
        "a red triangle on the left",  # red triangle
        "a blue circle at the top and a green square on the right",  # blue circle, circle at the top
        "there is a blue circle in the centre",  # blue circle
        "a green square on the left",  # no held-out pair
    ]
    by_pair = accuracy_by_pair(
        captions,
        [True, False, True, True],
        [("red", "triangle"), ("blue", "circle")],
        [("circle", "top"), ("square", "bottom")],
    )
    assert by_pair == {
        "red triangle": (1, 1),
        "blue circle": (1, 2),
        "circle at the top": (0, 1),
        "square at the bottom": (0, 0),
    }
    assert list(by_pair) == ["red triangle", "blue circle", "circle at the top", "square at the bottom"]
    with pytest.raises(ValueError, match="2 captions but 1 verdicts"):
        accuracy_by_pair(captions[:2], [True], [], [])
