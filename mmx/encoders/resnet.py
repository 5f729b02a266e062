"""ResNet feature maps (torchvision resnet18/34/50 up to a chosen stage) as image tokens.

He et al. 2016, "Deep Residual Learning for Image Recognition". ``norm="group"`` follows
Diffusion Policy (Chi et al. 2023), which swaps BatchNorm for GroupNorm for small batches.
Letters: B batch, C channels, H/W image height/width, h/w feature grid.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from mmx.encoders.base import ENCODERS, ImageFeatures

__all__ = ["ResNetFeatures"]

logger = logging.getLogger(__name__)

ARCHS = ("resnet18", "resnet34", "resnet50")
STAGES = ("layer1", "layer2", "layer3", "layer4")
NORMS = ("batch", "group")
_BASIC_CHANNELS = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
_REDUCTION = {"layer1": 4, "layer2": 8, "layer3": 16, "layer4": 32}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_STATE_DICT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")


@ENCODERS.register("resnet")
class ResNetFeatures(nn.Module):
    """A torchvision ResNet cut after ``stage``: images ``[B, 3, H, W]`` -> features ``[B, C, H/r, W/r]``.

    The stem and stages keep torchvision's parameter names (``conv1``, ``bn1``, ``layer1.0.conv1``,
    ...), so torchvision state_dicts load as they are.

    Args:
        arch: ``"resnet18"``, ``"resnet34"`` or ``"resnet50"``.
        stage: the last stage kept, ``"layer1"`` .. ``"layer4"`` (reduction r = 4, 8, 16, 32).
        weights: None (random), a torchvision weights name such as ``"IMAGENET1K_V1"`` or
            ``"DEFAULT"`` (torchvision's weights API and cache), or a local state_dict file of the
            full torchvision model (``.safetensors``, or ``.pt`` / ``.pth`` for torch.load; ``fc.*``
            and later-stage keys are ignored).
        norm: ``"batch"`` (torchvision's BatchNorm2d) or ``"group"`` (every BatchNorm2d replaced by
            a fresh ``GroupNorm(C // 16, C)`` after loading the weights).
        normalize: apply ImageNet mean/std to inputs in [0, 1].
    """

    def __init__(
        self,
        arch: str = "resnet18",
        stage: str = "layer3",
        weights: str | os.PathLike | None = None,
        norm: str = "batch",
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if arch not in ARCHS:
            raise ValueError(f"unknown ResNet arch {arch!r}; valid: {', '.join(ARCHS)}")
        if stage not in STAGES:
            raise ValueError(f"unknown ResNet stage {stage!r}; valid: {', '.join(STAGES)}")
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; valid: {', '.join(NORMS)}")
        import torchvision

        self.arch, self.stage, self.norm, self.normalize = arch, stage, norm, bool(normalize)
        self.weights = None if weights is None else os.fspath(weights)
        full = torchvision.models.get_model(arch, weights=None)
        self._stages = STAGES[: STAGES.index(stage) + 1]
        for name in ("conv1", "bn1", "relu", "maxpool", *self._stages):
            setattr(self, name, getattr(full, name))  # torchvision's names, so its state_dicts load
        del full
        if self.weights is not None:
            self.load_state_dict(_torchvision_state_dict(arch, self.weights, self.state_dict().keys()))
        if norm == "group":
            if self.weights is not None:
                logger.info("ResNetFeatures: norm='group' replaces the loaded BatchNorm layers by fresh GroupNorm")
            _batch_to_group_norm(self)
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def channels(self) -> int:
        """C, the channels of the chosen stage's output."""
        return _BASIC_CHANNELS[self.stage] * (4 if self.arch == "resnet50" else 1)

    @property
    def reduction(self) -> int:
        """The stride r of the chosen stage: features are ``[H / r, W / r]`` (4, 8, 16 or 32)."""
        return _REDUCTION[self.stage]

    def extra_repr(self) -> str:
        return f"arch={self.arch!r}, stage={self.stage!r}, weights={self.weights!r}, norm={self.norm!r}"

    def forward(self, images: torch.Tensor) -> ImageFeatures:
        """images ``[B, 3, H, W]`` (in [0, 1] when ``normalize``) -> ImageFeatures(map, tokens)."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            got = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"ResNetFeatures expects images [B, 3, H, W]; got {got}")
        x = images.to(self.conv1.weight.dtype)
        if self.normalize:
            x = (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))  # [B, 64, H/4, W/4]
        for name in self._stages:
            x = getattr(self, name)(x)  # [B, C, h, w]
        tokens = x.flatten(2).transpose(1, 2)  # [B, h*w, C]
        return ImageFeatures(map=x, tokens=tokens)


def _torchvision_state_dict(arch: str, weights: str, keep: object) -> dict[str, torch.Tensor]:
    """The state_dict named by ``weights`` (torchvision name or local file), restricted to the ``keep`` keys."""
    keep = set(keep)  # type: ignore[arg-type]
    path = Path(weights).expanduser()
    if path.is_file():
        state = _load_file(path)
    elif path.suffix in _STATE_DICT_SUFFIXES or os.sep in weights:
        raise FileNotFoundError(f"weights file {weights!r} not found")
    else:
        state = _download(arch, weights)
    extra = sorted(k for k in state if k not in keep)
    unexpected = [k for k in extra if k.split(".")[0] not in ("fc", *STAGES)]
    if unexpected:
        raise ValueError(f"{weights!r} is not a torchvision {arch} state_dict: unexpected keys {unexpected[:5]}")
    return {k: v for k, v in state.items() if k in keep}


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or a torch file (weights_only); a ``state_dict`` key around it unwrapped."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{str(path)!r} does not hold a state_dict; got {type(state).__name__}")
    return state


def _download(arch: str, name: str) -> dict[str, torch.Tensor]:
    """A torchvision weights enum member's state_dict through torchvision's own API and cache."""
    import torchvision

    enum = torchvision.models.get_model_weights(arch)
    if name not in enum.__members__:
        valid = ", ".join([*enum.__members__, "or a local .safetensors/.pt/.pth file"])
        raise ValueError(f"unknown torchvision weights {name!r} for {arch}; valid: {valid}")
    try:
        return enum[name].get_state_dict(progress=False)
    except Exception as e:
        raise RuntimeError(
            f"could not get torchvision weights {arch} {name!r} ({e}). Without network, fetch them once where "
            "there is network (torchvision caches them under $TORCH_HOME), or pass a local state_dict file"
        ) from e


def _batch_to_group_norm(module: nn.Module) -> None:
    """Replace every BatchNorm2d under ``module`` by a fresh GroupNorm(C // 16, C), as Diffusion Policy does."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            c = child.num_features
            setattr(module, name, nn.GroupNorm(num_groups=c // 16, num_channels=c))
        else:
            _batch_to_group_norm(child)
