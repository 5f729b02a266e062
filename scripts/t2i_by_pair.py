"""Held-out caption accuracy of text-to-image evaluations, split by the held-out pair each caption names.

    python scripts/t2i_by_pair.py runs/t2i_v14/eval256 runs/t2i_s1/eval256 [...] [--misses]

Each argument is an ``mmx eval --out`` folder inside its run folder: its ``eval.json`` holds the
captions and verdicts, the run's ``config.yaml`` one level up the held-out pairs. Prints a markdown
table: captions right / captions naming each held-out pair (a caption naming two counts for both),
then the captions naming no pair with a channel gap (:meth:`mmx.data.ShapesDataset.channel_gaps`:
a held-out colour that lights an RGB channel no training object of that shape lights).

``--misses`` also prints, per held-out pair, what the wrong images drew where each held-out object
was asked for ("green triangle" in place of a green circle, "nothing"), from the detector's reading
that ``mmx eval`` keeps in ``eval.json`` (``drawn``).
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

from mmx.config import load_config
from mmx.data import DATASETS, POSITION_PHRASES
from mmx.eval import accuracy_by_pair, parse_caption
from mmx.train.text_to_image import TextToImageConfig


def load(eval_dir: Path) -> tuple[dict, object]:
    """The evaluation's ``eval.json`` and the run's held-out data set (from ``config.yaml`` one level up)."""
    report_path, config_path = eval_dir / "eval.json", eval_dir.parent / "config.yaml"
    for path in (report_path, config_path):
        if not path.is_file():
            raise SystemExit(f"error: {path} not found; pass the --out folder of `mmx eval` inside a run folder")
    report = json.loads(report_path.read_text())
    return report, DATASETS.build_from_dict(dict(load_config(config_path, TextToImageConfig).eval.data))


def by_pair(report: dict, data) -> tuple[dict[str, tuple[int, int]], tuple[int, int], dict]:
    """Per held-out pair (right, total); (right, total) over captions naming no channel-gap pair; the gaps."""
    prompts, correct = report["prompts"], report["correct"]
    pairs = accuracy_by_pair(prompts, correct, data.heldout_colour_shape, data.heldout_shape_position)
    gaps = data.channel_gaps()
    clear = [ok for caption, ok in zip(prompts, correct)
             if not any((c.colour, c.shape) in gaps for c in parse_caption(caption))]
    return pairs, (sum(clear), len(clear)), gaps


def misses(report: dict, data) -> dict[str, collections.Counter]:
    """Per held-out pair: what the wrong images drew at the place of each object with that pair.

    An object asked for and drawn right is not counted; one drawn wrong counts as the colour and shape
    the detector read at its place ("green triangle"), or "nothing" when nothing was read there.
    """
    names = {**{(c, s): f"{c} {s}" for c, s in data.heldout_colour_shape},
             **{(s, p): f"{s} {POSITION_PHRASES[p][0]}" for s, p in data.heldout_shape_position}}
    drew: dict[str, collections.Counter] = {name: collections.Counter() for name in names.values()}
    for caption, ok, drawn in zip(report["prompts"], report["correct"], report["drawn"]):
        if ok:
            continue
        there = {}  # position -> "colour shape" read there
        for text in drawn:
            colour, shape, position = text.split()
            there.setdefault(position, f"{colour} {shape}")
        for claim in parse_caption(caption):
            got = there.get(claim.position, "nothing")
            if got == f"{claim.colour} {claim.shape}":
                continue
            for key in ((claim.colour, claim.shape), (claim.shape, claim.position)):
                if key in names:
                    drew[names[key]][got] += 1
    return drew


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("eval_dirs", nargs="+", type=Path)
    parser.add_argument("--misses", action="store_true", help="also print what was drawn instead of each pair")
    args = parser.parse_args()
    for eval_dir in args.eval_dirs:
        report, data = load(eval_dir)
        if args.misses and "drawn" not in report:
            raise SystemExit(f"error: {eval_dir / 'eval.json'} has no 'drawn' list; evaluate again with this mmx")
        pairs, (right, total), gaps = by_pair(report, data)
        cells = " | ".join(f"{name} {r}/{t}" for name, (r, t) in pairs.items())
        share = f"{right / total:.1%}" if total else "n/a"
        gap_names = ", ".join(f"{c} {s} ({ch})" for (c, s), ch in gaps.items()) or "none"
        print(f"| {eval_dir} | {cells} | {right}/{total} ({share}) without a channel-gap pair [{gap_names}] |")
        if args.misses:
            for name, drew in misses(report, data).items():
                listed = ", ".join(f"{what} {n}" for what, n in drew.most_common()) or "none"
                print(f"  {name}, drawn instead: {listed}")


if __name__ == "__main__":
    main()
