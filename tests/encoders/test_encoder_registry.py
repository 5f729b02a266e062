"""The encoder registry: names, aliases, build, errors listing valid names, a cheap import."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mmx.encoders import ENCODERS, CLIPTextEncoder, HFTextEncoder, ResNetFeatures, build
from mmx.registry import UnknownNameError


def test_names_and_aliases() -> None:
    assert ENCODERS.names() == ["bert", "clip", "hf", "resnet"]
    assert ENCODERS.get("clip") is CLIPTextEncoder
    assert ENCODERS.get("hf") is ENCODERS.get("bert") is HFTextEncoder
    assert ENCODERS.get("resnet") is ResNetFeatures


def test_build_passes_arguments() -> None:
    enc = build("resnet", arch="resnet18", stage="layer2", norm="group")
    assert isinstance(enc, ResNetFeatures) and enc.channels == 128


def test_build_by_alias(minilm_path: str) -> None:
    enc = build("bert", name_or_path=minilm_path, pooling="cls")
    assert isinstance(enc, HFTextEncoder) and enc.pooling == "cls"


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError, match="unknown encoder 'vit'; valid names: bert, clip, hf, resnet"):
        build("vit")


def test_import_is_cheap() -> None:
    code = "import sys, mmx.encoders; print(sorted(m for m in ('open_clip', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
