"""The recipe registry: configs name their task, runs name theirs, and options a recipe cannot use are refused."""

from pathlib import Path

import pytest

from mmx.recipes import RECIPES, RecipeError, get_recipe, load_recipe, task_of


def test_unknown_task_lists_the_recipes(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: painting\n")
    with pytest.raises(KeyError, match="grounding, policy, seq2seq, text_to_image"):
        load_recipe(bad)


def test_every_shipped_config_names_a_registered_task():
    import yaml

    for config in sorted(Path("configs").glob("*.yaml")):
        task = yaml.safe_load(config.read_text()).get("task")
        assert task in RECIPES, f"{config} names task {task!r}"
        get_recipe(task)  # its module imports


def test_a_config_or_run_without_a_task_is_named(tmp_path):
    (tmp_path / "config.yaml").write_text("train: {max_steps: 1}\n")
    with pytest.raises(RecipeError, match="names no task; add `task: <name>`"):
        load_recipe(tmp_path / "config.yaml")
    with pytest.raises(RecipeError, match="names no task"):
        task_of(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not an mmx run"):
        task_of(tmp_path / "nowhere")


def test_options_a_recipe_has_no_use_for_are_refused_by_name():
    recipe = get_recipe("seq2seq")
    assert recipe.options(recipe.evaluate, {"num": 4, "beam": None, "steps": None}) == {"num": 4}
    with pytest.raises(RecipeError, match="--steps do.*not apply to seq2seq runs; they take: --beam, --num"):
        recipe.options(recipe.evaluate, {"num": 4, "steps": 2})
