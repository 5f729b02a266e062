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


TINY = {  # each recipe's tiny config, and the options its evaluate and attend take here
    "text_to_image": ("configs/shapes_t2i_tiny.yaml", {"num": 2, "steps": 2}, {"prompt": "a red circle", "steps": 2}),
    "policy": (
        "configs/policy_targets_tiny.yaml",
        {"num": 2, "steps": 2},
        {"prompt": "go to the red circle", "steps": 2},
    ),
    "seq2seq": ("configs/seq2seq_translation_tiny.yaml", {"num": 2}, {"prompt": "a red circle on the left"}),
    "grounding": ("configs/shapes_grounding_tiny.yaml", {"num": 2}, {"seed": 1}),
}


def test_every_recipe_has_a_tiny_config_here():
    assert sorted(TINY) == sorted(RECIPES.names())


@pytest.mark.parametrize("name", sorted(TINY))
def test_each_tiny_recipe_trains_evaluates_and_attends_through_the_registry(name, tmp_path):
    from mmx.recipes import load_run
    from mmx.train import train

    config, evaluate, attend = TINY[name]
    cfg, recipe = load_recipe(config, ["train.max_steps=2", "train.tensorboard=false", "train.progress=false"])
    assert recipe is get_recipe(name) and isinstance(cfg, recipe.config_class)
    run_dir = tmp_path / "run"
    assert train(recipe.task_class(cfg, run_dir), cfg.train, run_dir).step == 2
    run = load_run(run_dir)
    assert run.recipe is recipe and run.config == cfg
    report = recipe.evaluate(run, **evaluate)
    written = report.save(tmp_path / "eval")
    assert tmp_path / "eval" / "eval.json" in written and report.summary()
    maps = recipe.attend(run, **attend)
    written = maps.save(tmp_path / "attend")
    assert any(path.suffix == ".png" for path in written) and any(path.suffix == ".json" for path in written)
