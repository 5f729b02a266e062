"""Scaling curves: training-step time and peak memory against input size and context length.

One step is forward, diffusion loss, backward and AdamW (:func:`mmx.bench.unet2d.train_step`).
UNet2D (the architecture of :mod:`mmx.bench.unet2d`): every resolution in ``RESOLUTIONS`` with every
context length in ``CONTEXTS``. UNet1D (the policy architecture of :mod:`mmx.bench.unet1d`, FiLM only
and with cross-attention on a context of 10 observation tokens): every horizon in ``HORIZONS``. Each
point's time is the median of ``repeats`` steps after a warm-up step; its peak memory is measured
around one more step (:class:`mmx.bench.memory.PeakMemory`, which names its method). Writes
``scaling_unet2d.png`` and ``scaling_unet1d.png`` (two panels each: time and peak memory).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmx import Context
from mmx.bench.memory import PeakMemory, memory_method, short_method
from mmx.bench.report import Figure, Log, SuiteResult, log_info
from mmx.bench.timing import time_calls
from mmx.bench.unet2d import ARCH, CONTEXT_DIM, ddpm_schedule, make_inputs, train_step

__all__ = ["CONTEXTS", "HORIZONS", "RESOLUTIONS", "plot", "scale_unet1d", "scale_unet2d", "suite"]

RESOLUTIONS = (32, 64, 128)
CONTEXTS = (8, 77, 256)
HORIZONS = (16, 32, 64)
UNET1D = dict(
    input_dim=2,
    global_cond_dim=64,
    diffusion_step_embed_dim=128,
    down_dims=(128, 256, 512),
    kernel_size=5,
    n_groups=8,
    cond_predict_scale=True,
)
OBS_TOKENS, OBS_DIM = 10, 64


def _point(
    model: torch.nn.Module, x0: torch.Tensor, ctx: Context, ddpm: Any, warmup: int, repeats: int, device: torch.device
) -> tuple[float, float | None]:
    """``(median step ms, peak MiB or None)`` of one configuration."""
    step = train_step(model, x0, ctx, ddpm)
    ms = time_calls({"step": step}, warmup, repeats, device)["step"] * 1e3
    with PeakMemory(device) as peak:
        step()
    return ms, peak.mib


def scale_unet2d(
    device: torch.device,
    resolutions: tuple[int, ...] = RESOLUTIONS,
    contexts: tuple[int, ...] = CONTEXTS,
    batch: int = 2,
    arch: dict | None = None,
    warmup: int = 1,
    repeats: int = 3,
    log: Log = log_info,
) -> list[dict[str, Any]]:
    """One point per (resolution, context length): ``{"resolution", "context", "batch", "step_ms", "peak_mib"}``."""
    from mmx.models import UNet2D

    torch.manual_seed(0)
    model = UNet2D(context_dim=CONTEXT_DIM, **(arch or ARCH)).to(device).train()
    ddpm = ddpm_schedule()
    points = []
    for res in resolutions:
        for tokens in contexts:
            x0, ctx = make_inputs(batch, res, device, tokens=tokens, real=None)
            ms, mib = _point(model, x0, ctx, ddpm, warmup, repeats, device)
            points.append({"resolution": res, "context": tokens, "batch": batch, "step_ms": ms, "peak_mib": mib})
            log(
                f"UNet2D {res}x{res}, {tokens} context tokens, B={batch}: step {ms:.1f} ms, peak "
                + ("n/a" if mib is None else f"{mib:.1f} MiB")
            )
    return points


def scale_unet1d(
    device: torch.device,
    horizons: tuple[int, ...] = HORIZONS,
    batch: int = 64,
    arch: dict | None = None,
    warmup: int = 1,
    repeats: int = 3,
    log: Log = log_info,
) -> list[dict[str, Any]]:
    """One point per (variant, horizon): ``{"variant", "horizon", "context", "batch", "step_ms", "peak_mib"}``."""
    from mmx.models import UNet1D

    arch = dict(arch or UNET1D)
    ddpm = ddpm_schedule()
    points = []
    for variant, extra in (("FiLM", {}), ("FiLM + cross-attn", dict(context_dim=OBS_DIM, heads=4, dim_head=32))):
        torch.manual_seed(0)
        model = UNet1D(**arch, **extra).to(device).train()
        for horizon in horizons:
            x0 = torch.randn(batch, horizon, arch["input_dim"], device=device)
            ctx = Context(
                tokens=torch.randn(batch, OBS_TOKENS, OBS_DIM, device=device),
                mask=torch.ones(batch, OBS_TOKENS, dtype=torch.bool, device=device),
                pooled=torch.randn(batch, arch["global_cond_dim"], device=device),
            )
            ms, mib = _point(model, x0, ctx, ddpm, warmup, repeats, device)
            points.append(
                {
                    "variant": variant,
                    "horizon": horizon,
                    "context": OBS_TOKENS if extra else "",
                    "batch": batch,
                    "step_ms": ms,
                    "peak_mib": mib,
                }
            )
            log(
                f"UNet1D {variant}, horizon {horizon}, B={batch}: step {ms:.1f} ms, peak "
                + ("n/a" if mib is None else f"{mib:.1f} MiB")
            )
    return points


def plot(points: list[dict[str, Any]], x: str, line: str, path: Path, title: str, memory: str) -> Path:
    """Two panels (step time, peak memory) against ``x``, one line per value of ``line``; written to ``path``.

    ``memory`` names the peak-memory method (the right panel's title).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key in dict.fromkeys(p[line] for p in points):
        mine = [p for p in points if p[line] == key]
        xs = [p[x] for p in mine]
        label = f"{key} context tokens" if line == "context" else str(key)
        axes[0].plot(xs, [p["step_ms"] for p in mine], marker="o", label=label)
        if all(p["peak_mib"] is not None for p in mine):
            axes[1].plot(xs, [p["peak_mib"] for p in mine], marker="o", label=label)
    xs = sorted({p[x] for p in points})
    panels = (("step time (ms)", "forward + backward + AdamW"), ("peak memory (MiB)", memory))
    for ax, (ylabel, panel_title) in zip(axes, panels):
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [str(v) for v in xs])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.set_xlabel(x)
        ax.set_ylabel(ylabel)
        ax.set_title(panel_title, fontsize=9)
        ax.grid(True, alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pick(points: list[dict[str, Any]], **where: Any) -> dict[str, Any]:
    return next(p for p in points if all(p[k] == v for k, v in where.items()))


def _pair(label: str, what: str, a: dict[str, Any], b: dict[str, Any], against: str) -> list[Figure]:
    """A time figure and (where both were measured and non-zero) a memory figure of point a against point b."""
    figures = [Figure(f"{what} step time, {label}", a["step_ms"], against, b["step_ms"], "ms")]
    if a["peak_mib"] and b["peak_mib"]:
        figures.append(Figure(f"{what} peak memory, {label}", a["peak_mib"], against, b["peak_mib"], "MiB"))
    return figures


def suite(device: torch.device, quick: bool = False, log: Log = log_info, out: Path | None = None) -> SuiteResult:
    """``mmx bench scaling``: the curves (PNG), the points (details), and the largest size's ratio to the smallest."""
    out = Path(out) if out is not None else Path(".")
    if quick:
        p2 = scale_unet2d(
            device,
            (8, 16, 32),
            (4, 8, 16),
            batch=1,
            warmup=1,
            repeats=1,
            log=log,
            arch=dict(
                channels=(32, 32, 32),
                layers_per_block=1,
                attention_levels=(False, True, True),
                attention={"heads": 2, "dim_head": 16},
            ),
        )
        p1 = scale_unet1d(
            device,
            (8, 16, 32),
            batch=2,
            warmup=1,
            repeats=1,
            log=log,
            arch=dict(UNET1D, global_cond_dim=6, diffusion_step_embed_dim=16, down_dims=(16, 32)),
        )
    else:
        p2 = scale_unet2d(device, log=log)
        p1 = scale_unet1d(device, log=log)
    method, short = memory_method(device), short_method(device)
    files = [
        plot(
            p2,
            "resolution",
            "context",
            out / "scaling_unet2d.png",
            f"UNet2D: one training step against resolution and context length (batch {p2[0]['batch']}, {device.type})",
            short,
        ),
        plot(
            p1,
            "horizon",
            "variant",
            out / "scaling_unet1d.png",
            f"UNet1D: one training step against horizon (batch {p1[0]['batch']}, {device.type})",
            short,
        ),
    ]
    res, ctxs = sorted({p["resolution"] for p in p2}), sorted({p["context"] for p in p2})
    hors = sorted({p["horizon"] for p in p1})
    mid_ctx, mid_res = ctxs[len(ctxs) // 2], res[len(res) // 2]
    figures = _pair(
        f"{res[-1]}x{res[-1]} (ctx {mid_ctx})",
        "UNet2D",
        _pick(p2, resolution=res[-1], context=mid_ctx),
        _pick(p2, resolution=res[0], context=mid_ctx),
        f"{res[0]}x{res[0]} (ctx {mid_ctx})",
    )
    figures += _pair(
        f"ctx {ctxs[-1]} ({mid_res}x{mid_res})",
        "UNet2D",
        _pick(p2, resolution=mid_res, context=ctxs[-1]),
        _pick(p2, resolution=mid_res, context=ctxs[0]),
        f"ctx {ctxs[0]} ({mid_res}x{mid_res})",
    )
    for variant in ("FiLM", "FiLM + cross-attn"):
        figures += _pair(
            f"{variant}, horizon {hors[-1]}",
            "UNet1D",
            _pick(p1, variant=variant, horizon=hors[-1]),
            _pick(p1, variant=variant, horizon=hors[0]),
            f"horizon {hors[0]}",
        )
    details = {"peak_memory_method": method, "unet2d": {"points": p2}, "unet1d": {"points": p1}}
    notes = [
        f"ratios here: the largest size against the smallest (the alternative is the smaller input); "
        f"peak memory: {method}"
    ]
    return SuiteResult(
        "scaling",
        "scaling with input size and context length",
        figures,
        details=details,
        notes=notes,
        files=[str(f) for f in files],
    )
