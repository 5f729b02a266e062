"""Sampling loops on any diffusers scheduler, with classifier-free guidance in one batched call.

Ho & Salimans 2022 (classifier-free guidance). ``callback(step, t, x)`` runs after every step:
progress bars and the attention recorder plug in there.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

from mmx.context import Context, conditional_rows

__all__ = ["sample", "pad_context", "check_steps", "StepCallback"]

StepCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


def pad_context(context: Context, length: int) -> Context:
    """Pad tokens and mask along S to ``length`` with masked zero tokens (words and grid are kept)."""
    b, s, d = context.tokens.shape
    if s == length:
        return context
    if s > length:
        raise ValueError(f"cannot pad a context of S={s} tokens down to {length}")
    pad = context.tokens.new_zeros(b, length - s, d)
    return Context(
        tokens=torch.cat([context.tokens, pad], 1),
        mask=torch.cat([context.mask, context.mask.new_zeros(b, length - s)], 1),
        pooled=context.pooled,
        words=context.words,
    )


def check_steps(num_steps: Any, scheduler: Any) -> None:
    """A ValueError naming ``num_steps`` unless it is an int from 1 to the scheduler's training timesteps."""
    limit = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    if (
        isinstance(num_steps, bool)
        or not isinstance(num_steps, numbers.Integral)
        or num_steps < 1
        or (isinstance(limit, int) and num_steps > limit)
    ):
        upto = f" to {limit} (the timesteps the model was trained with)" if isinstance(limit, int) else ""
        raise ValueError(f"num_steps must be an integer from 1{upto}; got {num_steps!r}")


def _batch(context: Context, null: Context, components: Context | None = None) -> Context:
    """Conditional rows first, then the unconditional rows (then any component rows), padded to one S."""
    parts = [context, null] + ([components] if components is not None else [])
    s = max(p.tokens.shape[1] for p in parts)
    parts = [pad_context(p, s) for p in parts]
    b = context.batch_size
    if parts[1].batch_size != b:
        parts[1] = parts[1][[0] * b]
    pooled = None
    if all(p.pooled is not None for p in parts):
        pooled = torch.cat([p.pooled.to(context.pooled) for p in parts])
    return Context(
        tokens=torch.cat([p.tokens.to(context.tokens) for p in parts]),  # (2B [+ KB], S, D)
        mask=torch.cat([p.mask.to(context.device) for p in parts]),  # (2B [+ KB], S)
        pooled=pooled,
    )


def check_guidance_interval(interval: Sequence[float] | None) -> tuple[float, float] | None:
    """``(low, high)`` timesteps as floats, or None; anything else is a ValueError naming it."""
    if interval is None:
        return None
    if len(interval) != 2 or not all(isinstance(v, numbers.Real) for v in interval) or not interval[0] <= interval[1]:
        raise ValueError(f"guidance_interval must be (low, high) timesteps with low <= high; got {interval!r}")
    return float(interval[0]), float(interval[1])


@torch.no_grad()
def sample(
    model: Callable[[torch.Tensor, torch.Tensor, Context], torch.Tensor],
    scheduler: Any,
    context: Context,
    shape: tuple[int, ...],
    num_steps: int = 25,
    guidance_scale: float = 1.0,
    null_context: Context | None = None,
    generator: torch.Generator | None = None,
    callback: StepCallback | None = None,
    components: Context | None = None,
    component_weights: torch.Tensor | None = None,
    guidance_interval: tuple[float, float] | None = None,
) -> torch.Tensor:
    """Draw samples ``[B, *shape]`` conditioned on ``context`` (batch B) with ``scheduler``.

    Args:
        model: ``model(x_t, t, context) -> prediction`` of the scheduler's prediction type.
        scheduler: any diffusers scheduler (DDPM, DDIM, DPM-Solver++, Euler, ...).
        context: the prompts' Context, B rows (prompts of different lengths are padded, masked).
        shape: the shape of one sample, e.g. ``(3, 32, 32)``.
        num_steps: sampling steps, from 1 to the scheduler's ``num_train_timesteps`` (else a ValueError).
        guidance_scale: classifier-free guidance weight, finite (else a ValueError); 1.0 is the plain
            conditional model (one call per step); otherwise conditional and unconditional rows run
            in one batched call.
        null_context: the empty caption's Context (needed when ``guidance_scale != 1``).
        generator: for the initial noise and stochastic schedulers.
        callback: called as ``callback(step_index, t, x)`` after every step.
        components: composable guidance (Liu et al. 2022, "Compositional Visual Generation with
            Composable Diffusion Models"): K partial descriptions per prompt, ``K*B`` rows (component
            k of prompt b at row ``k*B + b``); each adds ``w[k, b] * (pred_k - pred_uncond)``.
        component_weights: ``[K, B]`` weights (0 for a prompt that has fewer components).
        guidance_interval: ``(low, high)`` timesteps: guidance (and components) apply only at steps
            whose timestep ``t`` has ``low <= t <= high``; the other steps run the conditional rows
            alone (Kynkaenniemi et al. 2024, "Applying Guidance in a Limited Interval Improves
            Sample and Distribution Quality in Diffusion Models"). None: every step.
    """
    check_steps(num_steps, scheduler)
    if not isinstance(guidance_scale, numbers.Real) or not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be a finite number (1.0: no guidance); got {guidance_scale!r}")
    guidance_interval = check_guidance_interval(guidance_interval)
    b = context.batch_size
    device = context.device
    guided = guidance_scale != 1.0 or components is not None
    if guided and null_context is None:
        raise ValueError("guidance_scale != 1 and components need null_context, the Context of the empty caption")
    k = 0
    if components is not None:
        if component_weights is None or component_weights.ndim != 2 or component_weights.shape[1] != b:
            got = None if component_weights is None else tuple(component_weights.shape)
            raise ValueError(f"components need component_weights [K, B={b}]; got {got}")
        k = component_weights.shape[0]
        if components.batch_size != k * b:
            raise ValueError(f"components must hold K*B = {k * b} rows; got {components.batch_size}")
        component_weights = component_weights.to(device=device, dtype=context.dtype)
    model_context = _batch(context, null_context, components) if guided else context
    scheduler.set_timesteps(num_steps, device=device)
    x = torch.randn((b, *shape), generator=generator, device=device, dtype=context.dtype)
    x = x * scheduler.init_noise_sigma
    low, high = guidance_interval if guidance_interval is not None else (-math.inf, math.inf)
    for i, t in enumerate(scheduler.timesteps):
        step_guided = guided and low <= float(t) <= high
        x_in = x.repeat(2 + k, *([1] * (x.ndim - 1))) if step_guided else x
        x_in = scheduler.scale_model_input(x_in, t)
        with conditional_rows(slice(0, b)):  # the prompts' rows come first; observers read this
            pred = model(x_in, t.expand(x_in.shape[0]), model_context if step_guided else context)
        if step_guided:
            cond, uncond, *parts = pred.split(b)
            pred = uncond + guidance_scale * (cond - uncond)
            for j, part in enumerate(parts):
                pred = pred + component_weights[j].view(b, *([1] * (x.ndim - 1))) * (part - uncond)
        x = scheduler.step(pred, t, x, generator=generator).prev_sample
        if callback is not None:
            callback(i, t, x)
    return x
