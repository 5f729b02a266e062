"""Conditioning by modulation: timestep embeddings, FiLM and residual blocks that use them.

``ResBlock1D`` keeps the parameter names of Diffusion Policy's ``ConditionalResidualBlock1D``
(Chi et al., 2023) so its checkpoints load as they are; ``ResBlock2D`` follows the DDPM /
latent-diffusion residual block (Ho et al., 2020).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mmx.context import Context
from mmx.nn.transformer import TemporalTransformer, group_norm

__all__ = ["timestep_embedding", "SinusoidalEmbedding", "FiLM", "ResBlock2D", "Conv1dBlock", "ResBlock1D"]


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = False, freq_shift: float = 1.0
) -> torch.Tensor:
    """Sinusoidal embedding ``[B, dim]`` of (possibly fractional) timesteps ``t [B]`` (Vaswani et al., 2017).

    Frequencies are ``max_period ** (-i / (dim/2 - freq_shift))``; ``freq_shift=1`` matches Diffusion
    Policy's ``SinusoidalPosEmb`` and diffusers' ``get_timestep_embedding`` defaults, ``[sin, cos]``
    order unless ``flip_sin_to_cos``. An odd ``dim`` is zero-padded.
    """
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1:
        raise ValueError(f"timesteps must be a scalar or [B]; got shape {tuple(t.shape)}")
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))  # (dim/2,)
    args = t.float()[:, None] * freqs[None, :]  # (B, dim/2)
    emb = torch.cat([args.sin(), args.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    if dim % 2:
        emb = nn.functional.pad(emb, (0, 1))
    return emb


class SinusoidalEmbedding(nn.Module):
    """Module form of :func:`timestep_embedding` (no parameters): ``[B] -> [B, dim]``."""

    def __init__(self, dim: int, max_period: float = 10000.0, flip_sin_to_cos: bool = False, freq_shift: float = 1.0):
        super().__init__()
        self.dim, self.max_period, self.flip_sin_to_cos, self.freq_shift = dim, max_period, flip_sin_to_cos, freq_shift

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return timestep_embedding(t, self.dim, self.max_period, self.flip_sin_to_cos, self.freq_shift)


class FiLM(nn.Sequential):
    """Feature-wise linear modulation ``x * (scale_offset + scale) + shift`` (Perez et al., 2018).

    ``cond`` is one vector per sample ``[B, cond_dim]`` (applied to every position of
    ``x [B, C, ...]``) or one vector per time step ``[B, T, cond_dim]`` (applied step by step to
    ``x [B, C, T]``). The generator is ``Mish -> Linear``; its output holds the scales first, then
    the shifts, as in Diffusion Policy (whose ``cond_encoder.1`` weights load into ``1.*`` here).

    Args:
        cond_dim: width of the conditioning vector.
        channels: C of the modulated tensor.
        predict_scale: predict scale and shift (True) or only a shift (False, i.e. add ``shift``).
        scale_offset: added to the predicted scale; 1.0 makes a zero-initialised FiLM the identity.
        activation: apply Mish to ``cond`` before the linear layer.
    """

    def __init__(
        self,
        cond_dim: int,
        channels: int,
        predict_scale: bool = True,
        scale_offset: float = 0.0,
        activation: bool = True,
    ) -> None:
        super().__init__(
            nn.Mish() if activation else nn.Identity(), nn.Linear(cond_dim, channels * (2 if predict_scale else 1))
        )
        self.cond_dim = cond_dim
        self.channels = channels
        self.predict_scale = predict_scale
        self.scale_offset = scale_offset

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        """Modulate ``x [B, C, *spatial]`` by ``cond [B, cond_dim]`` or ``[B, T, cond_dim]``."""
        if cond.ndim not in (2, 3) or cond.shape[-1] != self.cond_dim or cond.shape[0] != x.shape[0]:
            raise ValueError(
                f"FiLM cond must be [B={x.shape[0]}, cond_dim={self.cond_dim}] or [B, T, cond_dim]; "
                f"got {tuple(cond.shape)}"
            )
        if x.ndim < 2 or x.shape[1] != self.channels:
            raise ValueError(f"FiLM expects x [B, C={self.channels}, ...]; got {tuple(x.shape)}")
        params = super().forward(cond)  # (B, k*C) or (B, T, k*C)
        if cond.ndim == 3:
            if x.ndim != 3 or x.shape[2] != cond.shape[1]:
                raise ValueError(
                    f"per-step FiLM needs x [B, C, T] with T = cond's {cond.shape[1]} steps; got x {tuple(x.shape)}"
                )
            params = params.transpose(1, 2)  # (B, k*C, T)
        else:
            params = params.view(*params.shape, *([1] * (x.ndim - 2)))  # (B, k*C, 1, ...)
        if not self.predict_scale:
            return x + params
        scale, shift = params.chunk(2, dim=1)
        if self.scale_offset:
            scale = scale + self.scale_offset
        return torch.addcmul(shift, x, scale)  # shift + x * scale in one pass


class ResBlock2D(nn.Module):
    """Residual block ``GN-SiLU-Conv -> (+emb) -> GN-SiLU-Dropout-Conv`` plus a skip connection.

    The embedding (timestep, optionally plus pooled text) enters through :class:`FiLM`: as an added
    shift (``film="shift"``, DDPM) or as scale-and-shift of the second norm (``"scale_shift"``).
    The last conv is zero-initialised, so the block starts as its skip path.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int | None = None,
        emb_dim: int | None = None,
        dropout: float = 0.0,
        film: str = "shift",
        norm_groups: int | None = None,
    ) -> None:
        super().__init__()
        if film not in ("shift", "scale_shift"):
            raise ValueError(f"film must be 'shift' or 'scale_shift'; got {film!r}")
        out_channels = out_channels or in_channels
        self.in_channels, self.out_channels, self.film_mode = in_channels, out_channels, film
        self.norm1 = group_norm(in_channels, norm_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb = (
            FiLM(emb_dim, out_channels, predict_scale=film == "scale_shift", scale_offset=1.0, activation=True)
            if emb_dim
            else None
        )
        self.norm2 = group_norm(out_channels, norm_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        """``x [B, C_in, H, W]``, ``emb [B, emb_dim]`` -> ``[B, C_out, H, W]``."""
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResBlock2D expects x [B, C={self.in_channels}, H, W]; got {tuple(x.shape)}")
        if (emb is None) != (self.emb is None):
            raise ValueError("ResBlock2D: pass emb exactly when the block was built with emb_dim")
        h = self.conv1(nn.functional.silu(self.norm1(x)))
        if self.emb is not None and self.film_mode == "shift":
            h = self.emb(h, emb)
            h = self.norm2(h)
        else:
            h = self.norm2(h)
            if self.emb is not None:
                h = self.emb(h, emb)
        h = self.conv2(self.dropout(nn.functional.silu(h)))
        return self.skip(x) + h


class Conv1dBlock(nn.Module):
    """``Conv1d -> GroupNorm -> Mish`` (Diffusion Policy's ``Conv1dBlock``; parameters under ``block``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, n_groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
            group_norm(out_channels, n_groups, eps=1e-5),
            nn.Mish(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class ResBlock1D(nn.Module):
    """Conditional residual block for ``[B, C, T]`` sequences, Diffusion Policy layout (Chi et al., 2023).

    ``blocks.0 -> FiLM(cond) -> blocks.1`` plus a 1x1 ``residual_conv`` when channels change.
    ``cond`` is a global vector ``[B, cond_dim]`` or one per step ``[B, T, cond_dim]``.
    ``cond_predict_scale=True`` predicts scale and shift, False only a shift (as upstream).

    With ``context_dim`` the block also owns ``cross_attn``, a :class:`TemporalTransformer`
    (cross-attention only, no self-attention) applied after the residual sum: each of the T steps
    reads the context tokens. Its output projection is zero-initialised, so a fresh ``cross_attn``
    is the identity and Diffusion Policy weights (which have no ``cross_attn.*`` keys) give the
    same outputs as the block without it. The upstream keys are unchanged either way.

    Args:
        in_channels, out_channels: C of the input and of the output.
        cond_dim: width of the FiLM condition.
        kernel_size: temporal kernel of both convolutions.
        n_groups: GroupNorm groups (of the convolutions and of the transformer).
        cond_predict_scale: FiLM predicts scale and shift (True) or a shift only (False).
        context_dim: width D of the context tokens; None builds no cross-attention.
        heads, dim_head: attention heads and width per head of ``cross_attn``.
        attn_ff_mult: feed-forward expansion of ``cross_attn``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        cond_dim: int,
        kernel_size: int = 3,
        n_groups: int = 8,
        cond_predict_scale: bool = False,
        context_dim: int | None = None,
        heads: int = 4,
        dim_head: int = 32,
        attn_ff_mult: int = 2,
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.blocks = nn.ModuleList(
            [
                Conv1dBlock(in_channels, out_channels, kernel_size, n_groups),
                Conv1dBlock(out_channels, out_channels, kernel_size, n_groups),
            ]
        )
        self.cond_encoder = FiLM(cond_dim, out_channels, predict_scale=cond_predict_scale, scale_offset=0.0)
        self.residual_conv = nn.Conv1d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()
        self.context_dim = context_dim
        self.cross_attn = (
            TemporalTransformer(
                out_channels,
                context_dim,
                heads,
                dim_head,
                self_attention=False,
                ff_mult=attn_ff_mult,
                norm_groups=n_groups,
            )
            if context_dim is not None
            else None
        )

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        context: torch.Tensor | Context | None = None,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x [B, C_in, T]``, ``cond [B, cond_dim]`` or ``[B, T, cond_dim]`` -> ``[B, C_out, T]``.

        ``context`` (a :class:`Context`, or tokens ``[B, S, context_dim]`` with ``mask [B, S]``,
        True = real) is read by ``cross_attn``; it is required exactly when the block has one.
        """
        if x.ndim != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"ResBlock1D expects x [B, C={self.in_channels}, T]; got {tuple(x.shape)}")
        out = self.cond_encoder(self.blocks[0](x), cond)
        out = self.blocks[1](out)
        out += self.residual_conv(x)  # in place: Mish keeps its input for backward, not this output
        if self.cross_attn is not None:
            if context is None:
                raise ValueError(
                    f"this ResBlock1D cross-attends to a context of width {self.context_dim}; got context=None"
                )
            out = self.cross_attn(out, context, mask)
        elif context is not None:
            raise ValueError("this ResBlock1D was built without cross-attention (context_dim=None) but got a context")
        return out
