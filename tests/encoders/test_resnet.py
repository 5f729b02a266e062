"""ResNetFeatures: torchvision weights load by name, stage shapes, tokens, GroupNorm, input checks."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torch import nn

torchvision = pytest.importorskip("torchvision")

from mmx.encoders import ImageFeatures, ResNetFeatures  # noqa: E402


@pytest.fixture(scope="module")
def trained_resnet18() -> nn.Module:
    """A torchvision resnet18 with random weights and non-trivial BatchNorm running statistics."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).train()
    with torch.no_grad():
        model(torch.randn(4, 3, 64, 64) * 2 + 1)
    return model.eval()


def _layer3(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    return model.layer3(model.layer2(model.layer1(x)))


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_torchvision_state_dict_file_gives_identical_features(trained_resnet18, tmp_path, suffix) -> None:
    path = tmp_path / f"resnet18{suffix}"
    state = trained_resnet18.state_dict()  # fc.* and layer4.* included: ignored
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(state, str(path))
    else:
        torch.save(state, path)
    enc = ResNetFeatures("resnet18", "layer3", weights=path, normalize=False).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(enc(x).map, _layer3(trained_resnet18, x))
    assert set(enc.state_dict()) <= set(state)  # torchvision's own parameter names
    assert not hasattr(enc, "fc") and not hasattr(enc, "layer4")


def test_shapes_tokens_and_context() -> None:
    enc = ResNetFeatures("resnet18", "layer3")
    feats = enc(torch.rand(2, 3, 64, 96))
    assert isinstance(feats, ImageFeatures)
    assert (enc.channels, enc.reduction) == (256, 16)
    assert feats.map.shape == (2, 256, 4, 6) and feats.tokens.shape == (2, 24, 256)
    torch.testing.assert_close(feats.tokens[:, 1 * 6 + 4], feats.map[:, :, 1, 4])  # row-major grid
    ctx = feats.context()
    assert ctx.grid == (4, 6) and ctx.mask.all() and ctx.mask.dtype == torch.bool
    torch.testing.assert_close(ctx.pooled, feats.map.mean(dim=(2, 3)))


@pytest.mark.parametrize(
    "arch,stage,channels,reduction",
    [("resnet18", "layer1", 64, 4), ("resnet34", "layer2", 128, 8), ("resnet50", "layer3", 1024, 16)],
)
def test_channels_and_reduction(arch: str, stage: str, channels: int, reduction: int) -> None:
    enc = ResNetFeatures(arch, stage)
    feats = enc(torch.rand(1, 3, 32, 32))
    assert (enc.channels, enc.reduction) == (channels, reduction)
    assert feats.map.shape == (1, channels, 32 // reduction, 32 // reduction)


def test_group_norm_replaces_every_batch_norm() -> None:
    enc = ResNetFeatures("resnet18", "layer2", norm="group").train()
    assert not any(isinstance(m, nn.BatchNorm2d) for m in enc.modules())
    groups = [m for m in enc.modules() if isinstance(m, nn.GroupNorm)]
    assert groups and all(m.num_groups == m.num_channels // 16 for m in groups)
    feats = enc(torch.rand(1, 3, 32, 32))  # batch of one in training mode works
    feats.map.sum().backward()


def test_normalize_applies_imagenet_statistics() -> None:
    torch.manual_seed(0)
    enc = ResNetFeatures("resnet18", "layer1").eval()
    x = torch.rand(1, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    enc_raw = ResNetFeatures("resnet18", "layer1", normalize=False).eval()
    enc_raw.load_state_dict(enc.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(enc(x).map, enc_raw((x - mean) / std).map)


def test_bad_inputs_name_the_shape() -> None:
    enc = ResNetFeatures("resnet18", "layer1")
    with pytest.raises(ValueError, match=r"\(3, 32, 32\)"):
        enc(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(2, 1, 32, 32\)"):
        enc(torch.rand(2, 1, 32, 32))


def test_bad_names_list_the_valid_ones(tmp_path) -> None:
    with pytest.raises(ValueError, match="resnet18, resnet34, resnet50"):
        ResNetFeatures("resnet101")
    with pytest.raises(ValueError, match="layer1, layer2, layer3, layer4"):
        ResNetFeatures("resnet18", "layer5")
    with pytest.raises(ValueError, match="IMAGENET1K_V1"):
        ResNetFeatures("resnet18", weights="IMAGENET9K")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ResNetFeatures("resnet18", weights=tmp_path / "missing.pt")


@pytest.mark.parametrize("name", ["IMAGENET1K_V1", "DEFAULT"])
def test_weights_name_offline_error_names_it(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    def offline(*args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(torchvision.models._api, "load_state_dict_from_url", offline)
    with pytest.raises(RuntimeError, match=f"resnet18 '{name}'.*local state_dict file"):
        ResNetFeatures("resnet18", weights=name)
