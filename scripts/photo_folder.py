"""Write a folder of real captioned photos, offline: scikit-image's bundled photographs in the imagefolder layout.

    python scripts/photo_folder.py photos/              # 15 photos + metadata.jsonl
    python scripts/photo_folder.py photos/ --crops 4     # also 3 random crops of each (60 images)

Each image is a PNG (its shorter side resized to --side pixels) listed in ``metadata.jsonl`` with a
free-form caption, the layout ``data: {name: imagefolder, root: photos}`` reads. Needs
scikit-image (installed by mmx's ``dev`` extra), which ships these photos inside its package.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

# scikit-image loader name -> caption; the photos (not the drawings or test patterns) it ships.
PHOTOS = {
    "astronaut": "an astronaut in a white spacesuit smiling in front of a flag",
    "chelsea": "a ginger tabby cat lying on a carpet",
    "coffee": "a cup of coffee with a heart drawn in the foam",
    "rocket": "a rocket on its launch pad under a blue sky",
    "hubble_deep_field": "countless small galaxies scattered across black space",
    "immunohistochemistry": "stained tissue under a microscope, brown cells on pale blue",
    "retina": "the orange back of a human eye crossed by red blood vessels",
    "stereo_motorcycle": "a red motorcycle parked in a workshop",
    "camera": "a black and white photo of a man behind a camera on a tripod",
    "moon": "the grey surface of the moon covered in craters",
    "coins": "rows of old coins on a dark background",
    "brick": "a wall of grey bricks",
    "grass": "a close-up of blades of grass",
    "gravel": "grey gravel seen from above",
    "clock": "a clock on a wall, blurred as if moving",
}


def _photo(name: str) -> Image.Image:
    import skimage.data

    pixels = getattr(skimage.data, name)()
    if isinstance(pixels, tuple):  # stereo_motorcycle: (left, right, disparity)
        pixels = pixels[0]
    return Image.fromarray(np.asarray(pixels, dtype=np.uint8)).convert("RGB")


def write_photo_folder(root: str | Path, side: int = 96, crops: int = 1, seed: int = 0) -> Path:
    """Write the photos of :data:`PHOTOS` (and ``crops - 1`` random crops of each) and metadata.jsonl into ``root``."""
    if side < 8:
        raise ValueError(f"side must be at least 8 pixels; got {side}")
    if crops < 1:
        raise ValueError(f"crops must be at least 1; got {crops}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for name, caption in PHOTOS.items():
        photo = _photo(name)
        scale = side / min(photo.size)
        photo = photo.resize(
            (max(side, round(photo.width * scale)), max(side, round(photo.height * scale))), Image.Resampling.LANCZOS
        )
        for k in range(crops):
            image = photo
            if k:  # a random crop of 60-90% of the shorter side, anywhere in the photo
                crop = int(min(photo.size) * rng.uniform(0.6, 0.9))
                left, top = int(rng.integers(0, photo.width - crop + 1)), int(rng.integers(0, photo.height - crop + 1))
                image = photo.crop((left, top, left + crop, top + crop))
            file_name = f"{name}.png" if k == 0 else f"{name}_crop{k}.png"
            image.save(root / file_name)
            rows.append({"file_name": file_name, "text": caption})
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("root", type=Path, help="the folder to write (created if missing)")
    parser.add_argument("--side", type=int, default=96, help="pixels of each photo's shorter side (default 96)")
    parser.add_argument("--crops", type=int, default=1, help="images per photo: the photo and crops-1 random crops")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random crops")
    args = parser.parse_args(argv)
    try:
        root = write_photo_folder(args.root, args.side, args.crops, args.seed)
    except ImportError:
        print("error: this script needs scikit-image: pip install scikit-image", file=sys.stderr)
        return 2
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    count = sum(1 for _ in (root / "metadata.jsonl").open(encoding="utf-8"))
    print(f"wrote {count} captioned photos and {root / 'metadata.jsonl'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
