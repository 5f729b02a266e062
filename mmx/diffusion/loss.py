"""Denoising training loss on a diffusers scheduler: epsilon, v or sample targets, min-SNR weighting.

Ho et al. 2020 (epsilon), Salimans & Ho 2022 (v-prediction), Hang et al. 2023 (min-SNR-gamma).
The network is any callable ``model(x_t, t, context)``; nothing here knows about files or data sets.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from mmx.context import Context

__all__ = ["diffusion_loss", "denoising_losses", "drop_conditions", "PREDICTION_TYPES"]

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _target(scheduler: Any, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    if kind == "sample":
        return x0
    raise ValueError(f"prediction_type {kind!r} is not supported; valid: {', '.join(PREDICTION_TYPES)}")


def _snr_weights(scheduler: Any, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """min(SNR, gamma) / SNR for epsilon, / (SNR + 1) for v, min(SNR, gamma) for sample (per sample ``[B]``)."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t)  # (B,)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return clipped / snr
    if kind == "v_prediction":
        return clipped / (snr + 1)
    return clipped


def diffusion_loss(
    model: Callable[[torch.Tensor, torch.Tensor, Context], torch.Tensor],
    x0: torch.Tensor,
    context: Context,
    scheduler: Any,
    min_snr_gamma: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Mean squared error of ``model(x_t, t, context)`` against the scheduler's prediction target.

    ``t`` is uniform over the training timesteps, ``x_t = scheduler.add_noise(x0, noise, t)``.
    With ``min_snr_gamma`` each sample's loss is weighted by the min-SNR-gamma rule.
    """
    b = x0.shape[0]
    steps = scheduler.config.num_train_timesteps
    t = torch.randint(0, steps, (b,), device=x0.device, generator=generator)  # (B,)
    noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    per_sample = _per_sample_mse(model, x0, context, scheduler, t, noise)  # (B,)
    if min_snr_gamma is not None:
        per_sample = per_sample * _snr_weights(scheduler, t, min_snr_gamma).to(per_sample)
    return per_sample.mean()


def _per_sample_mse(
    model: Callable, x0: torch.Tensor, context: Context, scheduler: Any, t: torch.Tensor, noise: torch.Tensor
) -> torch.Tensor:
    """``[B]`` mean squared error of ``model(x_t, t, context)`` against the target (``x0`` noised at ``t``)."""
    x_t = scheduler.add_noise(x0, noise, t)
    target = _target(scheduler, x0, noise, t)
    pred = model(x_t, t, context)
    return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)


@torch.no_grad()
def denoising_losses(
    model: Callable[[torch.Tensor, torch.Tensor, Context], torch.Tensor],
    x0: torch.Tensor,
    context: Context,
    scheduler: Any,
    timesteps: Sequence[int],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[K, B]`` unweighted denoising loss of each sample at each of the ``K`` given timesteps.

    The same quantity as :func:`diffusion_loss` (the MSE against the scheduler's prediction target)
    without min-SNR weights, at chosen timesteps instead of random ones: with a seeded ``generator``
    the noise is fixed too, so two calls on the same data give the same numbers, and a held-out
    loss can be compared across the validations of a run.
    """
    steps = scheduler.config.num_train_timesteps
    bad = [int(t) for t in timesteps if not 0 <= int(t) < steps]
    if bad or not len(timesteps):
        raise ValueError(
            f"timesteps must be a non-empty list in 0 .. {steps - 1} (the training timesteps); got {list(timesteps)}"
        )
    rows = []
    for step in timesteps:
        t = torch.full((x0.shape[0],), int(step), device=x0.device, dtype=torch.long)  # (B,)
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        rows.append(_per_sample_mse(model, x0, context, scheduler, t, noise))
    return torch.stack(rows)  # (K, B)


def drop_conditions(
    context: Context, null: Context, p: float, generator: torch.Generator | None = None, return_dropped: bool = False
) -> Context | tuple[Context, torch.Tensor]:
    """Replace each sample's context by the empty caption's with probability ``p`` (classifier-free guidance training).

    ``null`` is the Context of the empty caption, batch size 1, padded to the same S. With
    ``return_dropped`` also returns the ``[B]`` bool tensor of replaced rows.
    """
    if p <= 0:
        dropped = torch.zeros(context.batch_size, dtype=torch.bool, device=context.device)
        return (context, dropped) if return_dropped else context
    b, s = context.mask.shape
    if null.tokens.shape[1] != s:
        raise ValueError(f"the null context has S={null.tokens.shape[1]} tokens; the batch has S={s}: pad both alike")
    drop = torch.rand(b, device=context.device, generator=generator) < p  # (B,)
    tokens = torch.where(drop[:, None, None], null.tokens.to(context.tokens), context.tokens)
    mask = torch.where(drop[:, None], null.mask.to(context.device), context.mask)
    pooled = None
    if context.pooled is not None and null.pooled is not None:
        pooled = torch.where(drop[:, None], null.pooled.to(context.pooled), context.pooled)
    out = Context(tokens=tokens, mask=mask, pooled=pooled)  # words dropped: no host sync in the loop
    return (out, drop) if return_dropped else out
