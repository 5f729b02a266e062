"""Held-out caption accuracy of text-to-image evaluations, split by the held-out pair each caption names.

    python scripts/t2i_by_pair.py runs/t2i_v14/eval256 runs/t2i_s1/eval256 [...]

Each argument is an ``mmx eval --out`` folder inside its run folder: its ``eval.json`` holds the
captions and verdicts, the run's ``config.yaml`` one level up the held-out pairs. Prints a markdown
table: captions right / captions naming each held-out pair (a caption naming two counts for both),
then the captions naming no pair with a channel gap (:meth:`mmx.data.ShapesDataset.channel_gaps`:
a held-out colour that lights an RGB channel no training object of that shape lights).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mmx.config import load_config
from mmx.data import DATASETS
from mmx.eval import accuracy_by_pair, parse_caption
from mmx.train.text_to_image import TextToImageConfig


def by_pair(eval_dir: Path) -> tuple[dict[str, tuple[int, int]], tuple[int, int], dict]:
    """Per held-out pair (right, total); (right, total) over captions naming no channel-gap pair; the gaps."""
    report_path, config_path = eval_dir / "eval.json", eval_dir.parent / "config.yaml"
    for path in (report_path, config_path):
        if not path.is_file():
            raise SystemExit(f"error: {path} not found; pass the --out folder of `mmx eval` inside a run folder")
    report = json.loads(report_path.read_text())
    data = DATASETS.build_from_dict(dict(load_config(config_path, TextToImageConfig).eval.data))
    prompts, correct = report["prompts"], report["correct"]
    pairs = accuracy_by_pair(prompts, correct, data.heldout_colour_shape, data.heldout_shape_position)
    gaps = data.channel_gaps()
    clear = [ok for caption, ok in zip(prompts, correct)
             if not any((c.colour, c.shape) in gaps for c in parse_caption(caption))]
    return pairs, (sum(clear), len(clear)), gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("eval_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    for eval_dir in args.eval_dirs:
        pairs, (right, total), gaps = by_pair(eval_dir)
        cells = " | ".join(f"{name} {r}/{t}" for name, (r, t) in pairs.items())
        share = f"{right / total:.1%}" if total else "n/a"
        gap_names = ", ".join(f"{c} {s} ({ch})" for (c, s), ch in gaps.items()) or "none"
        print(f"| {eval_dir} | {cells} | {right}/{total} ({share}) without a channel-gap pair [{gap_names}] |")


if __name__ == "__main__":
    main()
