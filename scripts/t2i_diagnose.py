"""Where a shapes text-to-image run fails: guidance sweep, object kinds, every colour-shape pair.

Three reports, each from the same starting noise for every setting:

1. For each guidance scale (and guidance interval, ``--intervals``): held-out caption accuracy, attention mIoU on the generated images
   (colour and shape words against the detector's masks), and per kind of object (one with a
   held-out colour-shape pair, one with a held-out shape-position pair, a seen one) the share drawn
   right. The same for captions of the training distribution (seen compositions).
2. Every (colour, shape) pair alone on the left, ``--per-pair`` samples each: which colour and
   shape the detector reads there. A held-out pair shows whether it is drawn or replaced.

    python scripts/t2i_diagnose.py runs/t2i_v14 [--num 128] [--scales 1,1.5,2,3] [--intervals all,0-250]
        [--data-seed 2] [--json FILE]

``--data-seed`` draws the captions from another seed of the held-out split than the run's
evaluation set (``eval.data.seed``), so sampling settings can be chosen without looking at it.
"""

from __future__ import annotations

import argparse
import collections
import json


def object_kind(claim, heldout_colour_shape, heldout_shape_position) -> str:
    if (claim.colour, claim.shape) in heldout_colour_shape:
        return "held-out colour-shape"
    if (claim.shape, claim.position) in heldout_shape_position:
        return "held-out shape-position"
    return "seen"


def parse_interval(text: str) -> tuple[float, float] | None:
    """ "all" -> None (guidance at every step); "0-250" -> (0.0, 250.0)."""
    if text == "all":
        return None
    low, sep, high = text.partition("-")
    try:
        return float(low), float(high)
    except ValueError:
        raise SystemExit(f"error: a guidance interval is 'all' or LOW-HIGH timesteps, e.g. 0-250; got {text!r}") from None


def score_setting(pipeline, cfg, prompts, guidance, max_downsample, seed, data) -> dict:
    """Accuracy, generated-image attention mIoU and per-kind object success for one guidance setting."""
    import torch

    from mmx.attnmap import attend_generate, word_maps
    from mmx.eval import check_caption, detect_objects, detection_masks, word_ious

    d = cfg.diffusion
    generator = torch.Generator().manual_seed(seed)
    correct, ious = 0, []
    kinds: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for start in range(0, len(prompts), cfg.eval.batch_size):
        batch = prompts[start : start + cfg.eval.batch_size]
        images, ctx, recorder = attend_generate(pipeline, batch, d.sample_steps, guidance, d.sampler, generator,
                                                max_downsample=max_downsample)
        maps = word_maps(recorder.maps(), ctx.words, image_size=tuple(images.shape[-2:]))
        for image, caption, per_word in zip(images.float(), batch, maps):
            check = check_caption(image, caption)
            correct += check.correct
            ious += list(word_ious(per_word, detection_masks(caption, detect_objects(image)), 0.4).values())
            for claim in check.claims:
                kind = kinds[object_kind(claim, data.heldout_colour_shape, data.heldout_shape_position)]
                kind[0] += claim not in check.missing
                kind[1] += 1
    return {"guidance": guidance, "interval": pipeline.guidance_interval, "accuracy": correct / len(prompts), "attention_miou": sum(ious) / max(len(ious), 1),
            "objects_right": {k: f"{v[0]}/{v[1]}" for k, v in sorted(kinds.items())}}


def pair_probe(pipeline, cfg, guidance, per_pair, seed) -> dict:
    """Every (colour, shape) of the run's data alone on the left: the detector's reading of what was drawn there."""
    import torch

    from mmx.data import DATASETS
    from mmx.data.shapes import SHAPES
    from mmx.eval import detect_objects

    d = cfg.diffusion
    table = {}
    for colour in DATASETS.build_from_dict(dict(cfg.data)).colours:  # the colours the run trained on
        for shape in SHAPES:
            images = pipeline.generate([f"a {colour} {shape} on the left"] * per_pair, d.sample_steps, guidance,
                                       d.sampler, torch.Generator().manual_seed(seed))
            read = collections.Counter()
            for image in images.float():
                found = [x for x in detect_objects(image) if x.position == "left"]
                read[f"{found[0].colour} {found[0].shape}" if found else "nothing"] += 1
            table[f"{colour} {shape}"] = dict(read.most_common())
    return table


def main() -> None:
    from mmx.data import DATASETS
    from mmx.train.text_to_image import load_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--num", type=int, default=128, help="captions per split")
    parser.add_argument("--scales", default="1,1.5,2,3", help="guidance scales, comma-separated")
    parser.add_argument("--intervals", default=None,
                        help="guidance intervals, comma-separated: 'all' or LOW-HIGH timesteps (default: the run's)")
    parser.add_argument("--data-seed", type=int, default=None, help="seed of the captions (default: the run's eval set)")
    parser.add_argument("--max-downsample", type=int, default=None,
                        help="attention layers read (default: the run's eval.attention_max_downsample; 0: every layer)")
    parser.add_argument("--per-pair", type=int, default=16, help="samples per colour-shape pair in the probe")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cfg, pipeline = load_run(args.run)[:2]
    max_downsample = cfg.eval.attention_max_downsample if args.max_downsample is None else (args.max_downsample or None)
    recipe_interval = pipeline.guidance_interval
    intervals = [parse_interval(t) for t in args.intervals.split(",")] if args.intervals else [recipe_interval]
    spec = dict(cfg.eval.data) if args.data_seed is None else {**dict(cfg.eval.data), "seed": args.data_seed}
    results: dict = {"run": args.run, "num": args.num, "data": spec, "max_downsample": max_downsample, "splits": {}}
    for split in ("heldout", "train"):
        data = DATASETS.build_from_dict({**spec, "split": split, "length": args.num})
        prompts = [data[i]["caption"] for i in range(len(data))]
        if split == "heldout":
            settings = [(float(s), iv) for iv in intervals for s in args.scales.split(",")]
        else:
            settings = [(cfg.diffusion.guidance_scale, recipe_interval)]
        rows = []
        for guidance, interval in settings:
            pipeline.guidance_interval = interval
            rows.append(score_setting(pipeline, cfg, prompts, guidance, max_downsample, args.seed, data))
            r = rows[-1]
            where = "every step" if interval is None else f"t in {interval[0]:g}-{interval[1]:g}"
            print(f"{split:8s} guidance {guidance:<4g} ({where}) accuracy {r['accuracy']:6.1%}  attention mIoU "
                  f"{r['attention_miou']:.3f}  objects right: {r['objects_right']}", flush=True)
        results["splits"][split] = rows
    pipeline.guidance_interval = recipe_interval
    results["pairs"] = pair_probe(pipeline, cfg, cfg.diffusion.guidance_scale, args.per_pair, args.seed)
    print(f"each colour-shape pair on the left ({args.per_pair} samples, the run's sampling settings): "
          "what the detector reads")
    for pair, read in results["pairs"].items():
        print(f"  {pair:16s} " + ", ".join(f"{k} {v}" for k, v in read.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
