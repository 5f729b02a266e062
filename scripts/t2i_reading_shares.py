"""Which words do a text-to-image model's object regions read? Colour, shape, or everything else.

Real shapes renders are noised at ``--t`` and denoised once with the AttentionRecorder attached.
At the positions each object covers (its mask pooled to the recorder grid, at least half covered),
each position's attention over the caption tokens is split into the object's colour word, its
shape word and the rest, and averaged over objects; printed for the train and held-out splits.
A model that reads the colour but not the shape of "a blue circle" draws the shape blue usually had.

    python scripts/t2i_reading_shares.py runs/shapes_t2i [--num 64] [--t 250] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from mmx.attnmap.text_to_image import attend_real
from mmx.data import ShapesDataset
from mmx.train.text_to_image import load_run


def reading_shares(pipeline, split: str, num: int, t: int, size: int) -> dict[str, float]:
    """Mean share of an object position's attention on its colour word, its shape word and the rest."""
    items = [ShapesDataset(split=split, size=size, length=num, seed=1)[i] for i in range(num)]
    images = torch.stack([item["image"] for item in items])
    ctx, recorder = attend_real(pipeline, images, [item["caption"] for item in items], (t,),
                                torch.Generator().manual_seed(0))
    maps = recorder.maps()  # (B, S, h, w): summed over heads and layers
    share = maps / maps.sum(1, keepdim=True).clamp_min(1e-12)
    totals, count = {"colour": 0.0, "shape": 0.0}, 0
    for b, item in enumerate(items):
        for obj in item["objects"]:
            inside = F.adaptive_avg_pool2d(obj.mask[None, None].float(), maps.shape[-2:])[0, 0] >= 0.5
            if not inside.any():
                continue
            for name, word in zip(("colour", "shape"), obj.words):
                if word >= 0:
                    span = ctx.words[b][word]
                    totals[name] += share[b, span.start : span.end].sum(0)[inside].mean().item()
            count += 1
    out = {k: v / max(count, 1) for k, v in totals.items()}
    out["other"] = 1.0 - out["colour"] - out["shape"]
    out["objects"] = count
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a text-to-image run folder trained on the shapes data")
    parser.add_argument("--num", type=int, default=64, help="images per split")
    parser.add_argument("--t", type=int, default=250, help="noise timestep of the real renders")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.num < 1:
        parser.error(f"--num must be >= 1; got {args.num}")
    cfg, pipeline = load_run(args.run)
    if not 0 <= args.t < pipeline.scheduler.config.num_train_timesteps:
        parser.error(f"--t must be in [0, {pipeline.scheduler.config.num_train_timesteps}); got {args.t}")
    size = pipeline.image_size[-1]
    result = {split: reading_shares(pipeline, split, args.num, args.t, size) for split in ("train", "heldout")}
    for split, shares in result.items():
        print(f"{split:8s} colour {shares['colour']:.3f}  shape {shares['shape']:.3f}  other {shares['other']:.3f}"
              f"  ({shares['objects']} objects)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
