"""Train-step time of mmx UNet2D against diffusers' UNet2DConditionModel, and sampling throughput.

Both UNets get the same channels, levels, residual blocks per level, attention placement, heads and
head width (heads * dim_head = the channels of every attention level, which is diffusers' rule), the
same text context, batch and optimiser. Prints a table and writes JSON. The code lives in
``mmx.bench.unet2d`` (also run by ``mmx bench unet2d`` and ``mmx bench sample``).

    python scripts/bench_unet2d.py --json benchmarks/unet2d-cpu.json
"""

from __future__ import annotations

import argparse

from _machine import save_json  # scripts/ is on sys.path when a script runs

from mmx.bench.unet2d import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--sample-batch", type=int, default=16)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    result = measure(batch=args.batch, size=args.size, repeats=args.repeats, sample_batch=args.sample_batch, log=print)
    save_json(result, args.json)


if __name__ == "__main__":
    main()
