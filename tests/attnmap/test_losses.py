"""Attention losses as a recipe names them: each adds its term to the text-to-image loss, with its options."""

from pathlib import Path

import pytest
import torch

from mmx.config import load_config
from mmx.recipes.text_to_image import TextToImageConfig, TextToImageTask

TINY = Path(__file__).parents[2] / "configs" / "shapes_t2i_tiny.yaml"


def _cfg(*overrides):
    return load_config(TINY, TextToImageConfig, ["train.tensorboard=false", *overrides])


def _task_batch_and_plain_loss(tmp_path):
    """A tiny text-to-image task with no caption dropout, a batch of 4 and its loss without extra terms."""
    cfg = _cfg(
        "train.max_steps=1", "train.validate_every=1000", "train.checkpoint_every=1000", "diffusion.cond_drop_prob=0.0"
    )
    task = TextToImageTask(cfg, tmp_path)
    batch = task.collate([task.train_dataset()[i] for i in range(4)])
    return task, batch, task.loss(task.model, batch, torch.Generator().manual_seed(0))


def test_inside_and_coverage_losses_add_to_the_denoising_loss(tmp_path):
    from mmx.attnmap.losses import Coverage, Inside

    task, batch, plain = _task_batch_and_plain_loss(tmp_path)
    task.pipeline.attention_losses = [Inside(1.0)]
    grounded = task.loss(task.model, batch, torch.Generator().manual_seed(0))
    assert grounded > plain, "object words attend partly outside their objects at initialisation"
    task.pipeline.attention_losses = [Coverage(1.0)]
    covered = task.loss(task.model, batch, torch.Generator().manual_seed(0))
    assert covered > plain and covered != grounded, "a map spread over the image covers no object well"
    with pytest.raises(ValueError, match="the text_to_image recipe takes inside, coverage, reading; got .*outside"):
        TextToImageTask(_cfg("attention_losses=[{name: outside, weight: 1.0}]"), tmp_path)
    with pytest.raises(ValueError, match="'coverage' needs a weight"):
        TextToImageTask(_cfg("attention_losses=[{name: coverage}]"), tmp_path)


def test_the_reading_loss_reads_colour_shape_and_place_words(tmp_path, monkeypatch):
    from mmx.attnmap.losses import Reading

    task, batch, plain = _task_batch_and_plain_loss(tmp_path)
    task.pipeline.attention_losses = [Reading(1.0)]
    seen = {}
    loss_fn = type(task.pipeline).loss

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return loss_fn(self, *args, **kwargs)

    monkeypatch.setattr(type(task.pipeline), "loss", spy)
    read = task.loss(task.model, batch, torch.Generator().manual_seed(0))
    assert read > plain + 0.5, "at initialisation a position reads every token alike, not its object's words"
    for objects, words in zip(batch["objects"], seen["reading_masks"]):
        assert set(words) == {w for o in objects for w in (*o.words, *o.position_words) if w >= 0}
    with pytest.raises(ValueError, match="weight must be a number >= 0"):
        Reading(-1.0)


def test_reading_min_cover_comes_from_the_config_and_reaches_the_reading_loss(tmp_path, monkeypatch):
    from mmx.attnmap.capture import GroundingCapture
    from mmx.attnmap.losses import Reading

    task = TextToImageTask(_cfg("attention_losses=[{name: reading, weight: 0.1, min_cover: 0.5}]"), tmp_path)
    assert [(type(t), t.min_cover) for t in task.pipeline.attention_losses] == [(Reading, 0.5)]
    seen = []
    reading_loss = GroundingCapture.reading_loss

    def spy(self, targets, valid, image_size, min_cover=0.0):
        seen.append(min_cover)
        return reading_loss(self, targets, valid, image_size, min_cover)

    monkeypatch.setattr(GroundingCapture, "reading_loss", spy)
    batch = task.collate([task.train_dataset()[i] for i in range(2)])
    assert torch.isfinite(task.loss(task.model, batch, torch.Generator().manual_seed(0)))
    assert seen == [0.5]
    task.pipeline.attention_losses = [Reading(0.1, min_cover=0.5, extra_min_cover=0.0)]  # place words: every cell
    task.loss(task.model, batch, torch.Generator().manual_seed(0))
    named = {
        (i, t)
        for i, (spans, objects) in enumerate(zip(task.pipeline.encode(batch["caption"]).words, batch["objects"]))
        for o in objects
        for w in o.words
        if w >= 0
        for t in range(spans[w].start, spans[w].end)
    }
    per_token = seen[-1]
    assert per_token.shape[0] == 2 and named
    assert {(i, t) for i, t in torch.nonzero(per_token).tolist()} == named  # colour and shape tokens: 0.5
    assert set(per_token.unique().tolist()) == {0.0, 0.5}
    for name in ("min_cover", "extra_min_cover"):
        with pytest.raises(ValueError, match=rf"{name} must be in \[0, 1\]; got -0.1"):
            Reading(0.1, **{name: -0.1})
