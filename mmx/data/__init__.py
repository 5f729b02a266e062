"""Datasets of captioned images: synthetic shapes and image folders, registered by name in DATASETS.

>>> from mmx.data import DATASETS, collate
>>> train = DATASETS.build("shapes", split="train", length=1000)
>>> batch = collate([train[0], train[1]])  # batch["image"]: [2, 3, 32, 32] in [-1, 1]
"""

from __future__ import annotations

from mmx.data.imagefolder import ImageDecodeError, ImageFolderCaptions
from mmx.data.shapes import (
    BACKGROUND,
    COLOURS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SHAPE_POSITION,
    OBJECT_SCALE,
    POSITION_PHRASES,
    POSITION_WORDS,
    POSITIONS,
    SHAPES,
    TEMPLATES,
    ObjectWords,
    ShapeObject,
    ShapesDataset,
    ShapeSpec,
    caption_for,
    caption_with_words,
    collate,
    object_masks,
    render,
)
from mmx.registry import Registry

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "DATASETS",
    "HELDOUT_COLOUR_SHAPE",
    "HELDOUT_SHAPE_POSITION",
    "OBJECT_SCALE",
    "POSITIONS",
    "POSITION_PHRASES",
    "POSITION_WORDS",
    "SHAPES",
    "TEMPLATES",
    "ImageDecodeError",
    "ImageFolderCaptions",
    "ObjectWords",
    "ShapeObject",
    "ShapeSpec",
    "ShapesDataset",
    "caption_for",
    "caption_with_words",
    "collate",
    "object_masks",
    "render",
]

DATASETS: Registry = Registry("dataset")
DATASETS.register("shapes")(ShapesDataset)
DATASETS.register("imagefolder")(ImageFolderCaptions)
