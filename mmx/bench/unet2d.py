"""mmx UNet2D against diffusers' UNet2DConditionModel: training-step time and sampling throughput.

Both UNets get the same channels, levels, residual blocks per level, attention placement, heads and
head width (heads * dim_head = the channels of every attention level, which is diffusers' rule), the
same text context, batch and optimiser. A training step is forward, diffusion loss, backward and
AdamW; the models take turns (:func:`mmx.bench.timing.time_calls`), so load on the machine hits
both alike. Sampling is :func:`mmx.diffusion.sample` with DDIM and guidance (conditional and
unconditional rows in one batched call).
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmx import Context
from mmx.bench.report import Figure, Log, SuiteResult, log_info, plain
from mmx.bench.timing import device_name, time_calls

__all__ = [
    "ARCH",
    "build_models",
    "ddpm_schedule",
    "make_inputs",
    "measure",
    "sample_suite",
    "sampling_seconds",
    "suite",
    "train_step",
    "train_step_times",
]

ARCH = dict(
    channels=(64, 128, 128),
    layers_per_block=1,
    attention_levels=(False, True, True),
    attention={"heads": 4, "dim_head": 32},
)
CONTEXT_DIM, TOKENS, REAL_TOKENS = 384, 12, 9
MMX, DIFFUSERS = "mmx UNet2D", "diffusers UNet2DConditionModel"


def make_inputs(
    batch: int, size: int, device: torch.device, tokens: int = TOKENS, real: int | None = REAL_TOKENS
) -> tuple[torch.Tensor, Context]:
    """Images ``[B, 3, size, size]`` and a text Context of ``tokens`` tokens (the first ``real`` unmasked)."""
    x0 = torch.randn(batch, 3, size, size, device=device)
    mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
    if real is not None:
        mask[:, real:] = False
    return x0, Context(tokens=torch.randn(batch, tokens, CONTEXT_DIM, device=device), mask=mask)


def build_models(size: int, device: torch.device, arch: dict | None = None) -> dict[str, nn.Module]:
    """The two UNets of the comparison, built from the same arguments."""
    from mmx.models import DiffusersUNet2D, UNet2D

    arch = arch or ARCH
    return {
        MMX: UNet2D(context_dim=CONTEXT_DIM, **arch).to(device),
        DIFFUSERS: DiffusersUNet2D(context_dim=CONTEXT_DIM, sample_size=size, **arch).to(device),
    }


def train_step(model: nn.Module, x0: torch.Tensor, ctx: Context, scheduler: Any) -> Callable[[], None]:
    """A zero-argument optimiser step of ``model`` (forward, diffusion loss, backward, AdamW)."""
    from mmx.diffusion import diffusion_loss

    opt = torch.optim.AdamW(model.parameters(), 1e-4)

    def step() -> None:
        loss = diffusion_loss(model, x0, ctx, scheduler)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def train_step_times(
    models: dict[str, nn.Module],
    x0: torch.Tensor,
    ctx: Context,
    scheduler: Any,
    warmup: int,
    repeats: int,
    device: torch.device,
) -> dict[str, float]:
    """Median seconds of one optimiser step of each model, the models taking turns."""
    steps = {name: train_step(model, x0, ctx, scheduler) for name, model in models.items()}
    return time_calls(steps, warmup, repeats, device)


def sampling_seconds(
    models: dict[str, nn.Module],
    n: int,
    size: int,
    steps: int,
    guidance: float,
    scheduler: Any,
    device: torch.device,
    repeats: int,
) -> dict[str, float]:
    """Median seconds to sample ``n`` images with each model (a 2-step warm-up first, models alternating)."""
    from mmx.diffusion import sample, sampler_from

    prompts = Context(
        tokens=torch.randn(n, TOKENS, CONTEXT_DIM, device=device),
        mask=torch.ones(n, TOKENS, dtype=torch.bool, device=device),
    )
    null = Context(
        tokens=torch.randn(1, 2, CONTEXT_DIM, device=device), mask=torch.ones(1, 2, dtype=torch.bool, device=device)
    )
    ddim = sampler_from(scheduler, "ddim")

    def run(model: nn.Module, num_steps: int) -> None:
        sample(model, ddim, prompts, (3, size, size), num_steps=num_steps, guidance_scale=guidance, null_context=null)

    for model in models.values():
        model.eval()
        run(model, 2)  # warm-up
    return time_calls({name: (lambda m=m: run(m, steps)) for name, m in models.items()}, 0, repeats, device)


def ddpm_schedule() -> Any:
    """The DDPM training schedule of the benchmarks (1000 steps, squared-cosine betas)."""
    from mmx.diffusion import make_scheduler

    return make_scheduler("ddpm", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")


def _params_m(model: nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def measure(
    batch: int = 32,
    size: int = 32,
    repeats: int = 6,
    sample_batch: int = 16,
    device: torch.device | None = None,
    command: str | None = None,
    log: Log = log_info,
) -> dict[str, Any]:
    """Training-step time of both UNets (``repeats`` after 2 warm-up steps) and mmx's sampling rate.

    Returns:
        ``{"meta", "train_step": per model, "ratio_mmx_over_diffusers", "sampling_images_per_s", "sampling"}``
        (the JSON of scripts/bench_unet2d.py).
    """
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    x0, ctx = make_inputs(batch, size, device)
    ddpm = ddpm_schedule()
    models = build_models(size, device)
    seconds = train_step_times(models, x0, ctx, ddpm, 2, repeats, device)
    rows = []
    for name, model in models.items():
        rows.append({"model": name, "params_m": _params_m(model), "train_step_ms": seconds[name] * 1e3})
        log(
            f"{name:32s} {_params_m(model):6.2f}M params  train step {seconds[name] * 1e3:8.1f} ms "
            f"(B={batch}, {size}x{size})"
        )
    ratio = rows[0]["train_step_ms"] / rows[1]["train_step_ms"]
    log(f"mmx / diffusers train-step time: {ratio:.3f} (target <= 1.0)")

    # Sampling throughput: 25 DDIM steps with guidance (conditional + unconditional in one batched call).
    n = sample_batch
    taken = sampling_seconds({MMX: models[MMX]}, n, size, 25, 3.0, ddpm, device, 1)[MMX]
    log(f"sampling: {n / taken:.2f} images/s ({n} images, 25 DDIM steps, guidance 3.0, {size}x{size})")
    return {
        "meta": {
            "date": dt.date.today().isoformat(),
            "torch": torch.__version__,
            "device": device_name(device),
            "arch": plain(ARCH),
            "batch": batch,
            "size": size,
            "command": command or " ".join(["python", *sys.argv]),
        },
        "train_step": rows,
        "ratio_mmx_over_diffusers": ratio,
        "sampling_images_per_s": n / taken,
        "sampling": {"batch": n, "steps": 25, "guidance": 3.0},
    }


def suite(device: torch.device, quick: bool = False, log: Log = log_info) -> SuiteResult:
    """``mmx bench unet2d``: one training step of mmx UNet2D against diffusers' UNet2DConditionModel."""
    batch, size, warmup, repeats = (2, 16, 1, 1) if quick else (32, 32, 1, 5)
    torch.manual_seed(0)
    x0, ctx = make_inputs(batch, size, device)
    models = build_models(size, device)
    seconds = train_step_times(models, x0, ctx, ddpm_schedule(), warmup, repeats, device)
    for name in models:
        log(f"{name}: {_params_m(models[name]):.2f}M params, train step {seconds[name] * 1e3:.1f} ms")
    label = f"train step, B={batch}, {size}x{size}"
    figure = Figure(label, seconds[MMX] * 1e3, DIFFUSERS, seconds[DIFFUSERS] * 1e3, "ms")
    details = {
        "batch": batch,
        "size": size,
        "warmup": warmup,
        "repeats": repeats,
        "arch": plain(ARCH),
        "params_m": {name: _params_m(m) for name, m in models.items()},
        "train_step_ms": {name: s * 1e3 for name, s in seconds.items()},
    }
    notes = [
        f"same channels {ARCH['channels']}, attention levels, {ARCH['attention']['heads']} heads of "
        f"{ARCH['attention']['dim_head']}, "
        f"context {TOKENS} tokens ({TOKENS - REAL_TOKENS} padded) of width {CONTEXT_DIM}, AdamW; "
        f"median of {repeats}, models alternating"
    ]
    return SuiteResult("unet2d", "UNet2D training step", [figure], details=details, notes=notes)


def sample_suite(device: torch.device, quick: bool = False, log: Log = log_info) -> SuiteResult:
    """``mmx bench sample``: seconds per image, DDIM with guidance, mmx UNet2D against diffusers' UNet."""
    n, size, steps, repeats = (1, 16, 2, 1) if quick else (4, 32, 25, 5)
    torch.manual_seed(0)
    models = build_models(size, device)
    seconds = sampling_seconds(models, n, size, steps, 3.0, ddpm_schedule(), device, repeats)
    for name, s in seconds.items():
        log(f"{name}: {n / s:.2f} images/s ({n} images, {steps} DDIM steps, guidance 3.0, {size}x{size})")
    figure = Figure(
        f"sampling, s/image ({steps} DDIM steps, guidance 3, {size}x{size})",
        seconds[MMX] / n,
        DIFFUSERS,
        seconds[DIFFUSERS] / n,
        "s",
    )
    details = {
        "images": n,
        "size": size,
        "steps": steps,
        "guidance": 3.0,
        "repeats": repeats,
        "images_per_s": {name: n / s for name, s in seconds.items()},
    }
    notes = [f"{n} images per call, conditional and unconditional rows in one batched call; median of {repeats}"]
    return SuiteResult("sample", "sampling throughput", [figure], details=details, notes=notes)
