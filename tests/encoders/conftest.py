"""Fixtures of the encoder tests: tiny open_clip configs (offline set-up is in tests/conftest.py)."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(scope="session")
def tiny_clip_names(tmp_path_factory: pytest.TempPathFactory, minilm_path: str) -> dict[str, str]:
    """Register tiny open_clip architectures: plain CLIP, CustomTextCLIP, and an HF (MiniLM) text tower."""
    open_clip = pytest.importorskip("open_clip")
    folder = tmp_path_factory.mktemp("open_clip_configs")
    vision = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
    text = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}
    hf_text = {
        "context_length": 32,
        "hf_model_name": minilm_path,
        "hf_tokenizer_name": minilm_path,
        "hf_proj_type": "linear",
        "hf_pooler_type": "mean_pooler",
    }
    configs = {
        "clip": ("mmx-test-tiny", {"embed_dim": 24, "vision_cfg": vision, "text_cfg": text}),
        "custom": ("mmx-test-tiny-custom", {"embed_dim": 24, "custom_text": True, "vision_cfg": vision, "text_cfg": text}),
        "hf": ("mmx-test-tiny-hf", {"embed_dim": 24, "vision_cfg": vision, "text_cfg": hf_text}),
    }
    for name, config in configs.values():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return {kind: name for kind, (name, _) in configs.items()}
