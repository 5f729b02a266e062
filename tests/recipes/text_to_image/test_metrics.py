"""Text-to-image evaluation fits the data: the size is stated once, held-out data, and the metrics that apply."""

import pytest
import torch

from mmx.config import load_config
from mmx.recipes.text_to_image import (
    TextToImageConfig,
    TextToImageTask,
    build_evaluator,
    build_pipeline,
    eval_data_spec,
    fit_data_spec,
)
from mmx.recipes.text_to_image.metrics import METRICS, default_metrics

TINY = "configs/shapes_t2i_tiny.yaml"


def _photo_cfg(photo_folder, *overrides):
    return load_config(
        TINY,
        TextToImageConfig,
        [
            "train.tensorboard=false",
            "train.progress=false",
            f"data={{name: imagefolder, root: {photo_folder}, heldout_fraction: 0.2}}",
            "eval.data={split: heldout}",
            *overrides,
        ],
    )


def test_the_data_takes_the_recipes_image_size_and_a_different_one_is_named():
    assert fit_data_spec({"name": "shapes", "split": "train"}, (3, 16, 16))["size"] == 16
    assert fit_data_spec({"name": "imagefolder", "root": "x"}, (3, 16, 24))["size"] == [16, 24]
    assert fit_data_spec({"name": "imagefolder", "root": "x", "size": [16, 24]}, (3, 16, 24))["size"] == [16, 24]
    assert "size" not in fit_data_spec({"name": "translation"}, (3, 16, 16))  # a source without images
    with pytest.raises(ValueError, match=r"data.size = 64 but image_size = \[3, 32, 32\].*State the size once"):
        fit_data_spec({"name": "imagefolder", "root": "x", "size": 64}, (3, 32, 32))
    with pytest.raises(ValueError, match=r"eval.data.size = \[32, 16\] but image_size = \[3, 16, 32\]"):
        fit_data_spec({"name": "imagefolder", "root": "x", "size": [32, 16]}, (3, 16, 32), "eval.data")


def test_eval_data_without_a_name_extends_the_training_data(photo_folder):
    cfg = _photo_cfg(photo_folder)
    assert eval_data_spec(cfg) == {
        "name": "imagefolder",
        "root": str(photo_folder),
        "heldout_fraction": 0.2,
        "split": "heldout",
        "size": 16,
    }
    shapes = load_config(TINY, TextToImageConfig)  # a named source stands alone
    assert eval_data_spec(shapes) == {**shapes.eval.data, "size": 16}


def test_a_size_mismatch_or_a_missing_heldout_share_fails_before_training(photo_folder, tmp_path):
    with pytest.raises(ValueError, match=r"data.size = 64 but image_size = \[3, 16, 16\]"):
        TextToImageTask(_photo_cfg(photo_folder, "data.size=64"), tmp_path)
    with pytest.raises(ValueError, match="needs heldout_fraction > 0"):
        TextToImageTask(_photo_cfg(photo_folder, "data.heldout_fraction=0.0"), tmp_path)
    with pytest.raises(ValueError, match=r"gives images of shape \[3, 16, 16\], but image_size is \[1, 16, 16\]"):
        TextToImageTask(_photo_cfg(photo_folder, "image_size=[1, 16, 16]"), tmp_path)


def test_metrics_default_to_the_detector_on_shapes_and_the_denoising_loss_elsewhere(photo_folder):
    shapes = build_evaluator(build_pipeline(load_config(TINY, TextToImageConfig)), load_config(TINY, TextToImageConfig))
    assert [name for name, _ in shapes.metrics] == ["caption_accuracy", "attention_miou"]
    cfg = _photo_cfg(photo_folder)
    photos = build_evaluator(build_pipeline(cfg), cfg)
    assert (
        [name for name, _ in photos.metrics]
        == ["denoising_loss"]
        == [s["name"] for s in default_metrics(photos.heldout)]
    )
    assert len(photos.heldout) == 3  # 20% of 15 photos
    cfg.eval.metrics = [{"name": "caption_accuracy"}]
    with pytest.raises(
        ValueError, match="'caption_accuracy' reads images with the shapes detector.*ImageFolderCaptions"
    ):
        build_evaluator(build_pipeline(cfg), cfg)(2)
    cfg.eval.metrics = [{"name": "psnr"}]
    with pytest.raises(
        KeyError, match="unknown metric 'psnr'; valid names: attention_miou, caption_accuracy, clip_score"
    ):
        build_evaluator(build_pipeline(cfg), cfg)
    assert sorted(METRICS.names()) == ["attention_miou", "caption_accuracy", "clip_score", "denoising_loss", "fid"]


def test_the_heldout_denoising_loss_is_fixed_for_a_model_and_follows_its_weights(photo_folder):
    cfg = _photo_cfg(photo_folder, "data.random_flip=true", "data.center_crop=false")  # augmented held-out images
    pipeline = build_pipeline(cfg).eval()
    evaluator = build_evaluator(pipeline, cfg)
    first = evaluator(2, steps=2)
    assert set(first.scores) == {"denoising_loss"} and first.correct is None
    assert first.samples.images.shape == (2, 3, 16, 16) and len(first.samples.prompts) == 2
    assert sorted(first.details["denoising_loss_by_timestep"]) == [50, 150, 250, 350, 450, 550, 650, 750, 850, 950]
    assert first.details["denoising_loss_images"] == 3
    torch.rand(5)  # the process's random state moves on; crops, flips and noise do not
    again = build_evaluator(pipeline, cfg)(2, steps=2)
    assert again.scores == first.scores
    with torch.no_grad():
        for p in pipeline.unet.parameters():  # (a fresh UNet predicts zeros: its output layer starts at zero)
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    assert evaluator(2, steps=2).scores["denoising_loss"] != first.scores["denoising_loss"]
    cfg.eval.metrics = [{"name": "denoising_loss", "timesteps": [999], "num_images": 1}]
    one = build_evaluator(pipeline, cfg)(1, steps=2)
    assert list(one.details["denoising_loss_by_timestep"]) == [999] and one.details["denoising_loss_images"] == 1
