"""Sampling time with the attention recorder on versus off, and the memory it holds.

The memory figure compares the recorder's running sums with what keeping every
(step, layer, head) map of the conditional rows would take on the same run. The code lives in
``mmx.bench.recorder`` (also run by ``mmx bench recorder``).

    python scripts/bench_recorder.py --run mmx/assets/shapes_t2i --json benchmarks/recorder-cpu.json
"""

from __future__ import annotations

import argparse

from _machine import save_json  # scripts/ is on sys.path when a script runs

from mmx.bench.recorder import measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="mmx/assets/shapes_t2i")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    save_json(measure(args.run, args.prompts, args.steps, args.repeats, log=print), args.json)


if __name__ == "__main__":
    main()
