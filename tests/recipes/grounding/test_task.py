"""The grounding recipe end to end: it trains, validates, evaluates and maps; its attention loss reaches the keys."""

from pathlib import Path

import pytest
import torch

from mmx.recipes import load_recipe

CONFIG = Path(__file__).parents[3] / "configs" / "shapes_grounding.yaml"


def test_grounding_recipe_trains_and_validates(tmp_path):
    from mmx.train import train

    cfg, recipe = load_recipe(
        CONFIG,
        [
            "train.max_steps=2",
            "train.batch_size=4",
            "data.length=8",
            "train.validate_every=2",
            "train.tensorboard=false",
            "train.progress=false",
            "eval.data.length=4",
            "model.depth=1",
            "model.input_size=32",
        ],
    )
    result = train(recipe.task_class(cfg, tmp_path), cfg.train, tmp_path)
    assert set(result.metrics) == {"mask_iou", "attention_miou"}
    assert (tmp_path / "model" / "grounding" / "config.json").is_file()
    from typer.testing import CliRunner

    from mmx.cli import app

    out = CliRunner().invoke(app, ["eval", str(tmp_path), "--num", "4"])
    assert out.exit_code == 0, out.output
    assert "predicted-mask IoU" in out.output and "attention mIoU" in out.output
    att = CliRunner().invoke(app, ["attend", str(tmp_path), "--seed", "2", "--out", str(tmp_path / "att")])
    assert att.exit_code == 0, att.output
    words = __import__("json").loads((tmp_path / "att" / "words.json").read_text())
    assert [w["word"] for w in words["words"]] == words["prompt"].split()
    assert (tmp_path / "att" / "grid.png").is_file() and (tmp_path / "att" / "region.png").is_file()
    blank = CliRunner().invoke(app, ["attend", str(tmp_path), "-p", " ", "--out", str(tmp_path / "att2")])
    assert blank.exit_code == 2 and "has no words" in blank.output


def test_the_coverage_loss_adds_to_the_loss_and_reaches_the_keys(tmp_path):
    overrides = ["train.batch_size=4", "data.length=8", "model.depth=1", "model.input_size=32"]
    cfg, recipe = load_recipe(CONFIG, overrides + ["attention_losses=[{name: coverage, weight: 1.0}]"])
    task_cls = recipe.task_class
    supervised = task_cls(cfg, tmp_path)
    plain_cfg, _ = load_recipe(CONFIG, overrides + ["attention_losses=[]"])
    plain = task_cls(plain_cfg, tmp_path)
    plain.model.load_state_dict(supervised.model.state_dict())
    data = supervised.train_dataset()
    batch = supervised.collate([data[i] for i in range(4)])
    g = torch.Generator().manual_seed(0)
    loss = supervised.loss(supervised.model, batch, g)
    assert loss.item() > plain.loss(plain.model, batch, torch.Generator().manual_seed(0)).item()
    loss.backward()
    keys = [m.to_k.weight.grad for m in supervised.model.modules() if getattr(m, "is_cross", False)]
    assert keys and all(k is not None and k.abs().sum() > 0 for k in keys)
    with pytest.raises(ValueError, match="weight must be a number >= 0; got -0.5"):
        recipe.task_class(load_recipe(CONFIG, ["attention_losses=[{name: coverage, weight: -0.5}]"])[0], tmp_path)
    with pytest.raises(ValueError, match="the grounding recipe takes coverage, inside; got .*reading"):
        recipe.task_class(load_recipe(CONFIG, ["attention_losses=[{name: reading, weight: 1.0}]"])[0], tmp_path)
