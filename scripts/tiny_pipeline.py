"""Save a tiny random-weight diffusers pipeline, offline, to try ``mmx attend --pipeline`` without weights.

    python scripts/tiny_pipeline.py flux pipes/flux     # or sd, sdxl, sd3
    mmx attend --pipeline pipes/flux -p "a red cat on a mat" --height 32 --width 48 --steps 4 --gif

The pipeline (:func:`mmx.attnmap.pipelines.offline.tiny_pipeline`) has real tokenizers and random
weights, so its images are noise and its maps show only that tracing runs end to end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

FAMILIES = ("sd", "sdxl", "sd3", "flux")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("family", choices=FAMILIES, help="which pipeline family")
    parser.add_argument("out", type=Path, help="folder to write (model_index.json and one folder per component)")
    args = parser.parse_args(argv)
    if args.out.exists() and any(args.out.iterdir()):
        parser.error(f"{args.out} exists and is not empty; name a new folder")

    from mmx.attnmap.pipelines.offline import tiny_pipeline

    tiny_pipeline(args.family).save_pretrained(args.out)
    print(f"wrote a tiny {args.family} pipeline to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
