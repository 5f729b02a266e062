"""Diffusion policies: an observation encoder, a 1D UNet over action chunks and a normaliser.

Chi et al. 2023, "Diffusion Policy". The policy sees the last ``n_obs_steps`` observations,
denoises a chunk of ``horizon`` actions, and the caller executes ``n_action_steps`` of them
starting at the current step (index ``n_obs_steps - 1`` of the chunk) before asking again
(receding horizon). Nothing here touches files: the trainer saves the module's state_dict, in
which the fitted normaliser travels as buffers.

Letters: B batch, T horizon, To observation steps, Da action width.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mmx.attnmap.capture import AttentionCapture
from mmx.context import Context
from mmx.diffusion.loss import diffusion_loss
from mmx.diffusion.sampling import sample
from mmx.diffusion.schedulers import sampler_from
from mmx.nn.attention import attention_probs

__all__ = ["LinearNormalizer", "DiffusionPolicy"]


class LinearNormalizer(nn.Module):
    """Per-dimension min-max scaling of named fields to [-1, 1], fitted on data, saved as buffers.

    A dimension whose range is below ``eps`` (a constant) maps to 0 and back to its constant.
    ``normalize(key, x)`` and ``unnormalize(key, x)`` work on any ``[..., dim]`` tensor.
    """

    def __init__(self, dims: Mapping[str, int] | None = None, eps: float = 1e-4) -> None:
        super().__init__()
        self.eps = eps
        self._keys: list[str] = []
        for key, dim in (dims or {}).items():
            self._add(key, torch.full((dim,), -1.0), torch.full((dim,), 1.0))

    def _add(self, key: str, low: torch.Tensor, high: torch.Tensor) -> None:
        if key not in self._keys:
            self._keys.append(key)
        self.register_buffer(f"{key}_min", low.float().clone())
        self.register_buffer(f"{key}_max", high.float().clone())

    @property
    def keys(self) -> list[str]:
        return list(self._keys)

    def fit(self, data: Mapping[str, np.ndarray | torch.Tensor]) -> LinearNormalizer:
        """Set each key's per-dimension min and max from ``data[key]`` ``[N, ..., dim]``."""
        for key, values in data.items():
            v = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values).float()
            if v.ndim < 1 or v.numel() == 0:
                raise ValueError(
                    f"cannot fit the normaliser on {key!r}: need [N, dim] values; got shape {tuple(v.shape)}"
                )
            if not torch.isfinite(v).all():
                raise ValueError(f"cannot fit the normaliser on {key!r}: it holds NaN or infinite values")
            flat = v.reshape(-1, v.shape[-1])
            self._add(key, flat.min(0).values, flat.max(0).values)
        return self

    def _range(self, key: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if key not in self._keys:
            raise KeyError(f"the normaliser has no field {key!r}; fitted: {self._keys}")
        low, high = getattr(self, f"{key}_min"), getattr(self, f"{key}_max")
        span = high - low
        constant = span < self.eps
        return low, torch.where(constant, torch.ones_like(span), span), constant

    def normalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        low, span, constant = self._range(key)
        out = (x - low.to(x)) / span.to(x) * 2 - 1
        return torch.where(constant.to(x.device), torch.zeros_like(out), out)

    def unnormalize(self, key: str, x: torch.Tensor) -> torch.Tensor:
        low, span, constant = self._range(key)
        out = (x + 1) / 2 * span.to(x) + low.to(x)
        return torch.where(constant.to(x.device), low.to(x).expand_as(out), out)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # noqa: ANN001 - torch signature
        for name in state_dict:  # fields fitted elsewhere become buffers before loading
            if name.startswith(prefix) and name.endswith("_min"):
                key = name[len(prefix) : -len("_min")]
                if key not in self._keys and "." not in key:
                    self._add(key, state_dict[name], state_dict[prefix + key + "_max"])
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"fields={self._keys}"


class DiffusionPolicy(nn.Module):
    """Observation history -> a denoised action chunk, conditioned through FiLM and/or cross-attention.

    Args:
        obs_encoder: an :class:`mmx.encoders.ObservationEncoder` (or any module ``obs -> Context``).
        unet: a :class:`mmx.models.UNet1D` called as ``unet(actions [B, T, Da], t, context)``.
        normalizer: a :class:`LinearNormalizer` with an ``action`` field and one per low-dim key.
        scheduler: the diffusers training scheduler (DDPM); sampling uses ``sampler`` built from its config.
        horizon, n_obs_steps, n_action_steps: as in Diffusion Policy.
        lowdim_keys: observation keys normalised by ``normalizer``; image keys (``image_keys``) are
            scaled from uint8 [0, 255] to [0, 1]; other keys (text) pass through.
        sampler, num_inference_steps: the few-step sampler (DDIM, 16 steps by default).
        attention_losses: training-only losses on where the action chunk looks (``mask_kl`` of
            :mod:`mmx.attnmap.losses`): the KL divergence from ``batch[attention_mask_key]``
            (``[B, To, H, W]`` masks, e.g. the named target's pixels) to the action steps'
            cross-attention over each frame's image regions (mean over heads, steps and layers).
        attention_mask_key: the batch key of those masks (never an observation).
        attention_image_key: the image observation the masks are drawn on (None: the only one).
    """

    # the UNet's blocks, kept whole when Accelerate's FSDP shards the policy (TRANSFORMER_BASED_WRAP)
    _no_split_modules = ["ResBlock1D", "TemporalTransformer"]

    def __init__(
        self,
        obs_encoder: nn.Module,
        unet: nn.Module,
        normalizer: LinearNormalizer,
        scheduler: Any,
        horizon: int,
        n_obs_steps: int,
        n_action_steps: int,
        action_dim: int,
        lowdim_keys: tuple[str, ...] = (),
        image_keys: tuple[str, ...] = (),
        sampler: str = "ddim",
        num_inference_steps: int = 16,
        attention_losses: Sequence[Any] = (),
        attention_mask_key: str = "target_mask",
        attention_image_key: str | None = None,
    ) -> None:
        super().__init__()
        attention_losses = [term for term in attention_losses if term.weight > 0]
        if attention_losses:
            if attention_image_key is None and len(image_keys) != 1:
                raise ValueError(
                    "attention_losses need the image the masks are drawn on: set attention_image_key to one of "
                    f"the image observations {list(image_keys)}"
                )
            if attention_image_key is not None and attention_image_key not in image_keys:
                raise ValueError(
                    f"attention_image_key {attention_image_key!r} is not an image observation; "
                    f"images: {list(image_keys)}"
                )
        if not 1 <= n_obs_steps <= horizon:
            raise ValueError(f"n_obs_steps={n_obs_steps} must be in [1, horizon={horizon}]")
        if not 1 <= n_action_steps <= horizon - n_obs_steps + 1:
            raise ValueError(
                f"n_action_steps={n_action_steps} must be in "
                f"[1, horizon - n_obs_steps + 1 = {horizon - n_obs_steps + 1}]"
            )
        self.obs_encoder, self.unet, self.normalizer = obs_encoder, unet, normalizer
        self.scheduler = scheduler
        self.horizon, self.n_obs_steps, self.n_action_steps, self.action_dim = (
            horizon,
            n_obs_steps,
            n_action_steps,
            action_dim,
        )
        self.lowdim_keys, self.image_keys = tuple(lowdim_keys), tuple(image_keys)
        self.sampler, self.num_inference_steps = sampler, num_inference_steps
        self.attention_losses, self.attention_mask_key = attention_losses, attention_mask_key
        self.attention_image_key = attention_image_key or (image_keys[0] if image_keys else None)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def prepare_obs(self, obs: Mapping[str, Any]) -> dict[str, Any]:
        """The encoder's input: the first ``n_obs_steps`` of each key, normalised, on the policy's device."""
        out: dict[str, Any] = {}
        to = self.n_obs_steps
        for key, value in obs.items():
            if key in self.lowdim_keys:
                x = torch.as_tensor(value, device=self.device).float()[:, :to]
                out[key] = self.normalizer.normalize(key, x)
            elif key in self.image_keys:
                x = torch.as_tensor(value, device=self.device)[:, :to]
                if x.ndim == 5 and x.shape[-1] == 3:  # (B, To, H, W, 3) as simulators and zarr stores keep them
                    x = x.permute(0, 1, 4, 2, 3)
                out[key] = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
            else:
                out[key] = value
        return out

    def encode(self, obs: Mapping[str, Any]) -> Context:
        """Observation history -> Context (tokens for cross-attention, pooled for FiLM)."""
        return self.obs_encoder(self.prepare_obs(obs))

    def loss(
        self, batch: Mapping[str, Any], generator: torch.Generator | None = None, min_snr_gamma: float | None = None
    ) -> torch.Tensor:
        """Denoising loss of one batch: ``batch["action"] [B, T, Da]`` plus the observation keys."""
        actions = torch.as_tensor(batch["action"], device=self.device).float()
        if actions.ndim != 3 or actions.shape[1:] != (self.horizon, self.action_dim):
            raise ValueError(
                f"batch['action'] must be [B, horizon={self.horizon}, {self.action_dim}]; got {tuple(actions.shape)}"
            )
        obs = {k: v for k, v in batch.items() if k not in ("action", self.attention_mask_key)}
        naction = self.normalizer.normalize("action", actions)
        if not self.attention_losses:
            return diffusion_loss(self.unet, naction, self.encode(obs), self.scheduler, min_snr_gamma, generator)
        if self.attention_mask_key not in batch:
            raise KeyError(
                f"attention_losses need batch[{self.attention_mask_key!r}] ([B, To, H, W] masks); "
                f"batch keys: {sorted(batch)}"
            )
        context, segments = self.obs_encoder.encode(self.prepare_obs(obs))
        with AttentionCapture(self.unet) as capture:
            loss = diffusion_loss(self.unet, naction, context, self.scheduler, min_snr_gamma, generator)
        masks = torch.as_tensor(batch[self.attention_mask_key], device=self.device)
        maps, grid = self._image_attention(capture, segments, masks)
        for term in self.attention_losses:
            loss = loss + term(maps, masks, grid)
        return loss

    def _image_attention(
        self, capture: AttentionCapture, segments: list, masks: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """The chunk's attention ``[B, To, h*w]`` over each frame's regions (mean of heads, steps, layers); (h, w)."""
        segment = next((s for s in segments if s.name == self.attention_image_key), None)
        if segment is None:
            raise ValueError(f"attention_losses: the encoder gives no tokens for image {self.attention_image_key!r}")
        steps, h, w = segment.grid
        if masks.ndim != 4 or masks.shape[1] != steps:
            raise ValueError(
                f"batch[{self.attention_mask_key!r}] must be [B, To={steps}, H, W] masks; got {tuple(masks.shape)}"
            )
        maps = torch.stack(
            [
                attention_probs(q, k, mask, scale=scale).mean((1, 2))[:, segment.start : segment.end]  # (B, To*h*w)
                for q, k, mask, scale in capture.calls
            ]
        ).mean(0)
        return maps.view(-1, steps, h * w), (h, w)

    def forward(self, batch: Mapping[str, Any], generator: torch.Generator | None = None) -> torch.Tensor:
        """The training loss (so wrappers such as DistributedDataParallel see the call): see :meth:`loss`."""
        return self.loss(batch, generator)

    @torch.no_grad()
    def predict_action(
        self,
        obs: Mapping[str, Any],
        generator: torch.Generator | None = None,
        num_inference_steps: int | None = None,
        callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
        context: Context | None = None,
    ) -> dict[str, torch.Tensor]:
        """Denoise an action chunk for each observation history.

        Returns ``action`` ``[B, n_action_steps, Da]`` (to execute now, starting at the current step)
        and ``action_pred`` ``[B, horizon, Da]`` (the whole chunk), both un-normalised. ``context``
        is the already encoded ``obs`` (then ``obs`` is not encoded again).
        """
        if context is None:
            context = self.encode(obs)
        scheduler = sampler_from(self.scheduler, self.sampler)
        steps = num_inference_steps or self.num_inference_steps
        naction = sample(
            self.unet,
            scheduler,
            context,
            (self.horizon, self.action_dim),
            steps,
            generator=generator,
            callback=callback,
        )
        action_pred = self.normalizer.unnormalize("action", naction.float())
        start = self.n_obs_steps - 1
        return {"action": action_pred[:, start : start + self.n_action_steps], "action_pred": action_pred}
