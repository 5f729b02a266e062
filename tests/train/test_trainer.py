"""The Accelerate training loop on the tiny text-to-image recipe: learning, exact resume, run folders."""

from pathlib import Path

import pytest
import torch

from mmx.config import load_config
from mmx.train import latest_checkpoint, train
from mmx.train.text_to_image import TextToImageConfig, TextToImageTask, load_run

TINY = Path(__file__).parents[2] / "configs" / "shapes_t2i_tiny.yaml"


def _cfg(*overrides):
    return load_config(TINY, TextToImageConfig, ["train.tensorboard=false", *overrides])


def test_tiny_model_overfits_a_few_captions(tmp_path):
    """Four captions, 120 steps: the loss at fixed noise and timesteps falls at least 3x."""
    cfg = _cfg("data.length=16", "train.batch_size=16", "train.max_steps=120", "train.lr=0.003", "train.ema=false",
               "train.checkpoint_every=1000", "train.validate_every=1000", "diffusion.cond_drop_prob=0.0",
               "diffusion.min_snr_gamma=null")
    task = TextToImageTask(cfg, tmp_path)
    batch = task.collate([task.train_dataset()[i] for i in range(16)])

    def fixed_loss():
        with torch.no_grad():
            return task.pipeline.loss(batch["image"], batch["caption"], torch.Generator().manual_seed(0)).item()

    before = fixed_loss()
    train(task, cfg.train, tmp_path)
    after = fixed_loss()
    assert after < before / 3, f"loss {before:.4f} -> {after:.4f}"


def test_stop_and_resume_reproduces_the_uninterrupted_losses(tmp_path):
    cfg = _cfg("train.max_steps=8", "train.checkpoint_every=4", "train.validate_every=1000")
    whole: list[float] = []
    train(TextToImageTask(cfg, tmp_path / "a"), cfg.train, tmp_path / "a", on_step=lambda s, l: whole.append(l.item()))

    class Stop(Exception):
        pass

    first: list[float] = []

    def stop_after_checkpoint(step, loss):
        first.append(loss.item())
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(TextToImageTask(cfg, tmp_path / "b"), cfg.train, tmp_path / "b", on_step=stop_after_checkpoint)
    assert latest_checkpoint(tmp_path / "b").name == "step_0000004"
    rest: list[float] = []
    train(TextToImageTask(cfg, tmp_path / "b"), cfg.train, tmp_path / "b", resume="latest",
          on_step=lambda s, l: rest.append(l.item()))
    assert first[:4] == whole[:4]
    assert rest == pytest.approx(whole[4:], rel=1e-5, abs=1e-6)


def test_run_folder_rebuilds_itself_and_keeps_limited_checkpoints(tmp_path):
    cfg = _cfg("train.max_steps=8", "train.checkpoint_every=2", "train.checkpoints_total_limit=2", "train.validate_every=8")
    result = train(TextToImageTask(cfg, tmp_path), cfg.train, tmp_path)
    assert result.step == 8 and "caption_accuracy" in result.metrics
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000006", "step_0000008"]
    assert (tmp_path / "samples" / "step_0000008.png").is_file()
    assert (tmp_path / "metrics.jsonl").read_text().count("caption_accuracy") == 1
    loaded_cfg, pipeline = load_run(tmp_path)
    assert loaded_cfg == cfg
    images = pipeline.generate(["a red circle on the left", "a blue square at the top and a green triangle on the right"],
                               num_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


def test_resume_from_a_missing_folder_names_it(tmp_path):
    cfg = _cfg("train.max_steps=1")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(TextToImageTask(cfg, tmp_path), cfg.train, tmp_path, resume=tmp_path / "nowhere")


def test_load_run_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_run(tmp_path)


def test_grounding_weight_adds_the_attention_loss(tmp_path):
    cfg = _cfg("train.max_steps=1", "train.validate_every=1000", "train.checkpoint_every=1000",
               "diffusion.cond_drop_prob=0.0")
    task = TextToImageTask(cfg, tmp_path)
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    plain = task.loss(task.model, batch, torch.Generator().manual_seed(0))
    task.pipeline.grounding_weight = 1.0
    grounded = task.loss(task.model, batch, torch.Generator().manual_seed(0))
    assert grounded > plain, "object words attend partly outside their objects at initialisation"
