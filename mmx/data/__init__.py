"""Data: captioned images (synthetic shapes, image folders; registered by name in DATASETS),
sentence pairs and canonical captions for the sequence-to-sequence tasks,
trajectories (Diffusion Policy replay buffers and sequence windows) and small simulators.

>>> from mmx.data import DATASETS, collate
>>> train = DATASETS.build("shapes", split="train", length=1000)
>>> batch = collate([train[0], train[1]])  # batch["image"]: [2, 3, 32, 32] in [-1, 1]
"""

from __future__ import annotations

from mmx.data.envs import ENVS, ReachEnv, TargetsEnv, collect_demos, make_env, rollout
from mmx.data.imagefolder import ImageDecodeError, ImageFolderCaptions
from mmx.data.seq2seq import (
    CaptioningDataset,
    TranslationDataset,
    canonical_caption,
    source_vocabulary,
    target_vocabulary,
    translate,
)
from mmx.data.shapes import (
    BACKGROUND,
    COLOURS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SHAPE_POSITION,
    OBJECT_SCALE,
    PALETTE,
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
from mmx.data.text import WordTokenizer
from mmx.data.trajectory import ReplayBuffer, TrajectoryDataset, collate_trajectories, episode_split, sequence_indices
from mmx.registry import Registry

__all__ = [
    "BACKGROUND",
    "COLOURS",
    "DATASETS",
    "ENVS",
    "HELDOUT_COLOUR_SHAPE",
    "HELDOUT_SHAPE_POSITION",
    "OBJECT_SCALE",
    "PALETTE",
    "POSITIONS",
    "POSITION_PHRASES",
    "POSITION_WORDS",
    "SHAPES",
    "TEMPLATES",
    "TargetsEnv",
    "CaptioningDataset",
    "TranslationDataset",
    "WordTokenizer",
    "canonical_caption",
    "source_vocabulary",
    "target_vocabulary",
    "translate",
    "ImageDecodeError",
    "ImageFolderCaptions",
    "ObjectWords",
    "ReachEnv",
    "ReplayBuffer",
    "ShapeObject",
    "ShapeSpec",
    "ShapesDataset",
    "TrajectoryDataset",
    "caption_for",
    "caption_with_words",
    "collate",
    "collect_demos",
    "collate_trajectories",
    "episode_split",
    "make_env",
    "object_masks",
    "render",
    "rollout",
    "sequence_indices",
]

DATASETS: Registry = Registry("dataset")
DATASETS.register("shapes")(ShapesDataset)
DATASETS.register("imagefolder")(ImageFolderCaptions)
DATASETS.register("translation")(TranslationDataset)
DATASETS.register("captioning")(CaptioningDataset)
