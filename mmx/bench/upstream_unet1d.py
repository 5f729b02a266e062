"""An independent, plain-PyTorch rebuild of Diffusion Policy's ``ConditionalUnet1D`` (Chi et al., 2023).

Written from the published architecture (layout, parameter names, forward order), not from mmx:
nothing here imports the rest of mmx, so it can check ``mmx.models.UNet1D``
(tests/models/test_unet1d.py) and be timed against it (:mod:`mmx.bench.unet1d`,
``mmx bench unet1d``, scripts/bench_unet1d.py). No einops; no ``local_cond``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["UpstreamUnet1D"]


class _StepEmbedding(nn.Module):
    """Sinusoids computed the upstream way: frequency i is ``exp(-i * ln(10000) / (half - 1))``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.dim // 2
        step = math.log(10000) / (half - 1)
        freqs = torch.exp(torch.arange(half, device=t.device) * -step)
        angles = t[:, None] * freqs[None, :]
        return torch.cat((angles.sin(), angles.cos()), dim=-1)


class _ConvNormMish(nn.Module):
    def __init__(self, c_in: int, c_out: int, kernel: int, groups: int = 8) -> None:
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv1d(c_in, c_out, kernel, padding=kernel // 2), nn.GroupNorm(groups, c_out), nn.Mish()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class _FiLMResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, cond_dim: int, kernel: int, groups: int, predict_scale: bool) -> None:
        super().__init__()
        self.c_out, self.predict_scale = c_out, predict_scale
        self.blocks = nn.ModuleList(
            [_ConvNormMish(c_in, c_out, kernel, groups), _ConvNormMish(c_out, c_out, kernel, groups)]
        )
        self.cond_encoder = nn.Sequential(nn.Mish(), nn.Linear(cond_dim, c_out * 2 if predict_scale else c_out))
        self.residual_conv = nn.Conv1d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.blocks[0](x)
        film = self.cond_encoder(cond).unsqueeze(-1)  # (B, k*C, 1)
        if self.predict_scale:
            film = film.reshape(film.shape[0], 2, self.c_out, 1)
            h = film[:, 0] * h + film[:, 1]
        else:
            h = h + film
        return self.blocks[1](h) + self.residual_conv(x)


class _Resample(nn.Module):
    def __init__(self, channels: int, up: bool) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(channels, channels, 4, 2, 1) if up else nn.Conv1d(channels, channels, 3, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UpstreamUnet1D(nn.Module):
    """``[B, T, input_dim]`` -> ``[B, T, input_dim]``, same constructor arguments as upstream (no local_cond)."""

    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int | None = None,
        diffusion_step_embed_dim: int = 256,
        down_dims=(256, 512, 1024),
        kernel_size: int = 3,
        n_groups: int = 8,
        cond_predict_scale: bool = False,
    ) -> None:
        super().__init__()
        e = diffusion_step_embed_dim
        cond_dim = e + (global_cond_dim or 0)
        dims = [input_dim, *down_dims]
        pairs = list(zip(dims[:-1], dims[1:]))

        def res(a: int, b: int) -> _FiLMResidual:
            return _FiLMResidual(a, b, cond_dim, kernel_size, n_groups, cond_predict_scale)

        # Registration order as published: middle, step encoder, up, down, head.
        self.mid_modules = nn.ModuleList([res(dims[-1], dims[-1]), res(dims[-1], dims[-1])])
        self.diffusion_step_encoder = nn.Sequential(
            _StepEmbedding(e), nn.Linear(e, 4 * e), nn.Mish(), nn.Linear(4 * e, e)
        )
        self.up_modules = nn.ModuleList()
        for a, b in pairs[1:][::-1]:
            self.up_modules.append(nn.ModuleList([res(2 * b, a), res(a, a), _Resample(a, up=True)]))
        self.down_modules = nn.ModuleList()
        for i, (a, b) in enumerate(pairs):
            last = i == len(pairs) - 1
            self.down_modules.append(
                nn.ModuleList([res(a, b), res(b, b), nn.Identity() if last else _Resample(b, up=False)])
            )
        self.final_conv = nn.Sequential(_ConvNormMish(dims[1], dims[1], kernel_size), nn.Conv1d(dims[1], input_dim, 1))

    def forward(self, sample: torch.Tensor, timestep, global_cond: torch.Tensor | None = None) -> torch.Tensor:
        x = sample.permute(0, 2, 1)  # (B, C, T)
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.long, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        cond = self.diffusion_step_encoder(timestep.expand(sample.shape[0]))
        if global_cond is not None:
            cond = torch.cat([cond, global_cond], dim=-1)
        saved = []
        for r1, r2, down in self.down_modules:
            x = r2(r1(x, cond), cond)
            saved.append(x)
            x = down(x)
        for r in self.mid_modules:
            x = r(x, cond)
        for r1, r2, up in self.up_modules:
            x = up(r2(r1(torch.cat((x, saved.pop()), dim=1), cond), cond))
        return self.final_conv(x).permute(0, 2, 1)
