"""Captioned images in a folder, listed in ``metadata.jsonl`` (the Hugging Face imagefolder layout).

``root/metadata.jsonl`` holds one JSON object per line, ``{"file_name": "a.png", "text": "..."}``,
with ``file_name`` relative to ``root``. A ``metadata.csv`` with the same columns is read when
there is no ``metadata.jsonl``. Every listed file must exist when the dataset is built; an image
that cannot be decoded raises :class:`ImageDecodeError` naming the file when it is loaded.

``heldout_fraction`` sets a share of the images aside for evaluation: ``split="train"`` leaves them
out, ``split="heldout"`` gives only them. Which images are held out follows a hash of each file
name, so the split does not depend on the order of the metadata, and a file keeps its side when
others are added (unless the count of held-out images changes at the boundary).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import numbers
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

__all__ = ["ImageDecodeError", "ImageFolderCaptions", "image_tensor", "load_rgb"]

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_MAX_ASPECT = 64  # beyond this aspect ratio only the kept square is resampled (see _resize_crop)


class ImageDecodeError(OSError):
    """An image file that exists but cannot be decoded (corrupt, truncated or not an image)."""


def load_rgb(path: str | Path) -> Image.Image:
    """Open any image as 8-bit RGB (alpha composited over black, EXIF rotation applied); errors name the file."""
    path = Path(path)
    try:
        with Image.open(path) as opened:
            opened.load()
            image = ImageOps.exif_transpose(opened)
            return _to_rgb(image)
    except FileNotFoundError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise ImageDecodeError(f"cannot decode image {path}: {err}") from err


def image_tensor(path: str | Path, size: tuple[int, int]) -> torch.Tensor:
    """An image file as ``[3, H, W]`` in [-1, 1], resized (antialiased) to ``size = (H, W)``; errors name the file."""
    from torchvision.transforms.functional import pil_to_tensor, resize

    return resize(pil_to_tensor(load_rgb(path)), list(size), antialias=True).float() / 127.5 - 1.0


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode (RGBA, LA, P, CMYK, L, 1, I;16, I, F) to RGB."""
    mode = image.mode
    if mode == "RGB":
        return image.copy()
    if mode.startswith("I;16") or mode in ("I", "F"):
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=65535.0, neginf=0.0)
        if mode.startswith("I;16") or values.max(initial=0) > 255:
            values = values / 257.0  # 16-bit range -> 8-bit
        grey = np.clip(np.rint(values), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(black, rgba).convert("RGB")
    return image.convert("RGB")


def _read_metadata(path: Path, image_column: str, caption_column: str) -> list[tuple[str, str]]:
    """``(file_name, caption)`` rows of a metadata.jsonl / metadata.csv; errors name the file and line."""
    rows: list[tuple[str, str]] = []
    if path.suffix == ".jsonl":
        with path.open(encoding="utf-8") as handle:
            records = []
            for line_no, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{line_no}: not valid JSON ({err.msg})") from err
                records.append((line_no, record))
    else:
        with path.open(encoding="utf-8", newline="") as handle:
            records = [(line_no, rec) for line_no, rec in enumerate(csv.DictReader(handle), start=2)]
    for line_no, record in records:
        if not isinstance(record, dict):
            raise ValueError(f"{path}:{line_no}: expected an object with {image_column!r} and {caption_column!r}")
        for column in (image_column, caption_column):
            if column not in record:
                raise KeyError(
                    f"{path}:{line_no}: no column {column!r}; columns there: {', '.join(map(str, record)) or 'none'}"
                )
        caption = record[caption_column]
        if not isinstance(caption, str):
            raise ValueError(f"{path}:{line_no}: caption {caption_column!r} must be a string; got {caption!r}")
        rows.append((str(record[image_column]), caption))
    return rows


class ImageFolderCaptions(Dataset):
    """Images with captions from ``root/metadata.jsonl``: ``image`` [3, H, W] in [-1, 1], ``caption``.

    Args:
        root: the folder; ``metadata.jsonl`` (or ``.csv``) lists its images and captions.
        size: the side of the square every image is resized and cropped to, or ``[height, width]``.
        center_crop: crop the centre (else a random crop, drawn from torch's generator).
        random_flip: flip left-right with probability 1/2.
        caption_column, image_column: the metadata columns of the caption and the file name.
        split: ``"train"`` (every image but the held-out share) or ``"heldout"`` (only that share).
        heldout_fraction: the share of the images held out, in [0, 1): at least one image when
            above 0, and at least one must remain for training.
    """

    SPLITS = ("train", "heldout")

    def __init__(
        self,
        root: str | Path,
        size: int | Sequence[int] = 64,
        center_crop: bool = True,
        random_flip: bool = False,
        caption_column: str = "text",
        image_column: str = "file_name",
        split: str = "train",
        heldout_fraction: float = 0.0,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist or is not a directory")
        self.height, self.width = _size_pair(size)
        if split not in self.SPLITS:
            raise ValueError(f"unknown split {split!r}; valid: {', '.join(self.SPLITS)}")
        if (
            isinstance(heldout_fraction, bool)
            or not isinstance(heldout_fraction, numbers.Real)
            or not 0.0 <= heldout_fraction < 1.0
        ):
            raise ValueError(f"heldout_fraction must be a number in [0, 1); got {heldout_fraction!r}")
        metadata = next((self.root / name for name in METADATA_FILES if (self.root / name).is_file()), None)
        if metadata is None:
            raise FileNotFoundError(f"no {' or '.join(METADATA_FILES)} in {self.root}")
        self.metadata = metadata
        self.size = self.height if self.height == self.width else (self.height, self.width)
        self.center_crop, self.random_flip = center_crop, random_flip
        self.caption_column, self.image_column = caption_column, image_column
        self.split, self.heldout_fraction = split, float(heldout_fraction)
        items: list[tuple[Path, str]] = []
        for file_name, caption in _read_metadata(metadata, image_column, caption_column):
            path = self.root / file_name
            if not path.is_file():
                raise FileNotFoundError(f"image {path} listed in {metadata} does not exist")
            items.append((path, caption))
        if not items:
            raise ValueError(f"{metadata} lists no images")
        self.items = self._split(items)
        logger.debug("ImageFolderCaptions: %d images (%s) from %s", len(self.items), split, metadata)

    def _split(self, items: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
        """The items of ``self.split``, in metadata order; the held-out ones have the smallest file-name hashes."""
        if self.heldout_fraction == 0:
            if self.split == "heldout":
                raise ValueError(
                    f"split 'heldout' of {self.root} needs heldout_fraction > 0 (the share of its images "
                    "to hold out, e.g. 0.1), or another folder of held-out images"
                )
            return items
        count = max(1, round(self.heldout_fraction * len(items)))
        if count >= len(items):
            raise ValueError(
                f"heldout_fraction {self.heldout_fraction} holds out {count} of the {len(items)} images "
                f"in {self.metadata}, leaving none to train on"
            )

        def key(index: int) -> tuple[str, int]:
            name = items[index][0].relative_to(self.root).as_posix()
            return hashlib.sha256(name.encode("utf-8")).hexdigest(), index

        heldout = set(sorted(range(len(items)), key=key)[:count])
        keep = (lambda i: i in heldout) if self.split == "heldout" else (lambda i: i not in heldout)
        return [item for i, item in enumerate(items) if keep(i)]

    def __len__(self) -> int:
        return len(self.items)

    def _resize_crop(self, image: Image.Image) -> Image.Image:
        """Resize the image to cover ``height x width``, then crop that box (centre or random).

        When the resized image would be much larger than both the source and the crop (an aspect
        ratio above 64:1, e.g. a 1 x 100,000 strip that would become 64 x 6,400,000), only the
        kept box is resampled (``resize(box=...)``, equal up to Pillow's rounding at the edge),
        so memory stays bounded by the decoded source.
        """
        width, height = image.size
        out_h, out_w = self.height, self.width
        scale = max(out_h / height, out_w / width)
        new_w, new_h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
        if self.center_crop:
            left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
        else:
            left = int(torch.randint(new_w - out_w + 1, ()))
            top = int(torch.randint(new_h - out_h + 1, ()))
        crop = (left, top, left + out_w, top + out_h)
        if (new_w, new_h) == (width, height):
            return image.crop(crop)
        if new_w * new_h <= max(width * height, _MAX_ASPECT * out_h * out_w):
            return image.resize((new_w, new_h), Image.Resampling.BICUBIC).crop(crop)
        sx, sy = width / new_w, height / new_h  # source pixels per resized pixel
        box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
        return image.resize((out_w, out_h), Image.Resampling.BICUBIC, box=box)

    def __getitem__(self, index: int) -> dict[str, Any]:
        """``image`` [3, H, W] float in [-1, 1], ``caption`` str, ``file_name`` (path relative to root)."""
        path, caption = self.items[index]
        image = self._resize_crop(load_rgb(path))
        if self.random_flip and bool(torch.rand(()) < 0.5):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = torch.from_numpy(np.array(image, dtype=np.uint8))  # [H, W, 3]
        tensor = pixels.permute(2, 0, 1).float().div(127.5).sub(1.0)  # [3, H, W]
        return {"image": tensor, "caption": caption, "file_name": str(path.relative_to(self.root))}

    def __repr__(self) -> str:
        return (
            f"ImageFolderCaptions(root={str(self.root)!r}, size={self.size}, split={self.split!r}, "
            f"items={len(self.items)})"
        )


def _size_pair(size: Any) -> tuple[int, int]:
    """``size`` (an int, or ``[height, width]``) as ``(height, width)``; anything else is an error naming it."""
    pair = [size, size] if isinstance(size, numbers.Integral) else size
    if (
        isinstance(size, bool)
        or not isinstance(pair, (list, tuple))
        or len(pair) != 2
        or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 1 for v in pair)
    ):
        raise ValueError(f"size must be a positive integer or [height, width] of positive integers; got {size!r}")
    return int(pair[0]), int(pair[1])
