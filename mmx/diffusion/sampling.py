"""Sampling loops on any diffusers scheduler, with classifier-free guidance in one batched call.

Ho & Salimans 2022 (classifier-free guidance). ``callback(step, t, x)`` runs after every step:
progress bars and the attention recorder plug in there.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from mmx.context import Context, conditional_rows

__all__ = ["sample", "pad_context", "StepCallback"]

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


def _batch(context: Context, null: Context) -> Context:
    """Conditional rows first, then the unconditional rows, padded to one S."""
    s = max(context.tokens.shape[1], null.tokens.shape[1])
    context, null = pad_context(context, s), pad_context(null, s)
    b = context.batch_size
    null = null if null.batch_size == b else null[[0] * b]
    pooled = None
    if context.pooled is not None and null.pooled is not None:
        pooled = torch.cat([context.pooled, null.pooled.to(context.pooled)])
    return Context(
        tokens=torch.cat([context.tokens, null.tokens.to(context.tokens)]),  # (2B, S, D)
        mask=torch.cat([context.mask, null.mask.to(context.device)]),  # (2B, S)
        pooled=pooled,
    )


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
) -> torch.Tensor:
    """Draw samples ``[B, *shape]`` conditioned on ``context`` (batch B) with ``scheduler``.

    Args:
        model: ``model(x_t, t, context) -> prediction`` of the scheduler's prediction type.
        scheduler: any diffusers scheduler (DDPM, DDIM, DPM-Solver++, Euler, ...).
        context: the prompts' Context, B rows (prompts of different lengths are padded, masked).
        shape: the shape of one sample, e.g. ``(3, 32, 32)``.
        num_steps: sampling steps.
        guidance_scale: classifier-free guidance weight; 1.0 is the plain conditional model (one
            call per step); otherwise conditional and unconditional rows run in one batched call.
        null_context: the empty caption's Context (needed when ``guidance_scale != 1``).
        generator: for the initial noise and stochastic schedulers.
        callback: called as ``callback(step_index, t, x)`` after every step.
    """
    b = context.batch_size
    device = context.device
    guided = guidance_scale != 1.0
    if guided and null_context is None:
        raise ValueError("guidance_scale != 1 needs null_context, the Context of the empty caption")
    model_context = _batch(context, null_context) if guided else context
    scheduler.set_timesteps(num_steps, device=device)
    x = torch.randn((b, *shape), generator=generator, device=device, dtype=context.dtype)
    x = x * scheduler.init_noise_sigma
    for i, t in enumerate(scheduler.timesteps):
        x_in = torch.cat([x, x]) if guided else x
        x_in = scheduler.scale_model_input(x_in, t)
        with conditional_rows(slice(0, b)):  # the prompts' rows come first; observers read this
            pred = model(x_in, t.expand(x_in.shape[0]), model_context)
        if guided:
            cond, uncond = pred.chunk(2)
            pred = uncond + guidance_scale * (cond - uncond)
        x = scheduler.step(pred, t, x, generator=generator).prev_sample
        if callback is not None:
            callback(i, t, x)
    return x
