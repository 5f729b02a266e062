"""Tiny random-weight diffusers pipelines of the four families (:func:`mmx.attnmap.pipelines.offline.tiny_pipeline`),
built offline from configs, with real tokenizers (CLIP's BPE from open_clip's vocabulary; T5's class over a
vocabulary from the MiniLM package)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def clip_tokenizer():
    from mmx.attnmap.pipelines.offline import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="session")
def t5_tokenizer():
    from mmx.attnmap.pipelines.offline import t5_tokenizer

    return t5_tokenizer()


@pytest.fixture(scope="session")
def tiny_pipelines(clip_tokenizer, t5_tokenizer):
    """``family -> pipeline``: one tiny pipeline of each family (built once per session)."""
    from mmx.attnmap.pipelines.offline import tiny_pipeline

    return {family: tiny_pipeline(family, clip_tokenizer, t5_tokenizer) for family in ("sd", "sdxl", "sd3", "flux")}
