"""Forward+backward time of mmx UNet1D against an independent rebuild of Diffusion Policy's ConditionalUnet1D.

Both models get the same constructor arguments and the same weights (UNet1D loads the rebuild's
state_dict with strict=True); the script first checks that their outputs agree, then times
forward+backward and forward-only (median of --repeats after --warmup, the two models alternating so
that load on the machine hits both alike), and for information the cross-attention variant (context
of --tokens tokens). Prints a table; --json writes the numbers.

    python scripts/bench_unet1d.py --json benchmarks/unet1d-cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

import torch
from _machine import device_name, time_calls  # scripts/ is on sys.path when a script runs

sys.path.insert(0, str(Path(__file__).parent))
from _upstream_unet1d import UpstreamUnet1D  # noqa: E402

from mmx import Context  # noqa: E402
from mmx.models import UNet1D  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-dim", type=int, default=2)
    parser.add_argument("--global-cond-dim", type=int, default=64)
    parser.add_argument("--dsed", type=int, default=128, help="diffusion_step_embed_dim")
    parser.add_argument("--down-dims", type=int, nargs="+", default=[128, 256, 512])
    parser.add_argument("--kernel-size", type=int, default=5)
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=10, help="context tokens of the cross-attention variant")
    parser.add_argument("--context-dim", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    arch = dict(input_dim=args.input_dim, global_cond_dim=args.global_cond_dim, diffusion_step_embed_dim=args.dsed,
                down_dims=tuple(args.down_dims), kernel_size=args.kernel_size, n_groups=8, cond_predict_scale=True)

    torch.manual_seed(0)
    upstream = UpstreamUnet1D(**arch).to(device)
    mmx = UNet1D(**arch).to(device)
    mmx.load_state_dict(upstream.state_dict(), strict=True)
    xattn = UNet1D(**arch, context_dim=args.context_dim, heads=4, dim_head=32).to(device)
    xattn.load_state_dict(upstream.state_dict(), strict=False)  # only the new cross_attn.* are missing

    b = args.batch
    x = torch.randn(b, args.horizon, args.input_dim, device=device)
    t = torch.randint(0, 100, (b,), device=device)
    g = torch.randn(b, args.global_cond_dim, device=device)
    ctx = Context(tokens=torch.randn(b, args.tokens, args.context_dim, device=device),
                  mask=torch.ones(b, args.tokens, dtype=torch.bool, device=device))
    with torch.no_grad():
        want = upstream(x, t, g)
        diff = (mmx(x, t, global_cond=g) - want).abs().max().item()
        diff_xattn = (xattn(x, t, ctx, global_cond=g) - want).abs().max().item()
    if diff > 1e-4 or diff_xattn > 1e-4:
        raise SystemExit(f"outputs differ from the upstream rebuild: max |diff| {diff:.2e} (FiLM), {diff_xattn:.2e} (xattn)")

    def train(fn):
        def step():
            out = fn()
            out.square().mean().backward()
        return step

    def infer(fn):
        def step():
            with torch.no_grad():
                fn()
        return step

    calls = {
        "upstream": lambda: upstream(x, t, g),
        "mmx": lambda: mmx(x, t, global_cond=g),
        "mmx + cross-attn": lambda: xattn(x, t, ctx, global_cond=g),
    }
    fwd_bwd = time_calls({k: train(f) for k, f in calls.items()}, args.warmup, args.repeats, device)
    fwd = time_calls({k: infer(f) for k, f in calls.items()}, args.warmup, args.repeats, device)
    models = {"upstream": upstream, "mmx": mmx, "mmx + cross-attn": xattn}

    print(f"# UNet1D B={b} T={args.horizon} down_dims={tuple(args.down_dims)} on {device}, "
          f"{torch.get_num_threads()} threads; median of {args.repeats}")
    print(f"{'model':18s} {'params':>8s} {'fwd+bwd ms':>11s} {'fwd ms':>9s}")
    rows = []
    for name, model in models.items():
        params = sum(p.numel() for p in model.parameters())
        rows.append({"model": name, "params_m": params / 1e6, "fwd_bwd_ms": fwd_bwd[name] * 1e3, "fwd_ms": fwd[name] * 1e3})
        print(f"{name:18s} {params / 1e6:7.2f}M {fwd_bwd[name] * 1e3:11.2f} {fwd[name] * 1e3:9.2f}")
    ratio = fwd_bwd["mmx"] / fwd_bwd["upstream"]
    ratio_fwd = fwd["mmx"] / fwd["upstream"]
    print(f"mmx / upstream fwd+bwd: {ratio:.3f} (target <= 1.0); fwd: {ratio_fwd:.3f}; max |out diff| {diff:.1e}")

    if args.json:
        result = {
            "meta": {"date": dt.date.today().isoformat(), "torch": torch.__version__,
                     "device": device_name(device),
                     "arch": {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()},
                     "batch": b, "horizon": args.horizon, "tokens": args.tokens, "context_dim": args.context_dim,
                     "warmup": args.warmup, "repeats": args.repeats, "command": " ".join(["python", *sys.argv])},
            "results": rows, "ratio_fwd_bwd_mmx_over_upstream": ratio, "ratio_fwd_mmx_over_upstream": ratio_fwd,
            "max_abs_diff": diff, "max_abs_diff_xattn": diff_xattn,
        }
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
