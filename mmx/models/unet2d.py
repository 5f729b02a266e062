"""Text-conditioned 2D UNet: ResBlocks with a timestep embedding, SpatialTransformers that read a Context.

Layout as in latent diffusion (Rombach et al., 2022) and DDPM (Ho et al., 2020): per level,
``layers_per_block`` residual blocks each optionally followed by a SpatialTransformer (queries =
the feature map, keys/values = text tokens), a strided-conv downsample; a middle block; the mirror
path up with skip connections. The model predicts noise (or v, or x0): it knows nothing of the
noise schedule. Saves and loads with its full config through diffusers' ``ModelMixin`` /
``ConfigMixin`` (``save_pretrained`` writes safetensors + config.json).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mmx.context import Context, unpack_context
from mmx.nn import ResBlock2D, SpatialTransformer, group_norm, timestep_embedding
from mmx.nn.transformer import POSITION_INTO

__all__ = ["UNet2D", "UNetAttention", "DiffusersUNet2D"]

PADDING_MODES = ("zeros", "circular")


@dataclass
class UNetAttention:
    """How a UNet2D's SpatialTransformers read the text: ``UNet2D(attention={...})`` with these keys.

    Args:
        heads, dim_head: attention heads and width per head.
        depth: TransformerBlocks per SpatialTransformer.
        ff_mult: hidden width of each block's GEGLU feed-forward, as a multiple of ``heads * dim_head``.
        self_attention_levels: per level, whether its transformers also self-attend (None: none do).
        position_frequencies: if > 0, every SpatialTransformer adds a learned embedding of each
            position's place in the map (Fourier features with this many frequencies per axis), so
            cross-attention queries know where they are. 0: none (convolutions alone carry position,
            through the borders).
        position_into: ``"tokens"`` or ``"queries"``: where that embedding goes (see
            :class:`~mmx.nn.SpatialTransformer`); ``"queries"`` keeps it out of the feature map.
    """

    heads: int = 4
    dim_head: int = 32
    depth: int = 1
    ff_mult: int = 4
    self_attention_levels: tuple[bool, ...] | None = None
    position_frequencies: int = 0
    position_into: str = "tokens"

    @classmethod
    def from_spec(cls, spec: dict | UNetAttention | None) -> UNetAttention:
        """From a mapping (an unknown key is an error listing the valid ones), an instance, or None (defaults)."""
        from mmx.config import from_dict

        if isinstance(spec, cls):
            return spec
        return from_dict(cls, dict(spec or {}), prefix="attention.")


class _Level(nn.Module):
    """``n`` ResBlocks, each optionally followed by a SpatialTransformer."""

    def __init__(
        self,
        channels_in: list[int],
        channels_out: int,
        emb_dim: int,
        attention: bool,
        attn_kwargs: dict,
        dropout: float,
        norm_groups: int | None,
    ) -> None:
        super().__init__()
        self.resnets = nn.ModuleList(
            ResBlock2D(c_in, channels_out, emb_dim, dropout=dropout, norm_groups=norm_groups) for c_in in channels_in
        )
        self.attentions = (
            nn.ModuleList(SpatialTransformer(channels_out, norm_groups=norm_groups, **attn_kwargs) for _ in channels_in)
            if attention
            else None
        )


class UNet2D(ModelMixin, ConfigMixin):
    """Conditional UNet for images ``[B, C, H, W]`` reading text tokens through cross-attention.

    Args:
        in_channels, out_channels: image channels in and predicted channels out.
        channels: width of each level, e.g. ``(64, 128, 128)``; H and W must divide by ``2**(levels-1)``.
        layers_per_block: residual blocks per level on the way down (one more on the way up).
        attention_levels: per level, whether its blocks carry a SpatialTransformer (cross-attention).
        context_dim: width D of the text tokens.
        pooled_dim: width of a pooled text vector added to the time embedding (None: not used).
        split_context: each context token is ``[key states ; value states]`` (``context_dim`` is
            their sum; ``HFTextEncoder(value_layer=...)`` gives such tokens): every cross-attention
            takes its keys from the first half and its values from the second.
        attention: the SpatialTransformers' settings, a mapping of :class:`UNetAttention`'s fields
            (heads, dim_head, depth, ff_mult, self_attention_levels, position_frequencies,
            position_into); None: its defaults.
        norm_groups: GroupNorm groups (None: largest divisor of the channels up to 32).
        dropout: dropout in residual blocks and attention.
        mid_attention: put a SpatialTransformer in the middle block.
        patch_size: fold ``p x p`` pixel patches into channels before the first conv and unfold
            after the last (pixel-unshuffle / shuffle): p*p times fewer positions at every level.
        padding_mode: padding of every 3x3 convolution: ``"zeros"`` (default) or ``"circular"``.
            Zero padding lets the convolutions tell where they are from the borders; circular
            padding makes them blind to place (a shift of the input by the network's total stride,
            ``patch_size * 2**(levels-1)`` pixels, shifts the output alike), so what is drawn
            where depends on the words read and not on where training happened to draw it. With
            ``attention.position_frequencies > 0`` and ``position_into: queries``, the
            cross-attention's queries are the only place the network knows positions ("top", "left") from.

    Gradient checkpointing (``model.enable_gradient_checkpointing()``, diffusers' ModelMixin): while
    gradients are recorded, each residual block and SpatialTransformer keeps only its inputs and is
    run again in the backward pass: less activation memory for about one more forward of compute;
    outputs and gradients are unchanged. Hooks on the attention layers (``CrossAttention.add_hook``)
    may fire again during that second run.
    """

    # blocks kept whole when sharded (Accelerate's FSDP TRANSFORMER_BASED_WRAP, diffusers' device_map)
    _no_split_modules = ["ResBlock2D", "SpatialTransformer"]
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        channels: tuple[int, ...] = (64, 128, 128),
        layers_per_block: int = 2,
        attention_levels: tuple[bool, ...] = (False, True, True),
        context_dim: int = 384,
        pooled_dim: int | None = None,
        split_context: bool = False,
        attention: dict | None = None,
        norm_groups: int | None = None,
        dropout: float = 0.0,
        mid_attention: bool = True,
        patch_size: int = 1,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size must be >= 1; got {patch_size}")
        if padding_mode not in PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {', '.join(PADDING_MODES)}; got {padding_mode!r}")
        attn = UNetAttention.from_spec(attention)
        if attn.position_into not in POSITION_INTO:
            raise ValueError(
                f"attention.position_into must be one of {', '.join(POSITION_INTO)}; got {attn.position_into!r}"
            )
        levels = len(channels)
        self_attention_levels = attn.self_attention_levels or (False,) * levels
        if len(attention_levels) != levels or len(self_attention_levels) != levels:
            raise ValueError(
                f"attention_levels {tuple(attention_levels)} and self_attention_levels {tuple(self_attention_levels)} "
                f"need one entry per level of channels {tuple(channels)}"
            )
        self.levels = levels
        self.gradient_checkpointing = False  # set by enable_gradient_checkpointing()
        emb_dim = channels[0] * 4
        self.time_embedding = nn.Sequential(nn.Linear(channels[0], emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.pooled_proj = nn.Linear(pooled_dim, emb_dim) if pooled_dim else None

        def attn_kwargs(level: int) -> dict:
            return dict(
                context_dim=context_dim,
                heads=attn.heads,
                dim_head=attn.dim_head,
                depth=attn.depth,
                dropout=dropout,
                self_attention=bool(self_attention_levels[level]),
                position_frequencies=attn.position_frequencies,
                split_context=split_context,
                ff_mult=attn.ff_mult,
                position_into=attn.position_into,
            )

        self.patch_size = patch_size
        self.conv_in = nn.Conv2d(in_channels * patch_size**2, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skips = [channels[0]]
        c = channels[0]
        for i, width in enumerate(channels):
            ins = [c] + [width] * (layers_per_block - 1)
            self.down.append(_Level(ins, width, emb_dim, attention_levels[i], attn_kwargs(i), dropout, norm_groups))
            c = width
            skips += [width] * layers_per_block
            if i < levels - 1:
                self.downsamplers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
                skips.append(c)
        self.mid_res1 = ResBlock2D(c, c, emb_dim, dropout=dropout, norm_groups=norm_groups)
        self.mid_attn = (
            SpatialTransformer(c, norm_groups=norm_groups, **attn_kwargs(levels - 1)) if mid_attention else None
        )
        self.mid_res2 = ResBlock2D(c, c, emb_dim, dropout=dropout, norm_groups=norm_groups)
        self.up = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for i, width in reversed(list(enumerate(channels))):
            ins = []
            for _ in range(layers_per_block + 1):
                ins.append(c + skips.pop())
                c = width
            self.up.append(_Level(ins, width, emb_dim, attention_levels[i], attn_kwargs(i), dropout, norm_groups))
            if i > 0:
                self.upsamplers.append(nn.Conv2d(c, c, 3, padding=1))
        self.norm_out = group_norm(c, norm_groups)
        self.conv_out = nn.Conv2d(c, out_channels * patch_size**2, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)
        if padding_mode != "zeros":
            for conv in self.modules():
                if isinstance(conv, nn.Conv2d) and any(conv.padding):
                    conv.padding_mode = padding_mode

    def _check(self, x: torch.Tensor) -> None:
        cfg = self.config
        factor = 2 ** (self.levels - 1) * self.patch_size
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"UNet2D expects x [B, C={cfg.in_channels}, H, W]; got {tuple(x.shape)}")
        if x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(
                f"UNet2D with {self.levels} levels and patch_size {self.patch_size} needs H and W divisible by "
                f"{factor}; got H={x.shape[2]}, W={x.shape[3]}"
            )

    def _block(self, block: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        """``block(*args)``, through activation checkpointing when it is enabled and gradients are recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: Context | torch.Tensor,
        mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ``[B, out_channels, H, W]`` from noisy ``x [B, C, H, W]`` at timesteps ``t [B]``.

        ``context`` is a :class:`Context` (its mask and pooled vector are used) or tokens
        ``[B, S, context_dim]`` with ``mask [B, S]``; padding tokens never receive attention.
        """
        self._check(x)
        if isinstance(context, Context) and pooled is None:
            pooled = context.pooled
        tokens, mask = unpack_context(context, mask)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        emb = self.time_embedding(timestep_embedding(t, self.config.channels[0]).to(x.dtype))  # (B, E)
        if self.pooled_proj is not None:
            if pooled is None:
                raise ValueError(
                    f"this UNet2D adds a pooled text vector (pooled_dim={self.config.pooled_dim}); got none"
                )
            emb = emb + self.pooled_proj(pooled.to(emb.dtype))

        if self.patch_size > 1:
            x = F.pixel_unshuffle(x, self.patch_size)  # (B, C*p*p, H/p, W/p)
        h = self.conv_in(x)
        skips = [h]
        for i, level in enumerate(self.down):
            for j, res in enumerate(level.resnets):
                h = self._block(res, h, emb)
                if level.attentions is not None:
                    h = self._block(level.attentions[j], h, tokens, mask)
                skips.append(h)
            if i < self.levels - 1:
                h = self.downsamplers[i](h)
                skips.append(h)
        h = self._block(self.mid_res1, h, emb)
        if self.mid_attn is not None:
            h = self._block(self.mid_attn, h, tokens, mask)
        h = self._block(self.mid_res2, h, emb)
        for i, level in enumerate(self.up):
            for j, res in enumerate(level.resnets):
                h = self._block(res, torch.cat([h, skips.pop()], dim=1), emb)
                if level.attentions is not None:
                    h = self._block(level.attentions[j], h, tokens, mask)
            if i < self.levels - 1:
                h = self.upsamplers[i](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.conv_out(F.silu(self.norm_out(h)))
        return F.pixel_shuffle(out, self.patch_size) if self.patch_size > 1 else out


class DiffusersUNet2D(nn.Module):
    """diffusers' ``UNet2DConditionModel`` behind the same ``forward(x, t, context, mask)`` as UNet2D.

    The Context mask goes in as ``encoder_attention_mask``. Built from the same arguments as
    :class:`UNet2D` (cross-attention on the levels in ``attention_levels``; of ``attention``, the
    heads).
    """

    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        channels: tuple[int, ...] = (64, 128, 128),
        layers_per_block: int = 2,
        attention_levels: tuple[bool, ...] = (False, True, True),
        context_dim: int = 384,
        attention: dict | None = None,
        norm_groups: int = 32,
        sample_size: int = 32,
    ) -> None:
        super().__init__()
        from diffusers import UNet2DConditionModel

        attn = UNetAttention.from_spec(attention)
        unused = {
            k: v for k, v in asdict(attn).items() if k not in ("heads", "dim_head") and v != getattr(UNetAttention, k)
        }
        if unused:
            raise ValueError(f"diffusers' UNet2DConditionModel takes attention.heads (and dim_head) only; got {unused}")
        heads, dim_head = attn.heads, attn.dim_head

        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
        self.unet = UNet2DConditionModel(
            sample_size=sample_size,
            in_channels=in_channels,
            out_channels=out_channels,
            block_out_channels=tuple(channels),
            layers_per_block=layers_per_block,
            down_block_types=down,
            up_block_types=up,
            cross_attention_dim=context_dim,
            # diffusers' UNet2DConditionModel reads `attention_head_dim` as the number of heads, and
            # its per-head width is then channels // heads; `dim_head` only documents the intent.
            attention_head_dim=heads,
            norm_num_groups=norm_groups,
        )
        self.heads, self.dim_head = heads, dim_head

    @property
    def _no_split_modules(self) -> list[str]:
        """diffusers' blocks, kept whole when Accelerate's FSDP shards the wrapper (TRANSFORMER_BASED_WRAP)."""
        return list(self.unet._no_split_modules or [])

    def save_pretrained(self, path: str) -> None:
        """Write the wrapped diffusers model (safetensors + config.json)."""
        self.unet.save_pretrained(path)

    @classmethod
    def from_pretrained(cls, path: str) -> DiffusersUNet2D:
        """Load a folder written by :meth:`save_pretrained`."""
        from diffusers import UNet2DConditionModel

        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper.unet = UNet2DConditionModel.from_pretrained(path)
        wrapper.heads = wrapper.dim_head = None
        return wrapper

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        context: Context | torch.Tensor,
        mask: torch.Tensor | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Same contract as :meth:`UNet2D.forward`."""
        tokens, mask = unpack_context(context, mask)
        return self.unet(x, t, encoder_hidden_states=tokens, encoder_attention_mask=mask).sample
