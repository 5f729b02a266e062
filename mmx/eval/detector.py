"""Caption accuracy for the synthetic shapes: detect objects in an image, parse a caption, compare.

The detector knows the shapes vocabulary (:mod:`mmx.data.shapes`): every pixel colourful enough
(chroma at least half that of the palette) takes the palette colour of nearest hue, the rest is
background,
pixels of one colour are grouped into 8-connected components, small components are dropped as
noise, the shape is the template (square, circle, apex-up triangle) fitted to the component's
bounding box with the highest IoU, and the position is the anchor nearest the centroid.

A caption is correct when the detected objects are exactly the claimed ones: every claim is
matched by an object of that colour, shape and position, and no other object is present.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from mmx.data.shapes import PALETTE, POSITION_PHRASES, POSITION_WORDS, POSITIONS, SHAPES, TEMPLATES

__all__ = [
    "CaptionCheck",
    "Claim",
    "Detection",
    "accuracy_by_pair",
    "caption_accuracy",
    "caption_correct",
    "check_caption",
    "classify_pixels",
    "detect_objects",
    "parse_caption",
]

logger = logging.getLogger(__name__)

_COLOUR_NAMES = list(PALETTE)
_ANCHORS = np.array(list(POSITIONS.values()), dtype=np.float64)  # [P, 2] (x, y) fractions
_POSITION_NAMES = list(POSITIONS)
_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


class Claim(NamedTuple):
    """One object a caption asserts: colour, shape, position."""

    colour: str
    shape: str
    position: str


@dataclass
class Detection:
    """One detected object; ``shape``/``position`` are None when nothing fits well enough."""

    colour: str
    shape: str | None
    position: str | None
    mask: np.ndarray = field(repr=False)  # [H, W] bool
    pixels: int = 0
    centroid: tuple[float, float] = (0.0, 0.0)  # (x, y) fractions of the image
    shape_iou: float = 0.0  # IoU of the mask with the chosen shape fitted to its box (a quality figure)

    def as_claim(self) -> Claim | None:
        """The (colour, shape, position) this detection would satisfy, or None if shape/position is unknown."""
        if self.shape is None or self.position is None:
            return None
        return Claim(self.colour, self.shape, self.position)

    def describe(self) -> str:
        """What was drawn, in words: "green triangle top" ("?" for a shape or position that fits none)."""
        return f"{self.colour} {self.shape or '?'} {self.position or '?'}"


# ------------------------------------------------------------------------------------- detection


def _as_array(image: torch.Tensor | np.ndarray | Image.Image) -> np.ndarray:
    """Any supported image as float64 [H, W, 3] in [-1, 1] (float inputs are clipped to that range)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor):
        if image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(
                f"expected an image tensor [3, H, W]; got {tuple(image.shape)} (use caption_accuracy for batches)"
            )
        array = image.detach().cpu()
        if array.dtype == torch.uint8:
            return array.permute(1, 2, 0).numpy().astype(np.float64) / 127.5 - 1.0
        return array.permute(1, 2, 0).double().clamp(-1.0, 1.0).numpy()  # [H, W, 3]
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected an image array [H, W, 3]; got {image.shape}")
        if image.dtype != np.uint8:
            raise TypeError(
                f"an image array must be uint8 [H, W, 3]; got {image.dtype} (pass floats as a [3, H, W] tensor)"
            )
        return image.astype(np.float64) / 127.5 - 1.0
    raise TypeError(f"expected a [3, H, W] tensor, a uint8 [H, W, 3] array or a PIL image; got {type(image).__name__}")


def _hue(rgb: np.ndarray) -> np.ndarray:
    """Hue in degrees [0, 360) of RGB values in [0, 1] ([..., 3] -> [...])."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)) % 360.0


_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float64) / 255.0  # [K, 3] in [0, 1]
_PALETTE_HUES = _hue(_PALETTE_RGB)  # [K] red 0, green 120, blue 240, yellow 60, cyan 180, magenta 300


def classify_pixels(
    image: torch.Tensor | np.ndarray | Image.Image, min_chroma: float = 0.5, max_hue_distance: float = 30.0
) -> np.ndarray:
    """Palette index per pixel: [H, W] int, k for the k-th colour of PALETTE (1-based), 0 for none.

    A pixel is coloured when its chroma (max - min channel, in [0, 1]) is at least ``min_chroma``:
    a palette colour blended half-and-half with any grey background has chroma 0.5, so this is
    the 50% coverage level, whatever the brightness of the background. Its colour is the palette
    colour of nearest hue, if within ``max_hue_distance`` degrees (the six palette hues are 60 apart).
    """
    rgb = (_as_array(image) + 1.0) / 2.0  # [H, W, 3] in [0, 1]
    chroma = rgb.max(axis=-1) - rgb.min(axis=-1)  # [H, W]
    gap = np.abs(_hue(rgb)[..., None] - _PALETTE_HUES)  # [H, W, K]
    gap = np.minimum(gap, 360.0 - gap)
    nearest = gap.argmin(axis=-1)  # [H, W]
    ok = (chroma >= min_chroma) & (gap.min(axis=-1) <= max_hue_distance)
    return np.where(ok, nearest + 1, 0)


def _components(labels: np.ndarray) -> np.ndarray:
    """8-connected components of equal non-zero labels: [H, W] int component id, -1 on background."""
    h, w = labels.shape
    foreground = labels > 0
    big = h * w
    ids = np.where(foreground, np.arange(h * w).reshape(h, w), big)  # [H, W]
    padded_labels = np.pad(labels, 1, constant_values=0)
    same = [foreground & (padded_labels[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w] == labels) for dy, dx in _NEIGHBOURS]
    while True:
        padded = np.pad(ids, 1, constant_values=big)
        best = ids
        for (dy, dx), ok in zip(_NEIGHBOURS, same):
            best = np.where(ok, np.minimum(best, padded[1 + dy : 1 + dy + h, 1 + dx : 1 + dx + w]), best)
        flat = np.append(best.ravel(), big)
        best = np.where(foreground, flat[best], big)  # pointer jumping: adopt the label's own label
        if np.array_equal(best, ids):
            break
        ids = best
    return np.where(foreground, ids, -1)


def _templates(bh: int, bw: int) -> dict[str, np.ndarray]:
    """The three shapes fitted to an [h, w] bounding box, as bool masks [h, w]."""
    u = (np.arange(bw) + 0.5)[None, :] / bw  # [1, w] in (0, 1)
    v = (np.arange(bh) + 0.5)[:, None] / bh  # [h, 1]
    return {
        "circle": np.broadcast_to((u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25, (bh, bw)),
        "square": np.ones((bh, bw), dtype=bool),
        "triangle": np.broadcast_to(np.abs(u - 0.5) <= v / 2, (bh, bw)),
    }


def _shape_of(mask: np.ndarray, max_aspect: float) -> tuple[str | None, float]:
    """Shape of a component cropped to its bounding box ([h, w] bool), and its IoU with that template.

    Two moment features that tolerate blur, noise and stray edge pixels: the vertical skewness
    (an apex-up triangle is bottom-heavy, about -0.56; circles and squares are symmetric, 0) and
    ``E[x^2 y^2] / (E[x^2] E[y^2])`` about the centroid (1 for a square, 2/3 for a disc).
    """
    bh, bw = mask.shape
    ys, xs = np.nonzero(mask)
    x, y = xs - xs.mean(), ys - ys.mean()
    var_x, var_y = max(float((x**2).mean()), 1e-6), max(float((y**2).mean()), 1e-6)
    skew_y = float((y**3).mean()) / var_y**1.5
    cross = float((x**2 * y**2).mean()) / (var_x * var_y)
    if max(bh, bw) > max_aspect * min(bh, bw) or mask.mean() < 0.3 or skew_y > 0.3:
        return None, 0.0  # elongated, sparse or top-heavy: none of the shapes
    if skew_y <= -0.2:
        shape = "triangle"
    else:
        shape = "square" if cross >= 0.76 else "circle"
    template = _templates(bh, bw)[shape]
    return shape, float((mask & template).sum() / (mask | template).sum())


def detect_objects(
    image: torch.Tensor | np.ndarray | Image.Image,
    *,
    min_area: float = 0.01,
    min_chroma: float = 0.5,
    max_hue_distance: float = 30.0,
    max_aspect: float = 2.0,
    max_offset: float = 0.16,
) -> list[Detection]:
    """Objects in a [3, H, W] tensor in [-1, 1] (or uint8 [H, W, 3] array): colour, shape, position, mask.

    Components smaller than ``min_area`` of the image are noise and dropped. ``shape`` is None when
    the component fits no shape (its box more elongated than ``max_aspect``, under 30% filled, or
    top-heavy); ``position`` is None when the centroid is farther than ``max_offset`` (a fraction of
    the image) from every anchor.
    """
    labels = classify_pixels(image, min_chroma, max_hue_distance)  # [H, W]
    h, w = labels.shape
    components = _components(labels)  # [H, W]
    detections = []
    ids, counts = np.unique(components[components >= 0], return_counts=True)
    for cid, count in zip(ids, counts):
        if count < min_area * h * w:
            continue
        mask = components == cid  # [H, W]
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        shape, iou = _shape_of(mask[y0:y1, x0:x1], max_aspect)
        centroid = np.array([(xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h])
        offsets = np.linalg.norm(_ANCHORS - centroid, axis=1)  # [P]
        position = _POSITION_NAMES[int(offsets.argmin())] if offsets.min() <= max_offset else None
        colour = _COLOUR_NAMES[int(labels[ys[0], xs[0]]) - 1]
        detections.append(
            Detection(colour, shape, position, mask, int(count), (float(centroid[0]), float(centroid[1])), iou)
        )
    detections.sort(key=lambda d: -d.pixels)
    return detections


# -------------------------------------------------------------------------------------- captions

# Every word the templates and position phrases use besides colour, shape and place, and a few more.
_FILLER = {
    *(w for template in TEMPLATES for w in template.split() if not w.startswith("{")),
    *(w for phrases in POSITION_PHRASES.values() for p in phrases for w in p.split() if w not in POSITION_WORDS),
    *("an", "of", "to", "image", "picture"),
}


def parse_caption(caption: str) -> list[Claim]:
    """The (colour, shape, position) claims of a shapes caption; a caption outside the vocabulary is a ValueError."""
    words = caption.lower().replace(",", " ").replace(".", " ").split()
    clauses: list[list[str]] = [[]]
    for word in words:
        if word == "and":
            clauses.append([])
        else:
            clauses[-1].append(word)
    claims = []
    for clause in clauses:
        found: dict[str, list[str]] = {"colour": [], "shape": [], "position": []}
        for word in clause:
            if word in PALETTE:
                found["colour"].append(word)
            elif word in SHAPES:
                found["shape"].append(word)
            elif word in POSITION_WORDS:
                found["position"].append(POSITION_WORDS[word])
            elif word not in _FILLER:
                raise ValueError(f"cannot parse caption {caption!r}: unknown word {word!r}")
        for kind, values in found.items():
            if len(values) != 1:
                raise ValueError(
                    f"cannot parse caption {caption!r}: clause {' '.join(clause)!r} names {len(values)} {kind}s, "
                    "expected exactly one"
                )
        claims.append(Claim(found["colour"][0], found["shape"][0], found["position"][0]))
    return claims


@dataclass
class CaptionCheck:
    """Outcome of comparing an image with a caption: the verdict, and what was missing or extra."""

    correct: bool
    claims: list[Claim]
    detections: list[Detection]
    missing: list[Claim]  # claims no detected object satisfies
    extra: list[Detection]  # detected objects no claim accounts for


def check_caption(image: torch.Tensor | np.ndarray | Image.Image, caption: str, **detect_kwargs: float) -> CaptionCheck:
    """Compare a caption's claims with the objects detected in ``image`` (see :func:`detect_objects`)."""
    claims = parse_caption(caption)
    detections = detect_objects(image, **detect_kwargs)
    wanted = Counter(claims)
    extra = []
    for detection in detections:
        claim = detection.as_claim()
        if claim is not None and wanted[claim] > 0:
            wanted[claim] -= 1
        else:
            extra.append(detection)
    missing = list(wanted.elements())
    return CaptionCheck(not missing and not extra, claims, detections, missing, extra)


def caption_correct(image: torch.Tensor | np.ndarray | Image.Image, caption: str) -> bool:
    """True when the image shows exactly the caption's objects (colour, shape, position) and nothing else."""
    return check_caption(image, caption).correct


def caption_accuracy(images: torch.Tensor | Sequence[torch.Tensor | np.ndarray], captions: Sequence[str]) -> float:
    """Fraction of images (a [B, 3, H, W] tensor in [-1, 1] or a sequence) whose caption is correct."""
    if len(images) != len(captions):
        raise ValueError(f"caption_accuracy got {len(images)} images but {len(captions)} captions")
    if len(captions) == 0:
        raise ValueError("caption_accuracy needs at least one image")
    correct = 0
    for image, caption in zip(images, captions):
        check = check_caption(image, caption)
        correct += check.correct
        if not check.correct:
            logger.debug("caption %r: missing %s, extra %s", caption, check.missing, check.extra)
    return correct / len(captions)


def accuracy_by_pair(
    captions: Sequence[str],
    correct: Sequence[bool],
    heldout_colour_shape: Sequence[Sequence[str]],
    heldout_shape_position: Sequence[Sequence[str]],
) -> dict[str, tuple[int, int]]:
    """Caption accuracy split by the held-out pair a caption names: ``{"red triangle": (right, captions),
    "circle at the top": ...}``, in the order the pairs are given.

    A caption naming two held-out pairs counts for both; one naming none is not counted. Shows which
    unseen composition a model fails, where one number averages them all.
    """
    if len(captions) != len(correct):
        raise ValueError(f"accuracy_by_pair got {len(captions)} captions but {len(correct)} verdicts")
    names = {("cs", c, s): f"{c} {s}" for c, s in heldout_colour_shape}
    names |= {("sp", s, p): f"{s} {POSITION_PHRASES[p][0]}" for s, p in heldout_shape_position}
    tally = {name: [0, 0] for name in names.values()}
    for caption, ok in zip(captions, correct):
        claims = parse_caption(caption)
        named = {("cs", c.colour, c.shape) for c in claims} | {("sp", c.shape, c.position) for c in claims}
        for key in named & names.keys():
            tally[names[key]][0] += bool(ok)
            tally[names[key]][1] += 1
    return {name: (right, total) for name, (right, total) in tally.items()}
