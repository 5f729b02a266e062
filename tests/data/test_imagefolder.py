"""Image folders with metadata.jsonl: resizing, cropping, colour modes, and errors that name the file."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from mmx.data import DATASETS, ImageDecodeError, ImageFolderCaptions, collate


def write_metadata(root, rows, name="metadata.jsonl"):
    (root / name).write_text("".join(json.dumps(r) + "\n" for r in rows))


def halves(width=40, height=20):
    """Left half red, right half blue (uint8 [H, W, 3])."""
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    pixels[:, : width // 2] = (255, 0, 0)
    pixels[:, width // 2 :] = (0, 0, 255)
    return pixels


@pytest.fixture
def folder(tmp_path):
    Image.fromarray(halves()).save(tmp_path / "wide.png")
    Image.fromarray(halves(16, 32)).save(tmp_path / "tall.jpg", quality=95)
    rows = [{"file_name": "wide.png", "text": "red then blue"}, {"file_name": "tall.jpg", "text": "tall"}]
    write_metadata(tmp_path, rows)
    return tmp_path


def test_items_are_resized_centre_cropped_and_scaled(folder):
    ds = ImageFolderCaptions(folder, size=8)
    assert len(ds) == 2
    sample = ds[0]
    assert sample["caption"] == "red then blue" and sample["file_name"] == "wide.png"
    image = sample["image"]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert image.min() >= -1 and image.max() <= 1
    # 40x20 -> 16x8, centre crop keeps columns 4..11: left half red, right half blue
    assert (image[0, :, :3] > 0.8).all() and (image[2, :, :3] < -0.8).all()
    assert (image[2, :, -3:] > 0.8).all() and (image[0, :, -3:] < -0.8).all()
    assert ds[1]["image"].shape == (3, 8, 8)


def test_random_crop_and_flip(folder):
    ds = ImageFolderCaptions(folder, size=8, center_crop=False, random_flip=True)
    torch.manual_seed(0)
    images = [ds[0]["image"] for _ in range(40)]
    torch.manual_seed(0)
    assert all(torch.equal(a, ds[0]["image"]) for a in images)  # reproducible under torch.manual_seed
    red_left = sum(bool(img[0, 0, 0] > 0) for img in images)
    assert 0 < red_left < 40  # both orientations occur
    centred = ImageFolderCaptions(folder, size=8, random_flip=True)
    first = centred[0]["image"]
    again = [centred[0]["image"] for _ in range(10)]
    assert all(torch.equal(x, first) or torch.equal(x, first.flip(-1)) for x in again)


def test_any_colour_mode_becomes_rgb(tmp_path):
    rgba = Image.new("RGBA", (12, 12), (255, 0, 0, 255))
    rgba.putpixel((0, 0), (255, 255, 255, 0))  # fully transparent: composited over black
    rgba.save(tmp_path / "rgba.png")
    Image.new("L", (12, 12), 128).save(tmp_path / "grey.png")
    Image.new("RGB", (12, 12), (0, 255, 0)).convert("P", palette=Image.Palette.ADAPTIVE).save(tmp_path / "pal.png")
    Image.new("CMYK", (12, 12), (0, 0, 0, 0)).save(tmp_path / "cmyk.jpg")
    Image.new("I;16", (12, 12), 65535).save(tmp_path / "deep.png")
    names = ["rgba.png", "grey.png", "pal.png", "cmyk.jpg", "deep.png"]
    write_metadata(tmp_path, [{"file_name": n, "caption": n} for n in names])
    ds = ImageFolderCaptions(tmp_path, size=12, caption_column="caption")
    images = {ds[i]["caption"]: ds[i]["image"] for i in range(len(ds))}
    assert all(img.shape == (3, 12, 12) for img in images.values())
    assert images["rgba.png"][:, 0, 0].tolist() == [-1, -1, -1] and images["rgba.png"][0, 5, 5] == 1
    assert torch.allclose(images["grey.png"], torch.full((3, 12, 12), 128 / 127.5 - 1), atol=1e-6)
    assert images["pal.png"][1].min() > 0.9 and images["pal.png"][0].max() < -0.9
    assert images["cmyk.jpg"].min() > 0.9  # CMYK (0,0,0,0) is white
    assert images["deep.png"].min() == 1


def test_missing_metadata_names_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"metadata\.jsonl"):
        ImageFolderCaptions(tmp_path)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderCaptions(tmp_path / "nowhere")


def test_missing_image_is_named_at_construction(folder):
    write_metadata(folder, [{"file_name": "wide.png", "text": "a"}, {"file_name": "gone.png", "text": "b"}])
    with pytest.raises(FileNotFoundError, match="gone.png"):
        ImageFolderCaptions(folder)


def test_bad_metadata_lines_name_file_line_and_column(folder):
    (folder / "metadata.jsonl").write_text('{"file_name": "wide.png", "text": "a"}\n{not json\n')
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2"):
        ImageFolderCaptions(folder)
    write_metadata(folder, [{"file_name": "wide.png", "prompt": "a"}])
    with pytest.raises(KeyError, match=r"no column 'text'; columns there: file_name, prompt"):
        ImageFolderCaptions(folder)
    assert ImageFolderCaptions(folder, caption_column="prompt")[0]["caption"] == "a"


def test_corrupt_and_truncated_images_name_the_file(folder):
    (folder / "garbage.png").write_bytes(b"this is not an image at all")
    png = (folder / "wide.png").read_bytes()
    (folder / "cut.png").write_bytes(png[: len(png) // 2])
    write_metadata(folder, [{"file_name": n, "text": n} for n in ("wide.png", "garbage.png", "cut.png")])
    ds = ImageFolderCaptions(folder, size=8)  # both exist, so construction succeeds
    assert ds[0]["image"].shape == (3, 8, 8)
    for index, name in ((1, "garbage.png"), (2, "cut.png")):
        with pytest.raises(ImageDecodeError, match=name):
            ds[index]


def test_csv_metadata_registry_and_dataloader(folder):
    (folder / "metadata.jsonl").unlink()
    (folder / "metadata.csv").write_text('file_name,text\nwide.png,"red, then blue"\ntall.jpg,tall\n')
    ds = DATASETS.build("imagefolder", root=str(folder), size=8)
    batch = next(iter(DataLoader(ds, batch_size=2, collate_fn=collate)))
    assert batch["image"].shape == (2, 3, 8, 8) and batch["caption"] == ["red, then blue", "tall"]


def test_non_square_size_covers_then_crops(folder):
    ds = ImageFolderCaptions(folder, size=[6, 10])
    assert ds[0]["image"].shape == (3, 6, 10) and ds[1]["image"].shape == (3, 6, 10)
    assert ds.size == (6, 10) and ImageFolderCaptions(folder, size=[8, 8]).size == 8
    for bad in (0, [8], [8, 0], "8", True, [8.0, 8]):
        with pytest.raises(ValueError, match=r"size must be a positive integer or \[height, width\]"):
            ImageFolderCaptions(folder, size=bad)


def _numbered_folder(root, count):
    for i in range(count):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(root / f"img{i:02d}.png")
    write_metadata(root, [{"file_name": f"img{i:02d}.png", "text": f"image {i}"} for i in range(count)])
    return root


def test_heldout_fraction_splits_by_file_name_and_not_by_order(tmp_path):
    root = _numbered_folder(tmp_path, 20)
    train = ImageFolderCaptions(root, size=4, heldout_fraction=0.2)
    heldout = ImageFolderCaptions(root, size=4, split="heldout", heldout_fraction=0.2)
    train_names = [train[i]["file_name"] for i in range(len(train))]
    heldout_names = [heldout[i]["file_name"] for i in range(len(heldout))]
    assert len(heldout_names) == 4 and len(train_names) == 16 and not set(train_names) & set(heldout_names)
    assert train_names == sorted(train_names) and heldout_names == sorted(heldout_names)  # metadata order kept
    assert len(ImageFolderCaptions(root, size=4)) == 20  # no fraction: every image trains
    rows = [json.loads(line) for line in (root / "metadata.jsonl").read_text().splitlines()]
    write_metadata(root, rows[::-1])  # the same folder listed backwards: the same images are held out
    again = ImageFolderCaptions(root, size=4, split="heldout", heldout_fraction=0.2)
    assert sorted(again[i]["file_name"] for i in range(len(again))) == heldout_names
    assert len(ImageFolderCaptions(root, size=4, split="heldout", heldout_fraction=0.01)) == 1  # at least one


def test_heldout_split_errors_say_what_to_set(tmp_path):
    root = _numbered_folder(tmp_path, 3)
    with pytest.raises(ValueError, match="split 'heldout' .* needs heldout_fraction > 0"):
        ImageFolderCaptions(root, split="heldout")
    with pytest.raises(ValueError, match="holds out 3 of the 3 images .* leaving none to train on"):
        ImageFolderCaptions(root, heldout_fraction=0.9)
    for bad in (1.0, -0.1, "0.1", True):
        with pytest.raises(ValueError, match=r"heldout_fraction must be a number in \[0, 1\)"):
            ImageFolderCaptions(root, heldout_fraction=bad)
    with pytest.raises(ValueError, match="unknown split 'test'; valid: train, heldout"):
        ImageFolderCaptions(root, split="test")
