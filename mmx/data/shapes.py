"""Synthetic shapes with captions, object masks and caption-word alignments.

Each image (default 32x32) shows 1-2 flat, saturated shapes on a black background (by default in
red, green, blue or yellow; ``colours=`` picks any of the six of :data:`PALETTE`), each at one
of five anchors (left, right, top, bottom, centre), with a caption such as
"a blue square at the top and on the right there is a green triangle". Objects are a quarter of
the image wide and the anchors sit 5/16 apart, so two objects never touch (at 32x32 there are at
least two background pixels between them). ``jitter=`` moves each object off its anchor by whole
pixels (at most 1/16 of the image per axis, one background pixel kept between objects; each object
with probability ``jitter_share``), so a shape is seen at many pixel offsets while its caption still
names one of the five places. Everything is drawn analytically with numpy from the sample's seed, so
sample ``i`` of a dataset with seed ``s`` is always the same picture and text.

A compositional split holds out (colour, shape) and (shape, position) pairs: ``split="train"``
never shows or names an object with a held-out pair; every ``split="heldout"`` sample has one.
"""

from __future__ import annotations

import logging
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "HELDOUT_COLOUR_SHAPE",
    "HELDOUT_SHAPE_POSITION",
    "MAX_JITTER",
    "OBJECT_SCALE",
    "PALETTE",
    "POSITIONS",
    "POSITION_PHRASES",
    "POSITION_WORDS",
    "SHAPES",
    "TEMPLATES",
    "ObjectWords",
    "ShapeObject",
    "ShapeSpec",
    "ShapesDataset",
    "caption_clauses",
    "caption_for",
    "caption_with_words",
    "collate",
    "object_masks",
    "render",
]

logger = logging.getLogger(__name__)

# Every colour an object can have: the six saturated RGB corners, 60 degrees of hue apart, pairwise
# at least 255 apart (2.0 in [-1, 1] units) and from the background. The detector reads all six.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
# The default colours of ShapesDataset (and the colour words of the seq2seq and policy data sets).
COLOURS: dict[str, tuple[int, int, int]] = {name: PALETTE[name] for name in ("red", "green", "blue", "yellow")}
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Anchor (x, y) of each position as fractions of the image width/height; pixel-aligned at 16, 32, 64.
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (3 / 16, 0.5),
    "right": (13 / 16, 0.5),
    "top": (0.5, 3 / 16),
    "bottom": (0.5, 13 / 16),
    "centre": (0.5, 0.5),
}
# Side of a shape's bounding box as a fraction of the image (8 pixels at 32x32).
OBJECT_SCALE = 0.25
# Space between the boxes of objects at neighbouring anchors (5/16 apart), as a fraction of the image.
ANCHOR_GAP = 5 / 16 - OBJECT_SCALE
# The most ShapesDataset(jitter=...) may move an object off its anchor, per axis, as a fraction of the
# image: the edge anchors sit 3/16 from the border and half a box is 1/8, so 1/16 keeps every object whole.
MAX_JITTER = 1 / 16

# With the four default colours no training image draws a circle in the B channel (only blue lights
# it), so a generator asked for a "blue circle" must also draw in a channel it never drew a circle in;
# red triangles are covered by yellow ones in R. ShapesDataset.channel_gaps() names such pairs.
HELDOUT_COLOUR_SHAPE: tuple[tuple[str, str], ...] = (("red", "triangle"), ("blue", "circle"))
HELDOUT_SHAPE_POSITION: tuple[tuple[str, str], ...] = (("square", "bottom"), ("circle", "top"))

POSITION_PHRASES: dict[str, tuple[str, ...]] = {
    "left": ("on the left", "at the left", "on the left side"),
    "right": ("on the right", "at the right", "on the right side"),
    "top": ("at the top", "on the top", "near the top"),
    "bottom": ("at the bottom", "on the bottom", "near the bottom"),
    "centre": ("in the centre", "in the middle", "at the centre"),
}
# Words that name a place, and the position they name ("center" is read, never written).
POSITION_WORDS: dict[str, str] = {
    "left": "left",
    "right": "right",
    "top": "top",
    "bottom": "bottom",
    "centre": "centre",
    "center": "centre",
    "middle": "centre",
}
# Clause templates; clauses of a multi-object caption are joined with "and".
TEMPLATES: tuple[str, ...] = (
    "a {colour} {shape} {position}",
    "there is a {colour} {shape} {position}",
    "{position} there is a {colour} {shape}",
    "a {colour} {shape} is {position}",
)


@dataclass(frozen=True)
class ShapeSpec:
    """One object to draw: colour, shape and position name."""

    colour: str
    shape: str
    position: str
    offset: tuple[float, float] = (0.0, 0.0)  # (dx, dy) from the position's anchor, fractions of the image

    def __post_init__(self) -> None:
        for value, valid, what in (
            (self.colour, PALETTE, "colour"),
            (self.shape, SHAPES, "shape"),
            (self.position, POSITIONS, "position"),
        ):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) of the bounding-box centre as fractions of the image: the anchor plus ``offset``."""
        x, y = POSITIONS[self.position]
        return x + self.offset[0], y + self.offset[1]


class ObjectWords(NamedTuple):
    """Indices into ``caption.split()`` of the words naming one object."""

    colour: int
    shape: int
    position: tuple[int, ...]


@dataclass(frozen=True, eq=False)
class ShapeObject:
    """One object of a sample: what it is, its [H, W] bool mask, and the caption words that name it."""

    colour: str
    shape: str
    position: str
    mask: torch.Tensor  # [H, W] bool
    words: tuple[int, int]  # (colour word, shape word) indices into caption.split()
    position_words: tuple[int, ...]  # the place word ("left", "middle", ...) index into caption.split()


# --------------------------------------------------------------------------------------- drawing


def _coverage(spec: ShapeSpec, size: int, samples: int, scale: float) -> np.ndarray:
    """Fraction of each pixel inside the shape, from ``samples x samples`` points per pixel: [H, W]."""
    grid = (np.arange(size * samples) + 0.5) / (size * samples)  # sample coordinates in (0, 1)
    x, y = grid[None, :], grid[:, None]  # [1, W*s], [H*s, 1]
    cx, cy = spec.centre
    half = scale / 2
    if spec.shape == "circle":
        inside = (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    elif spec.shape == "square":
        inside = (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    else:  # isosceles triangle, apex up, as wide as it is tall
        top = cy - half
        inside = (y >= top) & (y <= cy + half) & (np.abs(x - cx) <= (y - top) / 2)
    return inside.reshape(size, samples, size, samples).mean(axis=(1, 3))  # [H, W]


def _draw(
    objects: Sequence[ShapeSpec], size: int, antialias: bool, scale: float
) -> tuple[np.ndarray, list[np.ndarray]]:
    """The picture, uint8 [H, W, 3], and one bool [H, W] mask per object (pixels at least half covered)."""
    samples = 4 if antialias else 1
    image = np.empty((size, size, 3), dtype=np.float64)
    image[:] = BACKGROUND
    masks = []
    for obj in objects:
        cover = _coverage(obj, size, samples, scale)  # [H, W]
        alpha = cover[..., None]  # [H, W, 1]
        image = image * (1 - alpha) + np.asarray(PALETTE[obj.colour], dtype=np.float64) * alpha
        masks.append(cover >= 0.5)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), masks


def render(
    objects: Sequence[ShapeSpec], size: int = 32, *, antialias: bool = False, scale: float = OBJECT_SCALE
) -> np.ndarray:
    """Draw ``objects`` on the background: uint8 [H, W, 3] with H = W = ``size``."""
    return _draw(objects, size, antialias, scale)[0]


def object_masks(
    objects: Sequence[ShapeSpec], size: int = 32, *, antialias: bool = False, scale: float = OBJECT_SCALE
) -> list[np.ndarray]:
    """One bool [H, W] mask per object: the pixels at least half covered by it."""
    return _draw(objects, size, antialias, scale)[1]


# -------------------------------------------------------------------------------------- captions


ATTRIBUTES: tuple[str, ...] = ("colour", "shape", "position")


def _clause_template(template: str, drop: str | None) -> str:
    """The clause template with one attribute left out: no colour word, "shape" for the shape, no place."""
    if drop == "colour":
        return template.replace("{colour} ", "")
    if drop == "shape":
        return template.replace("{shape}", "shape")
    if drop == "position":
        return template.replace("{position} ", "").replace(" is {position}", "").replace(" {position}", "")
    return template


def caption_with_words(
    objects: Sequence[ShapeSpec],
    rng: np.random.Generator,
    drop_attribute: float = 0.0,
    droppable: Sequence[str] = ATTRIBUTES,
) -> tuple[str, list[ObjectWords]]:
    """A templated caption naming every object in order, and each object's word indices.

    With ``drop_attribute > 0`` each clause leaves out one of its ``droppable`` attributes (colour /
    shape / position, chosen uniformly) with that probability: "a triangle on the left", "a red
    shape on the left", "a red triangle". The left-out word's index in :class:`ObjectWords` is -1
    (or an empty position).
    """
    caption, refs, _ = caption_clauses(objects, rng, drop_attribute, droppable)
    return caption, refs


def caption_clauses(
    objects: Sequence[ShapeSpec],
    rng: np.random.Generator,
    drop_attribute: float = 0.0,
    droppable: Sequence[str] = ATTRIBUTES,
) -> tuple[str, list[ObjectWords], list[int]]:
    """:func:`caption_with_words` plus the index into :data:`TEMPLATES` of each object's clause.

    Draws exactly the same random numbers, so both give the same caption for the same ``rng``.
    """
    if not objects:
        raise ValueError("a caption needs at least one object")
    words: list[str] = []
    refs: list[ObjectWords] = []
    chosen: list[int] = []
    for k, obj in enumerate(objects):
        if k:
            words.append("and")
        chosen.append(int(rng.integers(len(TEMPLATES))))
        template = TEMPLATES[chosen[-1]]
        if drop_attribute > 0 and rng.random() < drop_attribute:  # no draw at all when disabled
            template = _clause_template(template, droppable[int(rng.integers(len(droppable)))])
        phrases = POSITION_PHRASES[obj.position]
        phrase = phrases[int(rng.integers(len(phrases)))].split()
        colour = shape = -1
        place: list[int] = []
        for token in template.split():
            if token == "{colour}":
                colour = len(words)
                words.append(obj.colour)
            elif token == "{shape}":
                shape = len(words)
                words.append(obj.shape)
            elif token == "{position}":
                place += [len(words) + j for j, w in enumerate(phrase) if w in POSITION_WORDS]
                words.extend(phrase)
            else:
                words.append(token)
        refs.append(ObjectWords(colour, shape, tuple(place)))
    return " ".join(words), refs, chosen


def caption_for(objects: Sequence[ShapeSpec], rng: np.random.Generator) -> str:
    """A templated caption (lower case, no punctuation) naming every object in order."""
    return caption_with_words(objects, rng)[0]


# --------------------------------------------------------------------------------------- dataset


def _apart(a: ShapeSpec, b: ShapeSpec, gap: float) -> bool:
    """Whether the bounding boxes of ``a`` and ``b`` are at least ``gap`` apart in x or in y."""
    (ax, ay), (bx, by) = a.centre, b.centre
    return max(abs(ax - bx), abs(ay - by)) - OBJECT_SCALE >= gap - 1e-9


def _check_pairs(pairs: Sequence[Sequence[str]], first: Sequence[str], second: Sequence[str], what: str) -> tuple:
    out = []
    for pair in pairs:
        if len(pair) != 2 or pair[0] not in first or pair[1] not in second:
            raise ValueError(
                f"held-out {what} pair {tuple(pair)!r} is not valid; first in {list(first)}, second in {list(second)}"
            )
        out.append((pair[0], pair[1]))
    return tuple(out)


class ShapesDataset(Dataset):
    """Synthetic captioned shapes with masks and word alignments; deterministic by (seed, index)."""

    SPLITS = ("train", "heldout")

    def __init__(
        self,
        split: str = "train",
        size: int = 32,
        length: int = 10000,
        seed: int = 0,
        max_objects: int = 2,
        heldout_colour_shape: Sequence[Sequence[str]] = HELDOUT_COLOUR_SHAPE,
        heldout_shape_position: Sequence[Sequence[str]] = HELDOUT_SHAPE_POSITION,
        antialias: bool = False,
        drop_attribute: float = 0.0,
        colours: Sequence[str] = tuple(COLOURS),
        droppable: Sequence[str] = ATTRIBUTES,
        jitter: float = 0.0,
        jitter_share: float = 1.0,
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(self.SPLITS)}")
        # A spec from YAML can carry any type (``data.size=`` gives ""): name it before comparing.
        for name, value in (("size", size), ("length", length), ("seed", seed), ("max_objects", max_objects)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"ShapesDataset {name} must be an integer; got {type(value).__name__} {value!r}")
        for name, value in (("drop_attribute", drop_attribute), ("jitter", jitter), ("jitter_share", jitter_share)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"ShapesDataset {name} must be a number; got {type(value).__name__} {value!r}")
        if size < 8:
            raise ValueError(f"size must be at least 8 pixels; got {size}")
        if length < 0:
            raise ValueError(f"length must be >= 0; got {length}")
        if not 1 <= max_objects <= len(POSITIONS):
            raise ValueError(f"max_objects must be in 1..{len(POSITIONS)} (one object per position); got {max_objects}")
        self.split, self.size, self.length, self.seed = split, size, length, seed
        if not 0.0 <= drop_attribute <= 1.0:
            raise ValueError(f"drop_attribute must be a probability in [0, 1]; got {drop_attribute}")
        if (
            isinstance(droppable, str)
            or not isinstance(droppable, Sequence)
            or not droppable
            or any(a not in ATTRIBUTES for a in droppable)
            or len(set(droppable)) != len(droppable)
        ):
            raise ValueError(
                f"ShapesDataset droppable must be a non-empty list of distinct attributes from "
                f"{', '.join(ATTRIBUTES)}; got {droppable!r}"
            )
        if not 0.0 <= jitter <= MAX_JITTER:
            raise ValueError(
                f"ShapesDataset jitter must be in [0, {MAX_JITTER}] (a fraction of the image; more would push "
                f"objects at the edge anchors out of the picture); got {jitter}"
            )
        if not 0.0 <= jitter_share <= 1.0:
            raise ValueError(f"ShapesDataset jitter_share must be a probability in [0, 1]; got {jitter_share}")
        self.max_objects, self.antialias, self.drop_attribute = max_objects, antialias, drop_attribute
        self.jitter, self.jitter_share = float(jitter), float(jitter_share)
        self.droppable = tuple(droppable)
        if isinstance(colours, str) or not isinstance(colours, Sequence) or not colours:
            raise TypeError(f"ShapesDataset colours must be a non-empty list of colour names; got {colours!r}")
        unknown = [c for c in colours if c not in PALETTE]
        if unknown or len(set(colours)) != len(colours):
            problem = f"unknown {unknown!r}" if unknown else "a repeated name"
            raise ValueError(f"ShapesDataset colours {list(colours)!r} has {problem}; choose from {', '.join(PALETTE)}")
        self.colours = tuple(colours)
        self.heldout_colour_shape = _check_pairs(heldout_colour_shape, self.colours, SHAPES, "(colour, shape)")
        self.heldout_shape_position = _check_pairs(heldout_shape_position, SHAPES, list(POSITIONS), "(shape, position)")

        everything = [(c, s, p) for c in self.colours for s in SHAPES for p in POSITIONS]
        self._train_pool = [o for o in everything if not self.is_heldout(*o)]
        self._heldout_pool = [o for o in everything if self.is_heldout(*o)]
        for index, vocabulary, what in ((0, self.colours, "colour"), (1, SHAPES, "shape"), (2, POSITIONS, "position")):
            missing = sorted(set(vocabulary) - {o[index] for o in self._train_pool})
            if missing:
                raise ValueError(f"the held-out pairs leave no training object with {what} {', '.join(missing)}")
        if len({o[2] for o in self._train_pool}) < max_objects:
            raise ValueError(f"the held-out pairs leave fewer than max_objects={max_objects} positions for training")
        if split == "heldout" and not self._heldout_pool:
            raise ValueError("split='heldout' needs at least one held-out pair")
        # The first object is drawn from the split's own kinds; the others from what the split allows.
        self._first_pool = self._train_pool if split == "train" else self._heldout_pool
        self._rest_pool = self._train_pool if split == "train" else everything
        logger.debug(
            "ShapesDataset(split=%s): %d training and %d held-out object kinds",
            split,
            len(self._train_pool),
            len(self._heldout_pool),
        )

    def is_heldout(self, colour: str, shape: str, position: str) -> bool:
        """Whether an object with this colour, shape and position has a held-out pair."""
        return (colour, shape) in self.heldout_colour_shape or (shape, position) in self.heldout_shape_position

    def channel_gaps(self) -> dict[tuple[str, str], str]:
        """Held-out (colour, shape) pairs whose colour lights an RGB channel that no training object
        of that shape lights, mapped to those channels (e.g. ``{("blue", "circle"): "B"}``).

        A pixel-space generator has then never drawn the shape in that channel, so the pair tests
        extrapolation in the output as well as the composition of words. ``{}``: every pair is covered.
        """
        gaps = {}
        for colour, shape in self.heldout_colour_shape:
            lit = {k for c, s, _ in self._train_pool if s == shape for k in range(3) if PALETTE[c][k]}
            missing = "".join("RGB"[k] for k in range(3) if PALETTE[colour][k] and k not in lit)
            if missing:
                gaps[(colour, shape)] = missing
        return gaps

    def __len__(self) -> int:
        return self.length

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.SPLITS.index(self.split), index])

    def _index(self, index: int) -> int:
        if not -self.length <= index < self.length:
            raise IndexError(f"index {index} out of range for ShapesDataset of length {self.length}")
        return index % self.length

    def specs(self, index: int) -> list[ShapeSpec]:
        """The objects of sample ``index`` (without drawing them), in caption order."""
        return self._sample(self._rng(self._index(index)))[0]

    def describe(self, index: int) -> tuple[list[ShapeSpec], str, list[ObjectWords], list[int]]:
        """Sample ``index`` without drawing it: objects, caption, word indices, template of each clause."""
        return self._sample(self._rng(self._index(index)))

    def _sample(self, rng: np.random.Generator) -> tuple[list[ShapeSpec], str, list[ObjectWords], list[int]]:
        count = int(rng.integers(1, self.max_objects + 1))
        chosen = [self._first_pool[int(rng.integers(len(self._first_pool)))]]
        while len(chosen) < count:
            used = {o[2] for o in chosen}
            options = [o for o in self._rest_pool if o[2] not in used]
            chosen.append(options[int(rng.integers(len(options)))])
        order = rng.permutation(count)
        specs = [ShapeSpec(*chosen[k]) for k in order]
        caption, refs, templates = caption_clauses(specs, rng, self.drop_attribute, self.droppable)
        if self.jitter > 0 and self.jitter_share > 0:  # drawn after the caption: the captions stay those without jitter
            specs = self._jittered(specs, rng)
        return specs, caption, refs, templates

    def _jittered(self, specs: list[ShapeSpec], rng: np.random.Generator) -> list[ShapeSpec]:
        """``specs`` moved off their anchors by whole pixels, at most ``jitter`` of the image in x and in y;
        each object moves with probability ``jitter_share`` and otherwise stays on its anchor.

        Whole pixels make each moved object an exact translation of its anchored drawing. Offsets are
        drawn again until every two objects keep at least one pixel between their boxes (below 16
        pixels, the 1/16 of the image that the anchors leave, which no offset at all always meets).
        """
        reach = int(np.floor(self.jitter * self.size + 1e-9))  # pixels
        gap = min(1.0 / self.size, ANCHOR_GAP)
        moves = rng.random(len(specs)) < self.jitter_share  # [N]
        while True:
            steps = rng.integers(-reach, reach + 1, size=(len(specs), 2)) * moves[:, None]  # [N, 2] pixels
            moved = [
                ShapeSpec(s.colour, s.shape, s.position, (float(dx) / self.size, float(dy) / self.size))
                for s, (dx, dy) in zip(specs, steps)
            ]
            if all(_apart(a, b, gap) for i, a in enumerate(moved) for b in moved[i + 1 :]):
                return moved

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``image`` [3, H, W] in [-1, 1], ``caption``, ``objects``, ``word_masks`` {word index: [H, W] bool}."""
        index = self._index(index)
        specs, caption, refs, _ = self._sample(self._rng(index))
        pixels, masks = _draw(specs, self.size, self.antialias, OBJECT_SCALE)  # [H, W, 3] uint8, [H, W] bool
        image = torch.from_numpy(pixels).permute(2, 0, 1).float().div(127.5).sub(1.0)  # [3, H, W]
        objects, word_masks = [], {}
        for spec, ref, mask in zip(specs, refs, masks):
            mask_t = torch.from_numpy(mask)  # [H, W] bool
            objects.append(
                ShapeObject(spec.colour, spec.shape, spec.position, mask_t, (ref.colour, ref.shape), ref.position)
            )
            for word in (ref.colour, ref.shape):
                if word >= 0:  # -1: the caption left this attribute out
                    word_masks[word] = mask_t
        return {"image": image, "caption": caption, "objects": objects, "word_masks": word_masks, "index": index}

    def __repr__(self) -> str:
        return (
            f"ShapesDataset(split={self.split!r}, size={self.size}, length={self.length}, seed={self.seed}, "
            f"max_objects={self.max_objects}, colours={self.colours}, jitter={self.jitter}, "
            f"jitter_share={self.jitter_share}, "
            f"heldout_colour_shape={self.heldout_colour_shape}, heldout_shape_position={self.heldout_shape_position})"
        )


def collate(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """DataLoader ``collate_fn``: stacks tensor fields (``image`` -> [B, 3, H, W]); keeps the rest as lists."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if all(isinstance(v, torch.Tensor) for v in values):
            shapes = {tuple(v.shape) for v in values}
            if len(shapes) != 1:
                raise ValueError(f"cannot stack {key!r}: samples have shapes {sorted(shapes)}")
            batch[key] = torch.stack(values)
        else:
            batch[key] = values
    return batch
