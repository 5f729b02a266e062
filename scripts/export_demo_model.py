"""Copy a finished shapes run into the package as the `mmx demo` model (weights stored as float16).

python scripts/export_demo_model.py runs/shapes_t2i
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mmx.models import UNet2D

TARGET = Path(__file__).parents[1] / "mmx" / "assets" / "shapes_t2i"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path)
    parser.add_argument("--target", type=Path, default=TARGET)
    args = parser.parse_args()
    weights = args.run / "model" / "unet"
    if not weights.is_dir() or not (args.run / "config.yaml").is_file():
        raise SystemExit(f"error: {args.run} is not a finished run (needs config.yaml and model/unet/)")
    tmp = args.target.with_name(args.target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "model").mkdir(parents=True)
    shutil.copy(args.run / "config.yaml", tmp / "config.yaml")
    if (args.run / "metrics.jsonl").is_file():
        shutil.copy(args.run / "metrics.jsonl", tmp / "metrics.jsonl")
    UNet2D.from_pretrained(weights).half().save_pretrained(tmp / "model" / "unet")  # loads back as float32
    shutil.rmtree(args.target, ignore_errors=True)
    tmp.rename(args.target)
    size = sum(p.stat().st_size for p in args.target.rglob("*") if p.is_file())
    print(f"exported {args.run} -> {args.target} ({size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
