"""Conditioning sources: text and image encoders that all return a :class:`mmx.context.Context`.

Importing this package is cheap: open_clip, transformers and torchvision are imported when an
encoder is built.

>>> from mmx.encoders import build
>>> enc = build("resnet", arch="resnet18", stage="layer3")  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mmx.encoders.base import ENCODERS, ImageFeatures, TextEncoder, TokenizedText
from mmx.encoders.cache import CachedTextEncoder
from mmx.encoders.clip import CLIPTextEncoder
from mmx.encoders.hf import HFTextEncoder
from mmx.encoders.observation import ObservationEncoder
from mmx.encoders.resnet import ResNetFeatures

__all__ = [
    "CachedTextEncoder",
    "CLIPTextEncoder",
    "ENCODERS",
    "HFTextEncoder",
    "ImageFeatures",
    "ObservationEncoder",
    "ResNetFeatures",
    "TextEncoder",
    "TokenizedText",
    "build",
]


def build(name: str, /, **kwargs: Any) -> nn.Module:
    """Build the encoder registered as ``name`` (``clip``, ``hf``/``bert``, ``resnet``) with ``kwargs``."""
    return ENCODERS.build(name, **kwargs)
