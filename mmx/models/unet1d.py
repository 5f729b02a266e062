"""Conditional 1D UNet over action sequences, Diffusion Policy's ``ConditionalUnet1D`` (Chi et al., 2023).

Layout and parameter names are those of the published model, so its checkpoints load with
``strict=True``: per level two FiLM residual blocks (:class:`~mmx.nn.ResBlock1D`) and a strided-conv
downsample (none after the last level); two middle blocks; per level but the first, on the way up,
two blocks reading ``cat(h, skip)`` and a transposed-conv upsample; a final ``Conv1dBlock`` and 1x1
conv. Every block is modulated by ``cat(time embedding, global condition)``.

Optionally each residual block (down, middle, up) also cross-attends to a :class:`~mmx.Context`
(queries = the T steps, keys/values = observation or instruction tokens). Those layers are new
``cross_attn.*`` parameters whose output projection starts at zero, so Diffusion Policy weights
loaded with ``strict=False`` (missing only ``cross_attn.*``) give the FiLM-only outputs.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mmx.context import Context
from mmx.nn import Conv1dBlock, ResBlock1D, SinusoidalEmbedding

__all__ = ["UNet1D", "Downsample1D", "Upsample1D", "convert_diffusion_policy", "infer_diffusion_policy_config"]

logger = logging.getLogger(__name__)
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # torch colours parts of its weights_only message


class Downsample1D(nn.Module):
    """Halve T with a stride-2 ``Conv1d(k=3, padding=1)``: ``[B, C, T] -> [B, C, T/2]`` (key ``conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample1D(nn.Module):
    """Double T with a ``ConvTranspose1d(k=4, stride=2, padding=1)``: ``[B, C, T] -> [B, C, 2T]`` (key ``conv``)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose1d(channels, channels, 4, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class UNet1D(ModelMixin, ConfigMixin):
    """Diffusion Policy's conditional 1D UNet (Chi et al., 2023), optionally reading a Context.

    ``forward(x [B, T, input_dim], t, context, pooled)`` (time-major, as upstream) -> prediction ``[B, T, input_dim]``.
    The horizon T must divide by ``2 ** (len(down_dims) - 1)``; the model never pads or crops.

    Upstream facts kept on purpose: the skip of each level is taken after its second block, before
    the downsample, and the up path has one level fewer than the down path, so the first level's
    skip is never read; the upsample of every up level (the last included) restores the full
    horizon; the final ``Conv1dBlock`` uses 8 GroupNorm groups whatever ``n_groups`` is.
    Diffusion Policy's ``local_cond_dim`` (per-step conditioning) is not supported.

    Args:
        input_dim: width of each step of the sample (e.g. the action dimension).
        global_cond_dim: width of the global FiLM condition (e.g. flattened observation features);
            None: the blocks are modulated by the time embedding alone.
        diffusion_step_embed_dim: width of the timestep embedding (upstream ``dsed``).
        down_dims: channels of each level, e.g. ``(256, 512, 1024)``.
        kernel_size: temporal kernel of the convolutions.
        n_groups: GroupNorm groups of the residual blocks (and of their cross-attention).
        cond_predict_scale: FiLM predicts scale and shift (True) or a shift only (False).
        context_dim: width D of the context tokens each block cross-attends to; None: FiLM only.
        heads, dim_head: attention heads and width per head of the cross-attention.
        attn_ff_mult: feed-forward expansion inside the cross-attention layers.

    Gradient checkpointing (``model.enable_gradient_checkpointing()``, diffusers' ModelMixin): while
    gradients are recorded, each residual block (with its cross-attention) keeps only its inputs and
    is run again in the backward pass: less activation memory for about one more forward of compute;
    outputs and gradients are unchanged.
    """

    # blocks kept whole when sharded (Accelerate's FSDP TRANSFORMER_BASED_WRAP, diffusers' device_map)
    _no_split_modules = ["ResBlock1D", "TemporalTransformer"]
    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        input_dim: int,
        global_cond_dim: int | None = None,
        diffusion_step_embed_dim: int = 256,
        down_dims: tuple[int, ...] = (256, 512, 1024),
        kernel_size: int = 3,
        n_groups: int = 8,
        cond_predict_scale: bool = False,
        context_dim: int | None = None,
        heads: int = 4,
        dim_head: int = 32,
        attn_ff_mult: int = 2,
    ) -> None:
        super().__init__()
        down_dims = tuple(down_dims)
        if not down_dims or any(not isinstance(d, int) or d <= 0 or d % n_groups for d in down_dims):
            raise ValueError(f"down_dims must be positive multiples of n_groups={n_groups}; got {down_dims}")
        if down_dims[0] % 8:
            raise ValueError(
                f"down_dims[0] must divide by 8 (the final Conv1dBlock has 8 GroupNorm groups); got {down_dims[0]}"
            )
        if context_dim is not None and (context_dim <= 0 or heads <= 0 or dim_head <= 0 or attn_ff_mult <= 0):
            raise ValueError(
                f"cross-attention needs positive context_dim, heads, dim_head and attn_ff_mult; got "
                f"{context_dim}, {heads}, {dim_head}, {attn_ff_mult}"
            )
        dsed = diffusion_step_embed_dim
        cond_dim = dsed + (global_cond_dim or 0)
        self.levels = len(down_dims)
        self.gradient_checkpointing = False  # set by enable_gradient_checkpointing()
        dims = [input_dim, *down_dims]
        in_out = list(zip(dims[:-1], dims[1:]))  # per level (C_in, C_out)

        def block(c_in: int, c_out: int) -> ResBlock1D:
            return ResBlock1D(
                c_in,
                c_out,
                cond_dim,
                kernel_size,
                n_groups,
                cond_predict_scale,
                context_dim,
                heads,
                dim_head,
                attn_ff_mult,
            )

        # Attribute order fixes the state_dict order; it is the published one.
        mid = down_dims[-1]
        self.mid_modules = nn.ModuleList([block(mid, mid), block(mid, mid)])
        self.diffusion_step_encoder = nn.Sequential(
            SinusoidalEmbedding(dsed, freq_shift=1.0), nn.Linear(dsed, dsed * 4), nn.Mish(), nn.Linear(dsed * 4, dsed)
        )
        self.up_modules = nn.ModuleList(
            nn.ModuleList([block(c_out * 2, c_in), block(c_in, c_in), Upsample1D(c_in)])
            for c_in, c_out in reversed(in_out[1:])
        )
        self.down_modules = nn.ModuleList(
            nn.ModuleList(
                [block(c_in, c_out), block(c_out, c_out), Downsample1D(c_out) if i < self.levels - 1 else nn.Identity()]
            )
            for i, (c_in, c_out) in enumerate(in_out)
        )
        self.final_conv = nn.Sequential(
            Conv1dBlock(down_dims[0], down_dims[0], kernel_size, n_groups=8), nn.Conv1d(down_dims[0], input_dim, 1)
        )

    def _check_input(self, x: torch.Tensor) -> None:
        input_dim = self.config.input_dim
        if not isinstance(x, torch.Tensor) or x.ndim != 3:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"UNet1D expects x [B, T, input_dim={input_dim}]; got {got}")
        if x.shape[2] != input_dim:
            hint = (
                " (channels-first? UNet1D takes time-major [B, T, input_dim] like Diffusion Policy)"
                if x.shape[1] == input_dim
                else ""
            )
            raise ValueError(f"UNet1D expects x [B, T, input_dim={input_dim}]; got {tuple(x.shape)}{hint}")
        self.check_horizon(x.shape[1])

    def check_horizon(self, horizon: int) -> None:
        """Raise a ValueError naming the nearest valid horizons unless T divides by ``2 ** (levels - 1)``."""
        factor = 2 ** (self.levels - 1)
        t = int(horizon)
        if t <= 0 or t % factor:
            lower, upper = (t // factor) * factor, (max(t, 0) // factor + 1) * factor
            nearest = f"{lower} or {upper}" if lower > 0 else f"{upper}"
            raise ValueError(
                f"UNet1D with {self.levels} levels (down_dims {tuple(self.config.down_dims)}) halves the horizon "
                f"{self.levels - 1} times, so T must divide by {factor}; got T={t} (nearest valid horizons: {nearest})"
            )

    def _pooled(self, x: torch.Tensor, context: Context | None, pooled: torch.Tensor | None) -> torch.Tensor | None:
        """The global FiLM condition (Diffusion Policy's ``global_cond``): ``pooled``, else ``context.pooled``."""
        width = self.config.global_cond_dim
        if pooled is None and context is not None:
            pooled = context.pooled if width is not None else None
        if width is None:
            if pooled is not None:
                raise ValueError(
                    f"this UNet1D has no global condition (global_cond_dim=None); got pooled {tuple(pooled.shape)}"
                )
            return None
        if pooled is None:
            raise ValueError(
                f"this UNet1D is FiLM-conditioned on a global vector of width global_cond_dim={width}; "
                "pass pooled [B, global_cond_dim] or a context with pooled"
            )
        if pooled.ndim != 2 or pooled.shape[0] != x.shape[0] or pooled.shape[1] != width:
            raise ValueError(
                f"the global condition must be [B={x.shape[0]}, global_cond_dim={width}]; got {tuple(pooled.shape)}"
            )
        return pooled

    def _block(self, block: nn.Module, *args: torch.Tensor | None) -> torch.Tensor:
        """``block(*args)``, through activation checkpointing when it is enabled and gradients are recorded."""
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | int | float,
        context: Context | None = None,
        pooled: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Predict ``[B, T, input_dim]`` from a noisy ``x [B, T, input_dim]`` at timesteps ``t``.

        Args:
            x: noisy action sequence, time-major (Diffusion Policy's ``sample``).
            t: a number, a 0-d tensor or ``[B]`` (possibly fractional) diffusion steps.
            context: :class:`Context` whose ``tokens [B, S, context_dim]`` are read (with ``mask``,
                True = real) by the cross-attention, required exactly when ``context_dim`` is set;
                its ``pooled [B, global_cond_dim]`` is the global condition when ``pooled`` is None.
            pooled: ``[B, global_cond_dim]`` FiLM condition (Diffusion Policy's ``global_cond``),
                required (here or as ``context.pooled``) exactly when ``global_cond_dim`` is set.
        """
        self._check_input(x)
        b = x.shape[0]
        tokens = mask = None
        if context is not None and not isinstance(context, Context):
            raise TypeError(f"UNet1D takes context as an mmx Context; got {type(context).__name__}")
        if self.config.context_dim is not None:
            if context is None:
                raise ValueError(
                    f"this UNet1D cross-attends to context tokens of width {self.config.context_dim}; got context=None"
                )
            if context.dim != self.config.context_dim or context.batch_size != b:
                raise ValueError(
                    f"context tokens must be [B={b}, S, context_dim={self.config.context_dim}]; "
                    f"got {tuple(context.tokens.shape)}"
                )
            tokens, mask = context.tokens, context.mask
        pooled = self._pooled(x, context, pooled)

        if not isinstance(t, torch.Tensor):
            t = torch.tensor([t], device=x.device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, b)):
            raise ValueError(f"t must be a number, a 0-d tensor or [B={b}]; got shape {tuple(t.shape)}")
        t = t.to(x.device).reshape(-1).expand(b)  # (B,)
        cond = self.diffusion_step_encoder[0](t).to(x.dtype)  # (B, dsed)
        cond = self.diffusion_step_encoder[1:](cond)
        if pooled is not None:
            cond = torch.cat([cond, pooled.to(cond.dtype)], dim=-1)  # (B, dsed + global_cond_dim)

        h = x.transpose(1, 2)  # (B, input_dim, T)
        skips = []
        for res1, res2, downsample in self.down_modules:
            h = self._block(res1, h, cond, tokens, mask)
            h = self._block(res2, h, cond, tokens, mask)
            skips.append(h)  # taken before the downsample, as upstream
            h = downsample(h)
        for res in self.mid_modules:
            h = self._block(res, h, cond, tokens, mask)
        for res1, res2, upsample in self.up_modules:
            h = self._block(res1, torch.cat([h, skips.pop()], dim=1), cond, tokens, mask)  # (B, 2C, T')
            h = self._block(res2, h, cond, tokens, mask)
            h = upsample(h)
        h = self.final_conv(h)  # (B, input_dim, T)
        return h.transpose(1, 2)

    @classmethod
    def from_diffusion_policy(
        cls,
        source: str | os.PathLike | dict,
        prefix: str = "model.",
        which: str = "ema_model",
        trust_pickle: bool = False,
        **overrides: object,
    ) -> UNet1D:
        """Build a UNet1D from a Diffusion Policy checkpoint or state_dict and load it with ``strict=True``.

        Args:
            source: a workspace checkpoint (``.ckpt``: ``{"state_dicts": {"model": ..., "ema_model": ...}}``),
                a ``.safetensors`` / torch file of a state_dict, or a state_dict already in memory.
            prefix: where the UNet's keys start inside the policy's state_dict (``"model."`` for
                Diffusion Policy's ``DiffusionUnet*Policy``; ``""`` for a bare UNet state_dict).
            which: the entry of ``state_dicts`` to read (``"ema_model"`` when present, else ``"model"``).
            trust_pickle: Diffusion Policy's ``.ckpt`` files pickle their config objects, and
                unpickling runs code from the file. Such files are refused unless this is True
                (``torch.load(weights_only=True)`` is always tried first).
            overrides: constructor arguments the weights cannot reveal (``n_groups``; default 8 as upstream).

        The configuration (input_dim, global_cond_dim, diffusion_step_embed_dim, down_dims,
        kernel_size, cond_predict_scale) is read from the tensor shapes.
        """
        state = _dp_state_dict(source, which, trust_pickle)
        unet_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if not unet_state:
            found = sorted({k.split(".")[0] for k in state})
            raise KeyError(f"no keys start with {prefix!r} in {_name(source)}; top-level names: {found[:12]}")
        if any(k.startswith("local_cond_encoder.") for k in unet_state):
            raise ValueError(f"{_name(source)} uses Diffusion Policy's local_cond, which UNet1D does not support")
        config = {**infer_diffusion_policy_config(unet_state), **overrides}
        model = cls(**config)
        model.load_state_dict(unet_state, strict=True)
        return model


def infer_diffusion_policy_config(state: dict) -> dict:
    """UNet1D constructor arguments read from the shapes of a ConditionalUnet1D state_dict."""
    try:
        dsed = state["diffusion_step_encoder.1.weight"].shape[1]
        input_dim = state["final_conv.1.weight"].shape[0]
        levels = sorted({int(k.split(".")[1]) for k in state if k.startswith("down_modules.")})
        first = [state[f"down_modules.{i}.0.blocks.0.block.0.weight"] for i in levels]  # (C_out, C_in, k)
        film = state["down_modules.0.0.cond_encoder.1.weight"]  # (C_out * (2 | 1), cond_dim)
    except KeyError as err:
        raise KeyError(f"not a Diffusion Policy ConditionalUnet1D state_dict: {err} is missing") from None
    down_dims = tuple(int(w.shape[0]) for w in first)
    cond_dim = int(film.shape[1])
    return {
        "input_dim": int(input_dim),
        "global_cond_dim": (cond_dim - int(dsed)) or None,
        "diffusion_step_embed_dim": int(dsed),
        "down_dims": down_dims,
        "kernel_size": int(first[0].shape[2]),
        "cond_predict_scale": int(film.shape[0]) == 2 * down_dims[0],
    }


def _name(source: object) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else "the given state_dict"


def _dp_state_dict(source: str | os.PathLike | dict, which: str, trust_pickle: bool) -> dict:
    """The flat state_dict of a Diffusion Policy checkpoint / weights file / in-memory dict."""
    if isinstance(source, dict):
        payload = source
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"Diffusion Policy checkpoint not found: {path}")
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # pickled objects beyond tensors and containers
            if not trust_pickle:
                raise ValueError(
                    f"{path} holds pickled Python objects besides tensors (Diffusion Policy .ckpt files pickle "
                    "their config); loading it runs code from the file. If you trust its origin, pass "
                    f"trust_pickle=True (CLI: --trust-pickle). Detail: {_ANSI.sub('', str(err).splitlines()[0])}"
                ) from None
            logger.warning("loading %s with pickle (trust_pickle=True): only do this for files you trust", path)
            payload = torch.load(path, map_location="cpu", weights_only=False)
    if "state_dicts" in payload:
        dicts = payload["state_dicts"]
        key = which if which in dicts else "model"
        if key not in dicts:
            raise KeyError(f"{_name(source)} has no state_dicts[{which!r}] or ['model']; it has {sorted(dicts)}")
        return dicts[key]
    return payload.get("state_dict", payload)


def convert_diffusion_policy(
    source: str | os.PathLike,
    out: str | os.PathLike,
    trust_pickle: bool = False,
    which: str = "ema_model",
    prefix: str = "model.",
) -> UNet1D:
    """Write a Diffusion Policy checkpoint's UNet as an mmx UNet1D folder (``config.json`` + safetensors).

    The folder loads with ``UNet1D.from_pretrained(out)``, without pickle, so a ``.ckpt`` has to be
    trusted once, here, and never again. It is written into a temporary sibling folder, checked by
    loading it back (the state_dict must equal the converted model's), and renamed into place: ``out``
    either does not exist afterwards or holds the whole model. An existing non-empty ``out`` is refused.

    Args:
        source, trust_pickle, which, prefix: as for :meth:`UNet1D.from_diffusion_policy`.
        out: the new folder.

    Returns:
        The converted model (loaded from ``out``).
    """
    import shutil
    import tempfile

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not an empty folder; choose a new folder for the model")
    model = UNet1D.from_diffusion_policy(source, prefix=prefix, which=which, trust_pickle=trust_pickle)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        loaded = UNet1D.from_pretrained(tmp)
        theirs = loaded.state_dict()
        if any(not torch.equal(v, theirs[k]) for k, v in model.state_dict().items()):
            raise RuntimeError(f"the UNet1D written to {tmp} does not load back equal to {source}")
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s from %s", out, source)
    return loaded
