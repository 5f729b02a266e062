"""Recipes by name: the ``task:`` key of a YAML config picks its config class and trainer Task."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from mmx.config import load_config, read_yaml
from mmx.registry import Registry

__all__ = ["RECIPES", "load_recipe"]

RECIPES: Registry = Registry("task")


def _lazy(module: str, config: str, task: str):
    def pair() -> tuple[type, type]:
        m = importlib.import_module(module)
        return getattr(m, config), getattr(m, task)

    return pair


RECIPES.register("text_to_image")(_lazy("mmx.train.text_to_image", "TextToImageConfig", "TextToImageTask"))
RECIPES.register("grounding")(_lazy("mmx.train.grounding", "GroundingConfig", "GroundingTask"))
RECIPES.register("policy")(_lazy("mmx.train.policy", "PolicyConfig", "PolicyTask"))
RECIPES.register("seq2seq")(_lazy("mmx.train.seq2seq", "Seq2SeqConfig", "Seq2SeqTask"))


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Any, type]:
    """Read a recipe YAML: ``(checked config, Task class)``; ``task`` defaults to text_to_image."""
    raw = read_yaml(path)
    task = str(raw.get("task", "text_to_image"))
    for item in overrides or []:
        if item.startswith("task="):
            task = item.split("=", 1)[1]
    config_cls, task_cls = RECIPES.get(task)()
    return load_config(raw, config_cls, overrides), task_cls
