"""Built-in sequence-to-sequence tasks on the shapes grammar: translation and captioning.

**Translation.** Each shapes caption ("a red circle on the left and there is a blue square at
the top") is translated into a second language given by a small template grammar with a
different word order, written Chinese-style: the place comes first ("左边 的 红色 圆形",
literally "left 's red circle"). Every English clause template has one target template, so the
translation is a function of the source; the paraphrases of a place ("on the left", "at the
left side") all translate to the same word. Held-out compositions are those of
:class:`~mmx.data.ShapesDataset`: (colour, shape) and (shape, position) pairs that no training
sentence contains.

**Captioning.** A shapes image and its canonical caption: objects in reading order (top to
bottom, then left to right), each as "a {colour} {shape} {place}" with one fixed phrase per
place, joined by "and". One image has exactly one canonical caption, so exact match is a fair
score. Word masks are keyed by the canonical caption's word indices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import Dataset

from mmx.data.shapes import (
    COLOURS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SHAPE_POSITION,
    POSITION_PHRASES,
    POSITION_WORDS,
    POSITIONS,
    SHAPES,
    TEMPLATES,
    ObjectWords,
    ShapeObject,
    ShapesDataset,
    ShapeSpec,
)

__all__ = [
    "ROMANISED",
    "TARGET_WORDS",
    "TARGET_TEMPLATES",
    "CaptioningDataset",
    "TranslationDataset",
    "canonical_caption",
    "source_vocabulary",
    "target_vocabulary",
    "translate",
]

# The second language's words for every colour, shape and place, and for "and".
TARGET_WORDS: dict[str, str] = {
    "red": "红色",
    "green": "绿色",
    "blue": "蓝色",
    "yellow": "黄色",
    "circle": "圆形",
    "square": "方形",
    "triangle": "三角形",
    "left": "左边",
    "right": "右边",
    "top": "上面",
    "bottom": "下面",
    "centre": "中间",
    "and": "和",
}
# Pinyin without tones: labels for pictures where no installed font draws the characters.
ROMANISED: dict[str, str] = {
    "红色": "hongse",
    "绿色": "lvse",
    "蓝色": "lanse",
    "黄色": "huangse",
    "圆形": "yuanxing",
    "方形": "fangxing",
    "三角形": "sanjiaoxing",
    "左边": "zuobian",
    "右边": "youbian",
    "上面": "shangmian",
    "下面": "xiamian",
    "中间": "zhongjian",
    "和": "he",
    "的": "de",
    "有": "you",
    "一个": "yige",
    "在": "zai",
}
# One target clause template per source template (same order as shapes.TEMPLATES).
TARGET_TEMPLATES: tuple[str, ...] = (
    "{position} 的 {colour} {shape}",  # a {colour} {shape} {position}
    "{position} 有 一个 {colour} {shape}",  # there is a {colour} {shape} {position}
    "{position} 有 一个 {colour} {shape}",  # {position} there is a {colour} {shape}
    "{colour} {shape} 在 {position}",  # a {colour} {shape} is {position}
)
assert len(TARGET_TEMPLATES) == len(TEMPLATES)


def _template_words(templates: Sequence[str]) -> list[str]:
    return [w for t in templates for w in t.split() if not w.startswith("{")]


def _unique(words: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(words))


def source_vocabulary() -> list[str]:
    """Every word a shapes caption can contain (English side)."""
    places = [w for phrases in POSITION_PHRASES.values() for p in phrases for w in p.split()]
    return _unique([*COLOURS, *SHAPES, *places, *_template_words(TEMPLATES), "and", "shape"])


def target_vocabulary() -> list[str]:
    """Every word a translation can contain (second-language side)."""
    return _unique([*TARGET_WORDS.values(), *_template_words(TARGET_TEMPLATES)])


def translate(
    caption: str, objects: Sequence[ShapeSpec], refs: Sequence[ObjectWords], templates: Sequence[int]
) -> tuple[str, list[tuple[int, int]]]:
    """The translation of a caption, and its word alignment ``[(target word, source word), ...]``.

    ``caption``, ``objects``, ``refs`` and ``templates`` are what :meth:`ShapesDataset.describe`
    returns. Aligned are the colour, shape and place words and each "and"; the function words
    of the two grammars ("的", "有 一个", "there is a") have no counterpart.
    """
    ands = [i for i, w in enumerate(caption.split()) if w == "and"]  # clause k > 0 follows ands[k - 1]
    words: list[str] = []
    alignment: list[tuple[int, int]] = []
    for k, (obj, ref, template) in enumerate(zip(objects, refs, templates)):
        if ref.colour < 0 or ref.shape < 0 or not ref.position:
            raise ValueError("translation needs captions that name every attribute (drop_attribute=0)")
        if k:
            alignment.append((len(words), ands[k - 1]))
            words.append(TARGET_WORDS["and"])
        for token in TARGET_TEMPLATES[template].split():
            if token == "{colour}":
                alignment.append((len(words), ref.colour))
                words.append(TARGET_WORDS[obj.colour])
            elif token == "{shape}":
                alignment.append((len(words), ref.shape))
                words.append(TARGET_WORDS[obj.shape])
            elif token == "{position}":
                alignment.append((len(words), ref.position[-1]))
                words.append(TARGET_WORDS[obj.position])
            else:
                words.append(token)
    return " ".join(words), alignment


class TranslationDataset(Dataset):
    """Shapes captions and their translations; deterministic by (seed, index).

    Items: ``source`` (English caption), ``target`` (translation), ``alignment``
    (``[(target word index, source word index), ...]`` for colour, shape, place and "and"),
    ``objects`` (:class:`ShapeSpec` list) and ``index``. The source of item ``i`` is the caption of
    item ``i`` of a :class:`ShapesDataset` with the same arguments.
    """

    def __init__(
        self,
        split: str = "train",
        length: int = 10000,
        seed: int = 0,
        max_objects: int = 2,
        heldout_colour_shape: Sequence[Sequence[str]] = HELDOUT_COLOUR_SHAPE,
        heldout_shape_position: Sequence[Sequence[str]] = HELDOUT_SHAPE_POSITION,
    ) -> None:
        self.shapes = ShapesDataset(
            split,
            length=length,
            seed=seed,
            max_objects=max_objects,
            heldout_colour_shape=heldout_colour_shape,
            heldout_shape_position=heldout_shape_position,
        )

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        specs, caption, refs, templates = self.shapes.describe(index)
        target, alignment = translate(caption, specs, refs, templates)
        return {
            "source": caption,
            "target": target,
            "alignment": alignment,
            "objects": specs,
            "index": self.shapes._index(index),
        }

    def __repr__(self) -> str:
        return f"TranslationDataset({self.shapes!r})"


def _reading_order(spec: ShapeSpec) -> tuple[float, float]:
    x, y = POSITIONS[spec.position]
    return (y, x)


def canonical_caption(objects: Sequence[ShapeSpec]) -> tuple[str, list[ObjectWords], list[int]]:
    """The one caption of an image: objects in reading order, "a {colour} {shape} {place}" joined by "and".

    Returns the caption, each object's word indices (in reading order), and the order itself
    (``order[k]`` = index into ``objects`` of the k-th object named).
    """
    if not objects:
        raise ValueError("a caption needs at least one object")
    order = sorted(range(len(objects)), key=lambda i: _reading_order(objects[i]))
    words: list[str] = []
    refs: list[ObjectWords] = []
    for k, i in enumerate(order):
        obj = objects[i]
        if k:
            words.append("and")
        phrase = POSITION_PHRASES[obj.position][0].split()
        start = len(words)
        words += ["a", obj.colour, obj.shape, *phrase]
        place = tuple(start + 3 + j for j, w in enumerate(phrase) if w in POSITION_WORDS)
        refs.append(ObjectWords(start + 1, start + 2, place))
    return " ".join(words), refs, order


class CaptioningDataset(Dataset):
    """Shapes images with their canonical captions (see :func:`canonical_caption`).

    Items: ``image`` [3, H, W] in [-1, 1], ``caption``, ``objects`` (:class:`ShapeObject` in
    caption order, word indices into the canonical caption), ``word_masks`` {colour / shape word
    index: [H, W] bool} and ``index``. Arguments as :class:`ShapesDataset`.
    """

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
    ) -> None:
        self.shapes = ShapesDataset(
            split,
            size=size,
            length=length,
            seed=seed,
            max_objects=max_objects,
            heldout_colour_shape=heldout_colour_shape,
            heldout_shape_position=heldout_shape_position,
            antialias=antialias,
        )

    def __len__(self) -> int:
        return len(self.shapes)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.shapes[index]
        found: list[ShapeObject] = item["objects"]
        caption, refs, order = canonical_caption([ShapeSpec(o.colour, o.shape, o.position) for o in found])
        objects, word_masks = [], {}
        for ref, i in zip(refs, order):
            o = found[i]
            objects.append(ShapeObject(o.colour, o.shape, o.position, o.mask, (ref.colour, ref.shape), ref.position))
            word_masks[ref.colour] = word_masks[ref.shape] = o.mask
        return {
            "image": item["image"],
            "caption": caption,
            "objects": objects,
            "word_masks": word_masks,
            "index": item["index"],
        }

    def __repr__(self) -> str:
        return f"CaptioningDataset({self.shapes!r})"
