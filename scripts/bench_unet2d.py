"""Train-step time of mmx UNet2D against diffusers' UNet2DConditionModel, and sampling throughput.

Both UNets get the same channels, levels, residual blocks per level, attention placement, heads and
head width (heads * dim_head = the channels of every attention level, which is diffusers' rule), the
same text context, batch and optimiser. Prints a table and writes JSON.

    python scripts/bench_unet2d.py --json benchmarks/unet2d-cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time

import torch
from _machine import device_name  # scripts/ is on sys.path when a script runs

from mmx import Context
from mmx.diffusion import diffusion_loss, make_scheduler, sample, sampler_from
from mmx.models import DiffusersUNet2D, UNet2D

ARCH = dict(channels=(64, 128, 128), layers_per_block=1, attention_levels=(False, True, True), heads=4, dim_head=32)


def step_time(model, x0, ctx, scheduler, repeats: int) -> float:
    """Median seconds of one optimiser step (forward, loss, backward, AdamW)."""
    opt = torch.optim.AdamW(model.parameters(), 1e-4)
    times = []
    for i in range(repeats + 2):
        start = time.perf_counter()
        loss = diffusion_loss(model, x0, ctx, scheduler)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if x0.is_cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    b, size = args.batch, args.size
    x0 = torch.randn(b, 3, size, size, device=device)
    mask = torch.ones(b, 12, dtype=torch.bool, device=device)
    mask[:, 9:] = False
    ctx = Context(tokens=torch.randn(b, 12, 384, device=device), mask=mask)
    scheduler = make_scheduler("ddpm", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    models = {
        "mmx UNet2D": UNet2D(context_dim=384, **ARCH).to(device),
        "diffusers UNet2DConditionModel": DiffusersUNet2D(
            context_dim=384, sample_size=size, **{k: v for k, v in ARCH.items()}).to(device),
    }
    rows = []
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        seconds = step_time(model, x0, ctx, scheduler, args.repeats)
        rows.append({"model": name, "params_m": params / 1e6, "train_step_ms": seconds * 1e3})
        print(f"{name:32s} {params / 1e6:6.2f}M params  train step {seconds * 1e3:8.1f} ms (B={b}, {size}x{size})", flush=True)
    ratio = rows[0]["train_step_ms"] / rows[1]["train_step_ms"]
    print(f"mmx / diffusers train-step time: {ratio:.3f} (target <= 1.0)")

    # Sampling throughput: 25 DDIM steps with guidance (conditional + unconditional in one batched call).
    model = models["mmx UNet2D"].eval()
    n = args.sample_batch
    prompts = Context(tokens=torch.randn(n, 12, 384, device=device), mask=torch.ones(n, 12, dtype=torch.bool, device=device))
    null = Context(tokens=torch.randn(1, 2, 384, device=device), mask=torch.ones(1, 2, dtype=torch.bool, device=device))
    ddim = sampler_from(scheduler, "ddim")
    sample(model, ddim, prompts, (3, size, size), num_steps=2, guidance_scale=3.0, null_context=null)  # warm-up
    start = time.perf_counter()
    sample(model, ddim, prompts, (3, size, size), num_steps=25, guidance_scale=3.0, null_context=null)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    print(f"sampling: {n / seconds:.2f} images/s ({n} images, 25 DDIM steps, guidance 3.0, {size}x{size})")
    result = {
        "meta": {"date": dt.date.today().isoformat(), "torch": torch.__version__,
                 "device": device_name(device),
                 "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in ARCH.items()}, "batch": b, "size": size,
                 "command": " ".join(["python", *sys.argv])},
        "train_step": rows, "ratio_mmx_over_diffusers": ratio,
        "sampling_images_per_s": n / seconds, "sampling": {"batch": n, "steps": 25, "guidance": 3.0},
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
