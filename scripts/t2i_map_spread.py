"""How far each object word's attention map spreads past its object, per shapes text-to-image run.

Held-out renders noised at t = 100, 250, 400 (as ``mmx eval``'s real-render figure), the maps
``eval.attention_max_downsample`` reads. Per word kind (colour, shape): IoU with the object's mask
at several thresholds of the min-max normalised map, the area above 0.4 over the mask's area,
mean attention inside the mask over mean outside, and the pointing game (does the map peak on
its object). A map that points right but scores a low IoU at 0.4 and well above it is too wide.

    python scripts/t2i_map_spread.py runs/t2i_a runs/t2i_b [--num 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import json

THRESHOLDS = (0.3, 0.4, 0.5, 0.6)


def spread(run: str, num: int) -> dict[str, dict[str, float]]:
    """Per word kind: ``iou@t`` for each threshold, ``area_over_mask``, ``inside_over_outside``, ``pointing``."""
    import torch

    from mmx.attnmap import attend_real, word_maps
    from mmx.data import DATASETS
    from mmx.data.shapes import PALETTE, SHAPES
    from mmx.eval.localization import binarize, iou, word_pointing
    from mmx.train.text_to_image import load_run

    cfg, pipeline = load_run(run)[:2]
    data = DATASETS.build_from_dict({**dict(cfg.eval.data), "length": num})
    items = [data[i] for i in range(len(data))]
    images = torch.stack([item["image"] for item in items])
    with torch.no_grad():
        ctx, recorder = attend_real(pipeline, images, [item["caption"] for item in items], (100, 250, 400),
                                    torch.Generator().manual_seed(0), max_downsample=cfg.eval.attention_max_downsample)
    values: dict[str, dict[str, list[float]]] = {}
    for item, per_word in zip(items, word_maps(recorder.maps(), ctx.words, image_size=tuple(images.shape[-2:]))):
        pointing = word_pointing(per_word, item["word_masks"])
        for word_map in per_word:
            mask = item["word_masks"].get(word_map.index)
            kind = "colour" if word_map.word in PALETTE else "shape" if word_map.word in SHAPES else None
            if mask is None or kind is None:
                continue
            row = values.setdefault(kind, {})
            for t in THRESHOLDS:
                row.setdefault(f"iou@{t}", []).append(float(iou(binarize(word_map.map, t), mask)))
            row.setdefault("area_over_mask", []).append(float(binarize(word_map.map, 0.4).sum() / mask.sum()))
            inside, outside = word_map.map[mask].mean(), word_map.map[~mask].mean().clamp_min(1e-6)
            row.setdefault("inside_over_outside", []).append(float(inside / outside))
            row.setdefault("pointing", []).append(float(pointing[word_map.index]))
    return {kind: {k: sum(v) / len(v) for k, v in row.items()} for kind, row in values.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--num", type=int, default=64, help="held-out renders")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    results = {run: spread(run, args.num) for run in args.runs}
    columns = [f"IoU@{t}" for t in THRESHOLDS] + ["area / mask", "inside / outside", "pointing"]
    print("| run | words | " + " | ".join(columns) + " |\n|---|---|" + "---:|" * len(columns))
    for run, kinds in results.items():
        for kind, row in kinds.items():
            print(f"| {run} | {kind} | " + " | ".join(f"{v:.3f}" if k.startswith("iou") else f"{v:.2f}"
                                                    for k, v in row.items()) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
