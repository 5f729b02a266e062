"""Hostile image files through ``load_rgb`` and ``ImageFolderCaptions``.

Every file either loads as 8-bit RGB of the right size (any mode: CMYK, RGBA, L, LA, P, 1, I;16,
I, F; 1 pixel; extreme aspect ratios) or raises ``ImageDecodeError`` naming the file (corrupt,
truncated, zero bytes, text named .png, a decompression bomb) — never another exception, a hang
or an out-of-memory.
"""

from __future__ import annotations

import io
import struct
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from mmx.data import ImageDecodeError, ImageFolderCaptions
from mmx.data.imagefolder import load_rgb

MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK", "I;16", "I", "F", "YCbCr", "LAB", "HSV")
FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp"}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_bytes(width: int, height: int, bit_depth: int = 8, colour: int = 2, rows: bytes | None = None) -> bytes:
    """A PNG written by hand: any header (huge sizes too), with ``rows`` (default all-zero pixels) as data."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    if rows is None:
        rows = b"".join(b"\x00" + bytes(width * channels * bit_depth // 8) for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def make_image(mode: str, width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65535, (height, width), dtype=np.uint16))
    if mode == "I":
        return Image.fromarray(rng.integers(-100, 70_000, (height, width), dtype=np.int32))
    if mode == "F":
        values = rng.normal(size=(height, width)).astype(np.float32) * 300
        values[rng.random((height, width)) < 0.1] = np.nan  # NaN pixels in float TIFFs happen
        return Image.fromarray(values)
    rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    if mode == "PA":
        return rgb.convert("RGBA").convert("PA")
    return rgb.convert(mode)


SAVABLE = {  # which modes each format writes
    "PNG": ("RGB", "RGBA", "L", "LA", "P", "1", "I;16"),
    "JPEG": ("RGB", "L", "CMYK", "YCbCr"),
    "GIF": ("P", "L", "RGB"),
    "BMP": ("RGB", "L", "P", "1"),
    "TIFF": ("RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I", "F", "YCbCr", "LAB"),
    "WEBP": ("RGB", "RGBA"),
}
VALID = st.sampled_from(sorted((fmt, mode) for fmt, modes in SAVABLE.items() for mode in modes))


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder for the module: each example overwrites its files (examples run one after another)."""
    return tmp_path_factory.mktemp("fuzz-images")


def _write(folder: Path, data: bytes, suffix: str) -> Path:
    for old in folder.glob("image*"):
        old.unlink()
    path = folder / f"image{suffix}"
    path.write_bytes(data)
    return path


def load_or_clear_error(path: Path) -> Image.Image | None:
    """``load_rgb(path)``: an RGB image, or None after checking the error is ImageDecodeError naming the file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # e.g. an invalid value cast to uint8
            image = load_rgb(path)
    except ImageDecodeError as err:
        assert str(path) in str(err), f"the error must name the file: {err}"
        return None
    assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
    return image


@given(VALID, st.integers(1, 40), st.integers(1, 40), st.integers(0, 2**16))
def test_every_mode_and_format_loads_as_rgb(
    scratch: Path, fmt_mode: tuple[str, str], width: int, height: int, seed: int
) -> None:
    fmt, mode = fmt_mode
    data = encode(make_image(mode, width, height, seed), fmt)
    image = load_or_clear_error(_write(scratch, data, FORMATS[fmt]))
    assert image is not None, f"a valid {fmt} {mode} image must load"
    assert image.size in ((width, height), (height, width))  # EXIF may rotate; these carry none
    assert image.size == (width, height)


@st.composite
def mutated_file(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid small image with bytes flipped, cut out, inserted, or the file truncated."""
    fmt, mode = draw(VALID)
    data = bytearray(encode(make_image(mode, draw(st.integers(1, 12)), draw(st.integers(1, 12)), 0), fmt))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif op == "delete":
            del data[at : at + draw(st.integers(1, 32))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        else:
            data = data[:at]
    return bytes(data), draw(st.sampled_from([FORMATS[fmt], ".png", ".jpg", ""]))


@given(mutated_file())
def test_corrupt_files_load_or_raise_image_decode_error(scratch: Path, case: tuple[bytes, str]) -> None:
    data, suffix = case
    start = time.perf_counter()
    load_or_clear_error(_write(scratch, data, suffix))
    assert time.perf_counter() - start < 10, "no hang on a corrupt file"


@given(st.binary(max_size=256), st.sampled_from([".png", ".jpg", ".gif", ".tif", ".webp"]))
def test_random_bytes_are_image_decode_errors(scratch: Path, data: bytes, suffix: str) -> None:
    load_or_clear_error(_write(scratch, data, suffix))


@given(
    st.sampled_from([(20_000, 20_000), (2**31 - 1, 1), (1, 2**31 - 1), (60_000, 60_000), (2**24, 2**24)]),
    st.sampled_from([(8, 2), (16, 6), (8, 0)]),
)
def test_decompression_bombs_are_clear_errors_not_oom(
    scratch: Path, size: tuple[int, int], depth_colour: tuple[int, int]
) -> None:
    """A tiny file whose header claims gigapixels is refused before any pixel memory is taken."""
    path = _write(scratch, png_bytes(*size, *depth_colour, rows=b"\x00" * 64), ".png")
    start = time.perf_counter()
    with pytest.raises(ImageDecodeError, match="decompression bomb|exceeds limit") as info:
        load_rgb(path)
    assert str(path) in str(info.value) and time.perf_counter() - start < 5


def test_named_hostile_files(tmp_path: Path) -> None:
    valid = encode(make_image("RGB", 9, 7, 0), "PNG")
    jpeg = encode(make_image("RGB", 9, 7, 0), "JPEG")
    cases = {
        "zero.png": b"",
        "text.png": b"hello, I am not an image\n",
        "corrupt.png": valid[:40] + bytes(200) + valid[240:],
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "header_only.jpg": jpeg[:20],
        "truncated.png": valid[: len(valid) // 2],
        "svg.png": b"<svg xmlns='http://www.w3.org/2000/svg'/>",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ImageDecodeError) as info:
            load_rgb(tmp_path / name)
        assert str(tmp_path / name) in str(info.value), name
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ImageDecodeError, match="folder.png"):
        load_rgb(tmp_path / "folder.png")
    with pytest.raises(FileNotFoundError, match="missing.png"):
        load_rgb(tmp_path / "missing.png")
    # sixteen-bit RGB PNG (mode RGB after Pillow's own reduction) and a 1-pixel image
    rows = b"".join(b"\x00" + np.arange(6 * 3, dtype=">u2").tobytes() for _ in range(4))
    (tmp_path / "rgb16.png").write_bytes(png_bytes(6, 4, 16, 2, rows=rows))
    assert load_rgb(tmp_path / "rgb16.png").size == (6, 4)
    Image.new("RGB", (1, 1), (1, 2, 3)).save(tmp_path / "pixel.png")
    assert load_rgb(tmp_path / "pixel.png").getpixel((0, 0)) == (1, 2, 3)


def test_float_images_with_nan_load_without_warnings(tmp_path: Path) -> None:
    """Regression: NaN pixels of a float TIFF were cast to uint8 (undefined, RuntimeWarning); now black."""
    values = np.full((3, 4), np.nan, dtype=np.float32)
    values[0, 0] = 200.0
    Image.fromarray(values).save(tmp_path / "nan.tif")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = load_rgb(tmp_path / "nan.tif")
    assert image.getpixel((0, 0)) == (200, 200, 200) and image.getpixel((1, 1)) == (0, 0, 0)


@settings(max_examples=max(4, settings.default.max_examples // 4))
@given(
    VALID,
    st.integers(1, 30),
    st.integers(1, 30),
    st.sampled_from([1, 2, 7, 16]),
    st.booleans(),
    st.booleans(),
    st.integers(0, 2**16),
)
def test_dataset_items_from_any_image(
    scratch: Path, fmt_mode: tuple[str, str], width: int, height: int, size: int, center: bool, flip: bool, seed: int
) -> None:
    folder = scratch / "dataset"
    folder.mkdir(exist_ok=True)
    fmt, mode = fmt_mode
    (folder / f"x{FORMATS[fmt]}").write_bytes(encode(make_image(mode, width, height, seed), fmt))
    (folder / "metadata.jsonl").write_text(f'{{"file_name": "x{FORMATS[fmt]}", "text": "a \\u00e9 🐱"}}\n')
    ds = ImageFolderCaptions(folder, size=size, center_crop=center, random_flip=flip)
    torch.manual_seed(seed)
    item = ds[0]
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert torch.isfinite(item["image"]).all() and item["image"].abs().max() <= 1.0
    assert item["caption"] == "a é 🐱"


@pytest.mark.parametrize("shape", [(1, 200_000), (200_000, 1), (3, 50_000)])
def test_extreme_aspect_ratio_resamples_only_the_crop(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: tuple[int, int]
) -> None:
    """Regression: a 1 x 200,000 strip was resized to 64 x 12,800,000 (2.4 GB) before the crop."""
    width, height = shape
    Image.new("L", (width, height), 255).save(tmp_path / "strip.png")
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "strip.png", "text": "a strip"}\n')
    sizes = []
    resize = Image.Image.resize

    def recording_resize(self: Image.Image, size: tuple[int, int], *args: object, **kwargs: object) -> Image.Image:
        sizes.append(size)
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    for center in (True, False):
        item = ImageFolderCaptions(tmp_path, size=64, center_crop=center)[0]
        assert item["image"].shape == (3, 64, 64) and torch.allclose(item["image"], torch.ones(3, 64, 64))
    assert sizes and max(w * h for w, h in sizes) <= 64 * 64 * 64, sizes
