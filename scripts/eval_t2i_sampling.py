"""Held-out caption accuracy of one text-to-image run under several sampling settings.

Plain classifier-free guidance at two scales, and composable guidance over each object's attribute
pairs at two weights (see ``diffusion.compose_scale``). The images of every setting start from the
same noise (``eval.seed``), so the settings are compared on equal draws.

    python scripts/eval_t2i_sampling.py runs/t2i_v7 [--num 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import functools
import json

SETTINGS = [
    ("plain guidance 3", 3.0, 0.0, ()),
    ("compose 1.0 (c+p, s+p)", 3.0, 1.0, ("colour+position", "shape+position")),
    ("compose 0.5 (all pairs)", 3.0, 0.5, ("colour+position", "shape+position", "colour+shape")),
    ("compose 1.0 (all pairs)", 3.0, 1.0, ("colour+position", "shape+position", "colour+shape")),
    ("plain guidance 6", 6.0, 0.0, ()),
]


def main() -> None:
    from mmx.train.text_to_image import caption_components, generate_and_score, heldout_prompts, load_run

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--num", type=int, default=64, help="held-out captions")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    cfg, pipeline = load_run(args.run)
    cfg.eval.num_prompts = args.num
    prompts = heldout_prompts(cfg)
    results = []
    for name, guidance, weight, pairs in SETTINGS:
        pipeline.component_scale = weight
        pipeline.describe_parts = functools.partial(caption_components, pairs=pairs) if weight > 0 else None
        _, correct = generate_and_score(pipeline, cfg, prompts, cfg.eval.seed, guidance_scale=guidance)
        results.append({"setting": name, "guidance": guidance, "compose_scale": weight, "pairs": list(pairs),
                        "accuracy": sum(correct) / len(correct)})
        print(f"{name:28s} {results[-1]['accuracy']:.1%}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"run": args.run, "num_prompts": len(prompts), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
