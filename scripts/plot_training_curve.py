"""Held-out caption accuracy against wall-clock training time, from a run's metrics.jsonl.

    python scripts/plot_training_curve.py runs/shapes_t2i [runs/other_seed ...] --out benchmarks/shapes_t2i_curve.png

Prints a Markdown table (step, training minutes, accuracy) per run and writes the PNG, one line a run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--target", type=float, default=0.9)
    args = parser.parse_args()
    curves = {}
    names = [run.name for run in args.runs]
    for run in args.runs:
        path = run / "metrics.jsonl"
        if not path.is_file():
            raise SystemExit(f"error: {path} not found (validation writes it during `mmx train`)")
        rows = curves[run.name if names.count(run.name) == 1 else str(run)] = [
            json.loads(line) for line in path.read_text().splitlines() if line.strip()
        ]
        print(f"{run}:\n| step | training time (min) | held-out caption accuracy |\n|---:|---:|---:|")
        for r in rows:
            print(f"| {r['step']} | {r['train_seconds'] / 60:.1f} | {r['caption_accuracy']:.1%} |")
        first = next((r for r in rows if r["caption_accuracy"] >= args.target), None)
        print(
            f"\nfirst >= {args.target:.0%}: "
            + (f"step {first['step']} after {first['train_seconds'] / 60:.1f} min" if first else "not reached")
            + "\n"
        )
    if args.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for name, rows in curves.items():
            ax.plot(
                [r["train_seconds"] / 60 for r in rows], [100 * r["caption_accuracy"] for r in rows], "o-", label=name
            )
        ax.axhline(100 * args.target, color="grey", ls="--", lw=1, label=f"target {args.target:.0%}")
        ax.set_xlabel("training time (minutes, validation excluded)")
        ax.set_ylabel("held-out caption accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title("accuracy on captions never seen in training")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        fig.tight_layout()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.out, dpi=110)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
