"""Forward+backward time of mmx UNet1D against an independent rebuild of Diffusion Policy's ConditionalUnet1D.

Both models get the same constructor arguments and the same weights (UNet1D loads the rebuild's
state_dict with strict=True); the script first checks that their outputs agree, then times
forward+backward and forward-only (median of --repeats after --warmup, the two models alternating so
that load on the machine hits both alike), and for information the cross-attention variant (context
of --tokens tokens). Prints a table; --json writes the numbers. The code lives in
``mmx.bench.unet1d`` and the rebuild in ``mmx.bench.upstream_unet1d`` (also run by ``mmx bench unet1d``).

    python scripts/bench_unet1d.py --json benchmarks/unet1d-cpu.json
"""

from __future__ import annotations

import argparse

import torch
from _machine import measure_and_save  # scripts/ is on sys.path when a script runs

from mmx.bench.unet1d import UNet1DConfig, measure


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
    measure_and_save(measure, UNet1DConfig, args)


if __name__ == "__main__":
    main()
