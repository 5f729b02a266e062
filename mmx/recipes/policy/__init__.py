"""The policy recipe: a diffusion policy trained on demonstrations, scored by rollouts in a simulator.

``config`` (what a YAML file holds), ``task`` (the replay buffer, the policy of a config, the
trainer's view) and ``recipe`` (load, evaluate, attend).
"""

from mmx.recipes.policy.config import (
    PolicyConfig,
    PolicyDataConfig,
    PolicyDiffusionConfig,
    PolicyEvalConfig,
    PolicyModelConfig,
)
from mmx.recipes.policy.recipe import RECIPE, PolicyRecipe
from mmx.recipes.policy.task import WEIGHTS, PolicyTask, build_policy, load_buffer, save_policy

__all__ = [
    "RECIPE",
    "WEIGHTS",
    "PolicyConfig",
    "PolicyDataConfig",
    "PolicyDiffusionConfig",
    "PolicyEvalConfig",
    "PolicyModelConfig",
    "PolicyRecipe",
    "PolicyTask",
    "build_policy",
    "load_buffer",
    "save_policy",
]
