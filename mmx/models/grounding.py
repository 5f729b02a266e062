"""GroundingNet: ResNet feature positions ask (queries), phrase tokens answer (keys/values).

A torchvision ResNet cut after an early stage gives a feature map; SpatialTransformers let every
position read the phrase ("the red circle") through cross-attention; a 1x1 head predicts, per
position, whether it belongs to the region the phrase names. The cross-attention maps of those
blocks are text-to-region maps on the input image itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mmx.context import Context, unpack_context
from mmx.encoders.resnet import ResNetFeatures
from mmx.nn import SpatialTransformer

__all__ = ["GroundingNet"]


class GroundingNet(ModelMixin, ConfigMixin):
    """Phrase grounding: ``images [B, 3, H, W]`` + phrase Context -> region logits ``[B, 1, H, W]``.

    Args:
        arch, stage, norm: the torchvision ResNet trunk (see :class:`mmx.encoders.ResNetFeatures`).
        context_dim: width D of the phrase tokens.
        heads, dim_head: cross-attention heads and width per head.
        depth: SpatialTransformers stacked on the feature map.
        input_size: images are resized to this square size before the trunk (None: as given),
            so small images still get a usable feature grid.
        self_attention: let positions also attend to each other in every block.
    """

    # blocks kept whole when sharded (Accelerate's FSDP TRANSFORMER_BASED_WRAP, diffusers' device_map)
    _no_split_modules = ["SpatialTransformer"]

    @register_to_config
    def __init__(
        self,
        arch: str = "resnet18",
        stage: str = "layer1",
        norm: str = "group",
        context_dim: int = 384,
        heads: int = 4,
        dim_head: int = 32,
        depth: int = 2,
        input_size: int | None = 64,
        self_attention: bool = True,
    ) -> None:
        super().__init__()
        self.trunk = ResNetFeatures(arch, stage, weights=None, norm=norm, normalize=False)
        channels = self.trunk.channels
        self.blocks = nn.ModuleList(
            SpatialTransformer(
                channels, context_dim=context_dim, heads=heads, dim_head=dim_head, self_attention=self_attention
            )
            for _ in range(depth)
        )
        self.head = nn.Sequential(nn.GroupNorm(min(32, channels), channels), nn.SiLU(), nn.Conv2d(channels, 1, 1))

    def load_trunk(self, weights: str) -> None:
        """Load torchvision ResNet weights (a weights name or a local state_dict file) into the trunk."""
        pretrained = ResNetFeatures(self.config.arch, self.config.stage, weights=weights, norm="batch", normalize=False)
        if self.config.norm != "batch":
            raise ValueError(
                "pretrained trunk weights need norm='batch' (GroupNorm layers have no ImageNet statistics)"
            )
        self.trunk.load_state_dict(pretrained.state_dict())

    def forward(
        self, images: torch.Tensor, context: Context | torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Region logits ``[B, 1, H, W]`` for ``images`` in [-1, 1] and the phrase ``context``."""
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"GroundingNet expects images [B, 3, H, W]; got {tuple(images.shape)}")
        tokens, mask = unpack_context(context, mask)
        size = images.shape[-2:]
        x = images
        if self.config.input_size is not None and tuple(size) != (self.config.input_size,) * 2:
            x = F.interpolate(x, size=(self.config.input_size,) * 2, mode="bilinear", align_corners=False)
        h = self.trunk(x).map  # (B, C, h, w)
        for block in self.blocks:
            h = block(h, tokens, mask)
        logits = self.head(h)  # (B, 1, h, w)
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
