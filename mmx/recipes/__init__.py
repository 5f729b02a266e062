"""Recipes by name: each is one unit (config, Task, load, evaluate, attend), picked by a config's ``task:`` key.

>>> from mmx.recipes import load_recipe, load_run
>>> cfg, recipe = load_recipe("configs/shapes_t2i_tiny.yaml")   # doctest: +SKIP
>>> run = load_run("runs/shapes")                              # doctest: +SKIP
>>> print(run.recipe.evaluate(run, num=8).summary())           # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from mmx.config import load_config, read_yaml
from mmx.recipes.base import Recipe, RecipeError, Result, Run
from mmx.registry import Registry

__all__ = ["RECIPES", "Recipe", "RecipeError", "Result", "Run", "get_recipe", "load_recipe", "load_run", "task_of"]

RECIPES: Registry = Registry("task")
for _name in ("text_to_image", "grounding", "policy", "seq2seq"):  # each module is imported on first use
    RECIPES.register(_name)(lambda _module=_name: importlib.import_module(f"mmx.recipes.{_module}").RECIPE)


def get_recipe(name: str) -> Recipe:
    """The recipe registered as ``name``; an unknown name lists the valid ones."""
    return RECIPES.get(name)()


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> tuple[Any, Recipe]:
    """Read a recipe YAML: ``(checked config, recipe)``. The file names its ``task:``."""
    raw = read_yaml(path)
    task = raw.get("task")
    for item in overrides or []:
        if item.startswith("task="):
            task = item.split("=", 1)[1]
    if task is None:
        raise RecipeError(f"{path} names no task; add `task: <name>` (one of {', '.join(RECIPES.names())})")
    recipe = get_recipe(str(task))
    return load_config(raw, recipe.config_class, overrides), recipe


def task_of(path: str | Path) -> str:
    """The task a run folder was trained by (its ``config.yaml``); errors name what is missing."""
    config = Path(path) / "config.yaml"
    if not config.is_file():
        raise FileNotFoundError(f"{path} is not an mmx run: {config} not found")
    task = read_yaml(config).get("task")
    if task is None:
        raise RecipeError(f"{config} names no task")
    return str(task)


def load_run(path: str | Path, overrides: list[str] | None = None, device: str = "cpu") -> Run:
    """Rebuild a finished run folder with its own recipe (``overrides``: ``key=value`` changes to its config)."""
    path = Path(path)
    recipe = get_recipe(task_of(path))
    if not (path / recipe.model_folder).exists():
        raise FileNotFoundError(
            f"{path} has no trained model: {path / recipe.model_folder} not found (did training finish?)"
        )
    return recipe.load(path, overrides, device)
