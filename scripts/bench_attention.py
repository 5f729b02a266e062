"""Benchmark mmx CrossAttention against the alternatives, on the current device.

(a) mmx ``CrossAttention``; (b) the explicit matmul-softmax-matmul of tutorials; (c) diffusers'
``Attention`` loaded with identical weights; (d) bare ``scaled_dot_product_attention`` on the same
projected q, k, v plus the same projections. All four share one set of weights, and their outputs
are checked equal before anything is timed. Prints a table and writes JSON.

    python scripts/bench_attention.py --json bench_attention.json
    python scripts/bench_attention.py --quick          # smaller shapes, for a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from _machine import device_name  # scripts/ is on sys.path when a script runs

from mmx import CrossAttention

IMPLS = {
    "a": "mmx CrossAttention",
    "b": "explicit softmax(QK^T)V",
    "c": "diffusers Attention",
    "d": "bare SDPA + projections",
}
# name: (B, L, S, cross?, masked?)
CASES = {
    "cross L=1024 S=77": (8, 1024, 77, True, False),
    "cross L=1024 S=77 +mask": (8, 1024, 77, True, True),
    "self L=S=1024": (8, 1024, 1024, False, False),
    "self L=S=4096 B=1": (1, 4096, 4096, False, False),
}
QUICK = {
    "cross L=1024 S=77": (2, 256, 77, True, False),
    "cross L=1024 S=77 +mask": (2, 256, 77, True, True),
    "self L=S=1024": (2, 256, 256, False, False),
    "self L=S=4096 B=1": (1, 512, 512, False, False),
}
HEADS, DIM_HEAD, QUERY_DIM, CONTEXT_DIM = 8, 16, 128, 512


def build(cross: bool, device: torch.device) -> dict[str, Callable]:
    """The four implementations, sharing the weights of one mmx module."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    mmx_attn = CrossAttention(QUERY_DIM, CONTEXT_DIM if cross else None, heads=HEADS, dim_head=DIM_HEAD).to(device)
    theirs = Attention(QUERY_DIM, CONTEXT_DIM if cross else None, heads=HEADS, dim_head=DIM_HEAD, bias=False, out_bias=True)
    theirs.load_state_dict(mmx_attn.state_dict())
    theirs.to(device)

    def project(x, ctx):
        src = x if ctx is None else ctx
        b, l, s = x.shape[0], x.shape[1], src.shape[1]
        q = mmx_attn.to_q(x).view(b, l, HEADS, DIM_HEAD).transpose(1, 2)  # (B, H, L, Dh)
        k = mmx_attn.to_k(src).view(b, s, HEADS, DIM_HEAD).transpose(1, 2)  # (B, H, S, Dh)
        v = mmx_attn.to_v(src).view(b, s, HEADS, DIM_HEAD).transpose(1, 2)  # (B, H, S, Dh)
        return q, k, v

    def finish(out, b, l):
        return mmx_attn.to_out(out.transpose(1, 2).reshape(b, l, HEADS * DIM_HEAD))

    def explicit(x, ctx, mask):
        q, k, v = project(x, ctx)
        scores = q @ k.transpose(-1, -2) * DIM_HEAD**-0.5  # (B, H, L, S)
        if mask is not None:
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
        return finish(scores.softmax(-1) @ v, x.shape[0], x.shape[1])

    def bare(x, ctx, mask):
        q, k, v = project(x, ctx)
        m = None if mask is None else mask[:, None, None, :]
        return finish(F.scaled_dot_product_attention(q, k, v, attn_mask=m), x.shape[0], x.shape[1])

    def diffusers_attn(x, ctx, mask):
        if mask is not None:
            return None  # its mask convention differs; compared unmasked only
        return theirs(x, encoder_hidden_states=ctx)

    return {
        "a": lambda x, ctx, mask: mmx_attn(x, ctx, mask=mask),
        "b": explicit,
        "c": diffusers_attn,
        "d": bare,
        "_params": list(mmx_attn.parameters()) + list(theirs.parameters()),
    }


def inputs(case, device, grad=False):
    b, l, s, cross, masked = case
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(b, l, QUERY_DIM, generator=g).to(device).requires_grad_(grad)
    ctx = torch.randn(b, s, CONTEXT_DIM, generator=g).to(device).requires_grad_(grad) if cross else None
    mask = None
    if masked:
        lengths = torch.randint(s // 4, s + 1, (b,), generator=g)
        mask = (torch.arange(s)[None] < lengths[:, None]).to(device)
    return x, ctx, mask


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_once(fn, x, ctx, mask, backward):
    if backward:
        out = fn(x, ctx, mask)
        out.sum().backward()
    else:
        with torch.no_grad():
            fn(x, ctx, mask)


def time_all(impls, case, device, backward, repeats):
    """Median seconds per call for each implementation.

    Each sample times ``inner`` back-to-back calls (enough for ~50 ms), and the implementations
    take turns in a rotating order, so drift of the machine is shared by all of them.
    """
    x, ctx, mask = inputs(case, device, grad=backward)
    names = [n for n in "abcd" if not (n == "c" and mask is not None)]
    times = {n: [] for n in names}
    inner = {}
    for n in names:  # warm-up, and how many calls make one sample
        run_once(impls[n], x, ctx, mask, backward)
        sync(device)
        start = time.perf_counter()
        run_once(impls[n], x, ctx, mask, backward)
        sync(device)
        inner[n] = max(1, min(20, int(0.05 / max(time.perf_counter() - start, 1e-6))))
    for r in range(repeats):
        for n in names[r % len(names):] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(inner[n]):
                run_once(impls[n], x, ctx, mask, backward)
            sync(device)
            times[n].append((time.perf_counter() - start) / inner[n])
    return {n: statistics.median(t) for n, t in times.items()}


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory_here(impl: str, case_name: str, backward: bool, quick: bool) -> float:
    """Peak extra memory (MiB) of one call, measured in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    case = (QUICK if quick else CASES)[case_name]
    fn = build(case[3], device)[impl]
    x, ctx, mask = inputs(case, device, grad=backward)
    run_once(fn, x, ctx, mask, backward)  # warm-up: kernels, allocator
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(fn, x, ctx, mask, backward)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak-RSS mark (VmHWM)
    base = _rss_kib("VmRSS:")
    run_once(fn, x, ctx, mask, backward)
    return (_rss_kib("VmHWM:") - base) / 1024


def peak_memory(impl, case_name, backward, quick):
    """Measure in a fresh process, so no earlier allocation hides or inflates the peak."""
    cmd = [sys.executable, __file__, "--_memory", impl, case_name, str(int(backward))] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        impl, case_name, backward = args._memory
        print(peak_memory_here(impl, case_name, bool(int(backward)), args.quick))
        return

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = QUICK if args.quick else CASES
    repeats = args.repeats or (3 if args.quick else 10)
    import diffusers

    meta = {
        "date": dt.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "heads": HEADS,
        "dim_head": DIM_HEAD,
        "query_dim": QUERY_DIM,
        "context_dim": CONTEXT_DIM,
        "command": " ".join(["python", *sys.argv]),
    }
    print(f"# attention benchmark: {meta['device']}, torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['date']}")
    print(f"# heads={HEADS} dim_head={DIM_HEAD} query_dim={QUERY_DIM} context_dim={CONTEXT_DIM}; median of {repeats}")
    results = []
    for case_name, case in cases.items():
        impls = build(case[3], device)
        x, ctx, mask = inputs(case, device)
        with torch.no_grad():
            ref = impls["a"](x, ctx, mask)
            outs = {n: impls[n](x, ctx, mask) for n in "bcd"}
            diffs = {n: (out - ref).abs().max().item() for n, out in outs.items() if out is not None}
        fwd = time_all(impls, case, device, False, repeats)
        fwdbwd = time_all(impls, case, device, True, max(3, repeats // 2))
        mem_case = case_name.startswith("self L=S=4096") or device.type == "cuda"
        for n in fwd:
            row = {
                "case": case_name, "impl": n, "name": IMPLS[n],
                "B": case[0], "L": case[1], "S": case[2],
                "max_abs_diff_vs_a": diffs.get(n, 0.0),
                "fwd_ms": fwd[n] * 1e3, "fwd_bwd_ms": fwdbwd[n] * 1e3,
                "peak_fwd_mib": peak_memory(n, case_name, False, args.quick) if mem_case else None,
                "peak_fwd_bwd_mib": peak_memory(n, case_name, True, args.quick) if mem_case else None,
            }
            results.append(row)
            mem = "" if row["peak_fwd_mib"] is None else f"{row['peak_fwd_mib']:10.1f} {row['peak_fwd_bwd_mib']:10.1f}"
            print(
                f"{case_name:26s} ({n}) {IMPLS[n]:26s} diff {row['max_abs_diff_vs_a']:.1e} "
                f"fwd {row['fwd_ms']:9.2f} ms  fwd+bwd {row['fwd_bwd_ms']:9.2f} ms  {mem}",
                flush=True,
            )

    def get(case, impl, key):
        return next(r[key] for r in results if r["case"] == case and r["impl"] == impl)

    names = list(cases)
    cross, self_, big = names[0], names[2], names[3]
    targets = [
        ("(a) within 1.10x of (d), fwd, every case", max(get(c, "a", "fwd_ms") / get(c, "d", "fwd_ms") for c in names), "<=", 1.10),
        ("(a) within 1.10x of (d), fwd+bwd, every case", max(get(c, "a", "fwd_bwd_ms") / get(c, "d", "fwd_bwd_ms") for c in names), "<=", 1.10),
        ("(b)/(a) fwd time, self L=S=1024", get(self_, "b", "fwd_ms") / get(self_, "a", "fwd_ms"), ">=", 2.0),
        ("(b)/(a) fwd+bwd time, self L=S=1024", get(self_, "b", "fwd_bwd_ms") / get(self_, "a", "fwd_bwd_ms"), ">=", 2.0),
        ("(a)/(b) peak fwd memory, L=S=4096", get(big, "a", "peak_fwd_mib") / get(big, "b", "peak_fwd_mib"), "<=", 0.5),
        ("(a)/(b) peak fwd+bwd memory, L=S=4096", get(big, "a", "peak_fwd_bwd_mib") / get(big, "b", "peak_fwd_bwd_mib"), "<=", 0.5),
        ("(a)/(c) fwd time, cross", get(cross, "a", "fwd_ms") / get(cross, "c", "fwd_ms"), "<=", 1.0),
        ("(a)/(c) fwd time, self", get(self_, "a", "fwd_ms") / get(self_, "c", "fwd_ms"), "<=", 1.0),
    ]
    print("\n# targets")
    summary = []
    for label, value, op, bound in targets:
        ok = value <= bound if op == "<=" else value >= bound
        summary.append({"target": label, "value": value, "op": op, "bound": bound, "met": ok})
        print(f"{'MET ' if ok else 'MISS'} {label}: {value:.3f} (target {op} {bound})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": results, "targets": summary}, f, indent=2)
        print(f"# wrote {os.path.abspath(args.json)}")


if __name__ == "__main__":
    main()
