"""Benchmark mmx CrossAttention against the alternatives, on the current device.

(a) mmx ``CrossAttention``; (b) the explicit matmul-softmax-matmul of tutorials; (c) diffusers'
``Attention`` loaded with identical weights; (d) bare ``scaled_dot_product_attention`` on the same
projected q, k, v plus the same projections. All four share one set of weights, and their outputs
are checked equal before anything is timed. Prints a table and writes JSON. The code lives in
``mmx.bench.attention`` (also run by ``mmx bench attention``).

    python scripts/bench_attention.py --json bench_attention.json
    python scripts/bench_attention.py --quick          # smaller shapes, for a smoke run
"""

from __future__ import annotations

import argparse
import os

import torch
from _machine import save_json  # scripts/ is on sys.path when a script runs

from mmx.bench.attention import measure, peak_memory_here


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default=None, help="write results here")
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args._memory:
        impl, case_name, backward = args._memory
        print(peak_memory_here(impl, case_name, bool(int(backward)), args.quick, device))
        return
    result = measure(quick=args.quick, repeats=args.repeats, device=device, log=print)
    save_json(result, args.json and os.path.abspath(args.json))


if __name__ == "__main__":
    main()
