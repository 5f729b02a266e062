"""mmx UNet1D against an independent rebuild of Diffusion Policy's ConditionalUnet1D.

Both models get the same constructor arguments and the same weights (UNet1D loads the rebuild's
state_dict with ``strict=True``); their outputs are checked to agree first, then forward+backward
and forward-only are timed (median of ``repeats`` after ``warmup``, the models alternating so that
load on the machine hits both alike), and for information the cross-attention variant (a context of
``tokens`` tokens).
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mmx import Context
from mmx.bench.report import Figure, Log, SuiteResult, log_info, plain
from mmx.bench.timing import device_name, time_calls
from mmx.bench.upstream_unet1d import UpstreamUnet1D

__all__ = ["UNet1DConfig", "measure", "suite"]


@dataclass
class UNet1DConfig:
    """The compared architecture and the batch (scripts/bench_unet1d.py's options)."""

    input_dim: int = 2
    global_cond_dim: int = 64
    dsed: int = 128
    down_dims: list[int] = field(default_factory=lambda: [128, 256, 512])
    kernel_size: int = 5
    horizon: int = 16
    batch: int = 256
    tokens: int = 10
    context_dim: int = 64

    def arch(self) -> dict[str, Any]:
        """Constructor arguments shared by both models."""
        return dict(
            input_dim=self.input_dim,
            global_cond_dim=self.global_cond_dim,
            diffusion_step_embed_dim=self.dsed,
            down_dims=tuple(self.down_dims),
            kernel_size=self.kernel_size,
            n_groups=8,
            cond_predict_scale=True,
        )


def measure(
    config: UNet1DConfig | None = None,
    warmup: int = 3,
    repeats: int = 10,
    device: torch.device | None = None,
    command: str | None = None,
    log: Log = log_info,
) -> dict[str, Any]:
    """Check equal outputs, then time the rebuild, mmx UNet1D and mmx UNet1D + cross-attention.

    Raises:
        ValueError: the outputs of mmx and the rebuild differ by more than 1e-4.

    Returns:
        ``{"meta", "results": per model, "ratio_fwd_bwd_mmx_over_upstream", "ratio_fwd_mmx_over_upstream",
        "max_abs_diff", "max_abs_diff_xattn"}`` (the JSON of scripts/bench_unet1d.py).
    """
    from mmx.models import UNet1D

    c = config or UNet1DConfig()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    arch = c.arch()
    torch.manual_seed(0)
    upstream = UpstreamUnet1D(**arch).to(device)
    mmx = UNet1D(**arch).to(device)
    mmx.load_state_dict(upstream.state_dict(), strict=True)
    xattn = UNet1D(**arch, context_dim=c.context_dim, heads=4, dim_head=32).to(device)
    xattn.load_state_dict(upstream.state_dict(), strict=False)  # only the new cross_attn.* are missing

    b = c.batch
    x = torch.randn(b, c.horizon, c.input_dim, device=device)
    t = torch.randint(0, 100, (b,), device=device)
    g = torch.randn(b, c.global_cond_dim, device=device)
    ctx = Context(
        tokens=torch.randn(b, c.tokens, c.context_dim, device=device),
        mask=torch.ones(b, c.tokens, dtype=torch.bool, device=device),
    )
    with torch.no_grad():
        want = upstream(x, t, g)
        diff = (mmx(x, t, pooled=g) - want).abs().max().item()
        diff_xattn = (xattn(x, t, ctx, pooled=g) - want).abs().max().item()
    if diff > 1e-4 or diff_xattn > 1e-4:
        raise ValueError(
            f"outputs differ from the upstream rebuild: max |diff| {diff:.2e} (FiLM), {diff_xattn:.2e} (xattn)"
        )

    def train(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            out = fn()
            out.square().mean().backward()

        return step

    def infer(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
        def step() -> None:
            with torch.no_grad():
                fn()

        return step

    calls = {
        "upstream": lambda: upstream(x, t, g),
        "mmx": lambda: mmx(x, t, pooled=g),
        "mmx + cross-attn": lambda: xattn(x, t, ctx, pooled=g),
    }
    fwd_bwd = time_calls({k: train(f) for k, f in calls.items()}, warmup, repeats, device)
    fwd = time_calls({k: infer(f) for k, f in calls.items()}, warmup, repeats, device)
    models = {"upstream": upstream, "mmx": mmx, "mmx + cross-attn": xattn}

    log(
        f"# UNet1D B={b} T={c.horizon} down_dims={tuple(c.down_dims)} on {device}, "
        f"{torch.get_num_threads()} threads; median of {repeats}"
    )
    log(f"{'model':18s} {'params':>8s} {'fwd+bwd ms':>11s} {'fwd ms':>9s}")
    rows = []
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            {"model": name, "params_m": params / 1e6, "fwd_bwd_ms": fwd_bwd[name] * 1e3, "fwd_ms": fwd[name] * 1e3}
        )
        log(f"{name:18s} {params / 1e6:7.2f}M {fwd_bwd[name] * 1e3:11.2f} {fwd[name] * 1e3:9.2f}")
    ratio = fwd_bwd["mmx"] / fwd_bwd["upstream"]
    ratio_fwd = fwd["mmx"] / fwd["upstream"]
    log(f"mmx / upstream fwd+bwd: {ratio:.3f} (target <= 1.0); fwd: {ratio_fwd:.3f}; max |out diff| {diff:.1e}")
    cfg = asdict(c)
    return {
        "meta": {
            "date": dt.date.today().isoformat(),
            "torch": torch.__version__,
            "device": device_name(device),
            "arch": plain(arch),
            "batch": b,
            "horizon": cfg["horizon"],
            "tokens": cfg["tokens"],
            "context_dim": cfg["context_dim"],
            "warmup": warmup,
            "repeats": repeats,
            "command": command or " ".join(["python", *sys.argv]),
        },
        "results": rows,
        "ratio_fwd_bwd_mmx_over_upstream": ratio,
        "ratio_fwd_mmx_over_upstream": ratio_fwd,
        "max_abs_diff": diff,
        "max_abs_diff_xattn": diff_xattn,
    }


def suite(device: torch.device, quick: bool = False, log: Log = log_info) -> SuiteResult:
    """``mmx bench unet1d``: mmx UNet1D against the upstream rebuild, forward+backward and forward."""
    if quick:
        config, warmup, repeats = (
            UNet1DConfig(down_dims=[16, 32], dsed=16, global_cond_dim=6, batch=4, horizon=8, context_dim=8, tokens=3),
            1,
            1,
        )
    else:
        config, warmup, repeats = UNet1DConfig(), 2, 7
    data = measure(config, warmup, repeats, device, command="", log=log)
    by = {r["model"]: r for r in data["results"]}
    up = "upstream ConditionalUnet1D rebuild"
    shape = f"B={config.batch}, T={config.horizon}"
    figures = [
        Figure(f"fwd+bwd, FiLM, {shape}", by["mmx"]["fwd_bwd_ms"], up, by["upstream"]["fwd_bwd_ms"], "ms"),
        Figure(f"fwd, FiLM, {shape}", by["mmx"]["fwd_ms"], up, by["upstream"]["fwd_ms"], "ms"),
        Figure(
            f"fwd+bwd, + cross-attn ({config.tokens} tokens), {shape}",
            by["mmx + cross-attn"]["fwd_bwd_ms"],
            up,
            by["upstream"]["fwd_bwd_ms"],
            "ms",
        ),
    ]
    notes = [
        f"down_dims {tuple(config.down_dims)}, same weights (strict load), outputs agree to "
        f"{data['max_abs_diff']:.1e}; "
        f"median of {repeats}, models alternating"
    ]
    return SuiteResult("unet1d", "UNet1D against the upstream construction", figures, details=data, notes=notes)
