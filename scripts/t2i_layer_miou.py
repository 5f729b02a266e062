"""Attention mIoU of each cross-attention layer of a shapes text-to-image run, on real renders.

Held-out renders are noised at t = 100, 250, 400 (as ``mmx eval``'s real-render figure); each
layer's maps are resampled to the finest grid and scored alone, then every layer together and the
layers at each ``max_downsample``. Shows which maps localise and which blur.

    python scripts/t2i_layer_miou.py runs/t2i_v15 [--num 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    import torch

    from mmx.attnmap import attend_real, word_maps
    from mmx.data import DATASETS
    from mmx.eval.localization import word_ious
    from mmx.train.text_to_image import load_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--num", type=int, default=64, help="held-out renders")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cfg, pipeline = load_run(args.run)[:2]
    data = DATASETS.build_from_dict({**dict(cfg.eval.data), "length": args.num})
    items = [data[i] for i in range(len(data))]
    images = torch.stack([item["image"] for item in items])
    ctx, recorder = attend_real(pipeline, images, [item["caption"] for item in items], (100, 250, 400),
                                torch.Generator().manual_seed(0), per_layer=True)
    size = tuple(images.shape[-2:])

    def miou(total: torch.Tensor) -> float:
        scores: list[float] = []
        for item, per_word in zip(items, word_maps(total, ctx.words, image_size=size)):
            scores += list(word_ious(per_word, item["word_masks"], 0.4).values())
        return sum(scores) / len(scores)

    grids = {name: tuple(grid) for name, grid in recorder.layer_grids.items()}
    rows = [{"layers": name, "grid": f"{grids[name][0]}x{grids[name][1]}", "miou": miou(total)}
            for name, total in recorder.layer_totals.items()]
    factors = sorted({size[0] // h for h, _ in grids.values()})
    for factor in factors:
        kept = [name for name in recorder.layer_totals if size[0] // grids[name][0] <= factor]
        rows.append({"layers": f"max_downsample={factor} ({len(kept)} layers)", "grid": "",
                     "miou": miou(sum(recorder.layer_totals[name] for name in kept))})
    print(f"| layers | map grid | attention mIoU ({len(items)} held-out renders) |\n|---|---|---:|")
    for row in rows:
        print(f"| {row['layers']} | {row['grid']} | {row['miou']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": args.run, "num": len(items), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
