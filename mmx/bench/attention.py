"""mmx ``CrossAttention`` against the alternatives, on one device.

(a) mmx ``CrossAttention``; (b) the explicit matmul-softmax-matmul of tutorials; (c) diffusers'
``Attention`` loaded with identical weights; (d) bare ``scaled_dot_product_attention`` on the same
projected q, k, v plus the same projections. All four share one set of weights, and their outputs
are checked equal before anything is timed. Peak memory is measured in a fresh process per cell
(``python -m mmx.bench.attention --_memory ...``), so no earlier allocation hides or inflates it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from mmx import CrossAttention
from mmx.bench.memory import PeakMemory, memory_method
from mmx.bench.report import Figure, Log, SuiteResult, log_info
from mmx.bench.timing import _sync, device_name

__all__ = ["CASES", "IMPLS", "QUICK", "build", "measure", "peak_memory", "suite"]

IMPLS = {
    "a": "mmx CrossAttention",
    "b": "explicit softmax(QK^T)V",
    "c": "diffusers Attention",
    "d": "bare SDPA + projections",
}
Case = tuple[int, int, int, bool, bool]
# name: (B, L, S, cross?, masked?)
CASES: dict[str, Case] = {
    "cross L=1024 S=77": (8, 1024, 77, True, False),
    "cross L=1024 S=77 +mask": (8, 1024, 77, True, True),
    "self L=S=1024": (8, 1024, 1024, False, False),
    "self L=S=4096 B=1": (1, 4096, 4096, False, False),
}
QUICK: dict[str, Case] = {
    "cross L=1024 S=77": (2, 256, 77, True, False),
    "cross L=1024 S=77 +mask": (2, 256, 77, True, True),
    "self L=S=1024": (2, 256, 256, False, False),
    "self L=S=4096 B=1": (1, 512, 512, False, False),
}
HEADS, DIM_HEAD, QUERY_DIM, CONTEXT_DIM = 8, 16, 128, 512


def build(cross: bool, device: torch.device) -> dict[str, Any]:
    """The four implementations, sharing the weights of one mmx module."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    mmx_attn = CrossAttention(QUERY_DIM, CONTEXT_DIM if cross else None, heads=HEADS, dim_head=DIM_HEAD).to(device)
    theirs = Attention(
        QUERY_DIM, CONTEXT_DIM if cross else None, heads=HEADS, dim_head=DIM_HEAD, bias=False, out_bias=True
    )
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


def inputs(case: Case, device: torch.device, grad: bool = False):
    """``(x, context or None, mask or None)`` of a case, the same on every call."""
    b, l, s, cross, masked = case
    g = torch.Generator(device="cpu").manual_seed(1)
    x = torch.randn(b, l, QUERY_DIM, generator=g).to(device).requires_grad_(grad)
    ctx = torch.randn(b, s, CONTEXT_DIM, generator=g).to(device).requires_grad_(grad) if cross else None
    mask = None
    if masked:
        lengths = torch.randint(s // 4, s + 1, (b,), generator=g)
        mask = (torch.arange(s)[None] < lengths[:, None]).to(device)
    return x, ctx, mask


def run_once(fn: Callable, x, ctx, mask, backward: bool) -> None:
    """One call (forward, or forward + backward of the output's sum)."""
    if backward:
        out = fn(x, ctx, mask)
        out.sum().backward()
    else:
        with torch.no_grad():
            fn(x, ctx, mask)


def time_all(impls: dict, case: Case, device: torch.device, backward: bool, repeats: int) -> dict[str, float]:
    """Median seconds per call for each implementation.

    Each sample times ``inner`` back-to-back calls (enough for ~50 ms), and the implementations
    take turns in a rotating order, so drift of the machine is shared by all of them.
    """
    x, ctx, mask = inputs(case, device, grad=backward)
    names = [n for n in "abcd" if not (n == "c" and mask is not None)]
    times: dict[str, list[float]] = {n: [] for n in names}
    inner = {}
    for n in names:  # warm-up, and how many calls make one sample
        run_once(impls[n], x, ctx, mask, backward)
        _sync(device)
        start = time.perf_counter()
        run_once(impls[n], x, ctx, mask, backward)
        _sync(device)
        inner[n] = max(1, min(20, int(0.05 / max(time.perf_counter() - start, 1e-6))))
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            start = time.perf_counter()
            for _ in range(inner[n]):
                run_once(impls[n], x, ctx, mask, backward)
            _sync(device)
            times[n].append((time.perf_counter() - start) / inner[n])
    return {n: statistics.median(t) for n, t in times.items()}


def peak_memory_here(impl: str, case_name: str, backward: bool, quick: bool, device: torch.device) -> float | None:
    """Peak extra memory (MiB) of one call, measured in this process (None: no method here)."""
    case = (QUICK if quick else CASES)[case_name]
    fn = build(case[3], device)[impl]
    x, ctx, mask = inputs(case, device, grad=backward)
    run_once(fn, x, ctx, mask, backward)  # warm-up: kernels, allocator
    with PeakMemory(device) as peak:
        run_once(fn, x, ctx, mask, backward)
    return peak.mib


def peak_memory(impl: str, case_name: str, backward: bool, quick: bool, device: torch.device) -> float | None:
    """Measure in a fresh process, so no earlier allocation hides or inflates the peak."""
    cmd = [
        sys.executable,
        "-m",
        "mmx.bench.attention",
        "--_memory",
        impl,
        case_name,
        str(int(backward)),
        "--device",
        device.type,
    ] + (["--quick"] if quick else [])
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"the memory probe {' '.join(cmd[1:])} failed: {out.stderr.strip()[-1000:]}")
    last = out.stdout.strip().splitlines()[-1]
    return None if last == "none" else float(last)


def measure(
    quick: bool = False,
    repeats: int | None = None,
    device: torch.device | None = None,
    memory: bool = True,
    command: str | None = None,
    log: Log = log_info,
) -> dict[str, Any]:
    """Time (and measure the memory of) the four implementations on every case.

    Args:
        quick: the small shapes of :data:`QUICK` instead of :data:`CASES`.
        repeats: samples per median (default 3 quick, else 10; forward+backward takes half, at least 3).
        device: default CUDA when available.
        memory: measure peak memory (on the CPU only for the largest case; fresh processes).
        command: recorded in the meta data (default: this process's command line).
        log: where the progress lines go.

    Returns:
        ``{"meta", "results": one row per (case, implementation), "targets": the issue's targets}``.
    """
    import diffusers

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cases = QUICK if quick else CASES
    repeats = repeats or (3 if quick else 10)
    meta = {
        "date": dt.date.today().isoformat(),
        "device": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "heads": HEADS,
        "dim_head": DIM_HEAD,
        "query_dim": QUERY_DIM,
        "context_dim": CONTEXT_DIM,
        "peak_memory_method": memory_method(device) if memory else None,
        "command": command or " ".join(["python", *sys.argv]),
    }
    log(
        f"# attention benchmark: {meta['device']}, torch {meta['torch']}, diffusers {meta['diffusers']}, {meta['date']}"
    )
    log(f"# heads={HEADS} dim_head={DIM_HEAD} query_dim={QUERY_DIM} context_dim={CONTEXT_DIM}; median of {repeats}")
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
        mem_case = memory and (case_name.startswith("self L=S=4096") or device.type == "cuda")
        for n in fwd:
            row = {
                "case": case_name,
                "impl": n,
                "name": IMPLS[n],
                "B": case[0],
                "L": case[1],
                "S": case[2],
                "max_abs_diff_vs_a": diffs.get(n, 0.0),
                "fwd_ms": fwd[n] * 1e3,
                "fwd_bwd_ms": fwdbwd[n] * 1e3,
                "peak_fwd_mib": peak_memory(n, case_name, False, quick, device) if mem_case else None,
                "peak_fwd_bwd_mib": peak_memory(n, case_name, True, quick, device) if mem_case else None,
            }
            results.append(row)
            mem = "" if row["peak_fwd_mib"] is None else f"{row['peak_fwd_mib']:10.1f} {row['peak_fwd_bwd_mib']:10.1f}"
            log(
                f"{case_name:26s} ({n}) {IMPLS[n]:26s} diff {row['max_abs_diff_vs_a']:.1e} "
                f"fwd {row['fwd_ms']:9.2f} ms  fwd+bwd {row['fwd_bwd_ms']:9.2f} ms  {mem}"
            )
    summary = _targets(results, list(cases))
    log("\n# targets")
    for t in summary:
        value = "n/a" if t["value"] is None else f"{t['value']:.3f}"
        state = "n/a " if t["met"] is None else "MET " if t["met"] else "MISS"
        log(f"{state} {t['target']}: {value} (target {t['op']} {t['bound']})")
    return {"meta": meta, "results": results, "targets": summary}


def _get(results: list[dict], case: str, impl: str, key: str) -> float | None:
    return next(r[key] for r in results if r["case"] == case and r["impl"] == impl)


def _ratio(results: list[dict], case: str, impl: str, over: str, key: str) -> float | None:
    num, den = _get(results, case, impl, key), _get(results, case, over, key)
    return None if num is None or not den else num / den


def _targets(results: list[dict], names: list[str]) -> list[dict[str, Any]]:
    """The issue's targets for the attention, each with its measured value and whether it is met."""
    cross, self_, big = names[0], names[2], names[3]
    targets = [
        (
            "(a) within 1.10x of (d), fwd, every case",
            max(_ratio(results, c, "a", "d", "fwd_ms") for c in names),
            "<=",
            1.10,
        ),
        (
            "(a) within 1.10x of (d), fwd+bwd, every case",
            max(_ratio(results, c, "a", "d", "fwd_bwd_ms") for c in names),
            "<=",
            1.10,
        ),
        ("(b)/(a) fwd time, self L=S=1024", _ratio(results, self_, "b", "a", "fwd_ms"), ">=", 2.0),
        ("(b)/(a) fwd+bwd time, self L=S=1024", _ratio(results, self_, "b", "a", "fwd_bwd_ms"), ">=", 2.0),
        ("(a)/(b) peak fwd memory, L=S=4096", _ratio(results, big, "a", "b", "peak_fwd_mib"), "<=", 0.5),
        ("(a)/(b) peak fwd+bwd memory, L=S=4096", _ratio(results, big, "a", "b", "peak_fwd_bwd_mib"), "<=", 0.5),
        ("(a)/(c) fwd time, cross", _ratio(results, cross, "a", "c", "fwd_ms"), "<=", 1.0),
        ("(a)/(c) fwd time, self", _ratio(results, self_, "a", "c", "fwd_ms"), "<=", 1.0),
    ]
    summary = []
    for label, value, op, bound in targets:
        met = None if value is None else value <= bound if op == "<=" else value >= bound
        summary.append({"target": label, "value": value, "op": op, "bound": bound, "met": met})
    return summary


def suite(device: torch.device, quick: bool = False, log: Log = log_info) -> SuiteResult:
    """``mmx bench attention``: (a) against (b), (c) and (d), forward on every case, forward+backward
    on self-attention L=S=1024, and peak memory against (b) at L=S=4096 (not with ``quick``)."""
    data = measure(quick=quick, repeats=1 if quick else 5, device=device, memory=not quick, command="", log=log)
    rows = data["results"]
    figures = []
    for case in QUICK if quick else CASES:
        for other in "cbd":
            if any(r["case"] == case and r["impl"] == other for r in rows):
                figures.append(
                    Figure(
                        f"fwd, {case}",
                        _get(rows, case, "a", "fwd_ms"),
                        IMPLS[other],
                        _get(rows, case, other, "fwd_ms"),
                        "ms",
                    )
                )
    self_ = list(QUICK if quick else CASES)[2]
    for other in "cbd":
        figures.append(
            Figure(
                f"fwd+bwd, {self_}",
                _get(rows, self_, "a", "fwd_bwd_ms"),
                IMPLS[other],
                _get(rows, self_, other, "fwd_bwd_ms"),
                "ms",
            )
        )
    big = list(QUICK if quick else CASES)[3]
    for key, what in (("peak_fwd_mib", "peak memory fwd"), ("peak_fwd_bwd_mib", "peak memory fwd+bwd")):
        if _get(rows, big, "a", key) is not None and _get(rows, big, "b", key):
            figures.append(
                Figure(f"{what}, {big}", _get(rows, big, "a", key), IMPLS["b"], _get(rows, big, "b", key), "MiB")
            )
    worst = max(r["max_abs_diff_vs_a"] for r in rows)
    notes = [
        f"heads={HEADS} dim_head={DIM_HEAD} query_dim={QUERY_DIM} context_dim={CONTEXT_DIM}; all four agree "
        f"to {worst:.1e}; diffusers' mask convention differs, so it is left out of the masked case"
    ]
    return SuiteResult("attention", "CrossAttention against its alternatives", figures, details=data, notes=notes)


def _memory_child(argv: list[str]) -> None:
    """``python -m mmx.bench.attention --_memory IMPL CASE BACKWARD [--device D] [--quick]``: prints MiB."""
    parser = argparse.ArgumentParser(prog="python -m mmx.bench.attention")
    parser.add_argument("--_memory", nargs=3, required=True, metavar=("IMPL", "CASE", "BACKWARD"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    impl, case_name, backward = args._memory
    mib = peak_memory_here(impl, case_name, bool(int(backward)), args.quick, torch.device(args.device))
    print("none" if mib is None else mib)  # noqa: T201 (the parent process reads this line)


if __name__ == "__main__":
    _memory_child(sys.argv[1:])
