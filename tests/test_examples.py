"""Smoke runs of the examples: they must keep working on the public API."""

import importlib.util
from pathlib import Path

EXAMPLES = Path(__file__).parents[1] / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_blocks_example_trains_and_the_caption_helps():
    example = _load("import_blocks")
    results = example.main(steps=120)
    plain, conditioned = results["plain CNN"], results["CNN + mmx.SpatialTransformer"]
    assert conditioned < plain, f"reading the caption should lower the loss: {conditioned:.4f} vs {plain:.4f}"


def test_import_blocks_adds_few_lines():
    """The conditioned CNN is the plain one plus a handful of lines."""
    source = (EXAMPLES / "import_blocks.py").read_text()
    start = source.index("class TextConditionedCNN")
    end = source.index("# ---- data and training")
    added = [line for line in source[start:end].splitlines() if line.strip()]
    assert len(added) <= 30


def test_reach_policy_example_runs(tmp_path):
    example = _load("train_reach_policy")
    summary = example.main(steps=4, episodes=4, eval_episodes=2, out=str(tmp_path / "run"), batch_size=16)
    assert 0.0 <= summary["success_rate"] <= 1.0 and summary["mean_steps"] > 0


def test_caption_image_example_runs(tmp_path):
    example = _load("caption_image")
    run = tmp_path / "run"
    caption = example.main(run=str(run), steps=3)
    assert isinstance(caption, str) and (run / "caption_attention.png").is_file()
