"""Conditioning sources: text and image encoders that all return a :class:`mmx.context.Context`.

Importing this package is cheap: open_clip, transformers and torchvision are imported when an
encoder is built.

>>> from mmx.encoders import build
>>> enc = build("resnet", arch="resnet18", stage="layer3")  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
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
    "read_spec",
]


def build(name: str, /, **kwargs: Any) -> nn.Module:
    """Build the encoder registered as ``name`` (``clip``, ``hf``/``bert``, ``resnet``) with ``kwargs``."""
    return ENCODERS.build(name, **kwargs)


def read_spec(path: str | Path) -> dict[str, Any]:
    """An encoder spec (``{"name": ..., **arguments}``) from a YAML file; errors name the file and what is wrong."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not a UTF-8 text file: {err}") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path} must hold a mapping with a 'name' key; got {type(spec).__name__}")
    return spec
