"""The grounding recipe: GroundingNet learns which region of a shapes image a phrase names.

``config`` (what a YAML file holds), ``task`` (phrases and masks, the trainer's view) and
``recipe`` (load, evaluate, attend).
"""

from mmx.recipes.grounding.config import GroundingConfig, GroundingEvalConfig
from mmx.recipes.grounding.recipe import RECIPE, GroundingRecipe, TrainedGrounding
from mmx.recipes.grounding.task import GroundingTask, PhraseData, grounding_scores

__all__ = [
    "RECIPE",
    "GroundingConfig",
    "GroundingEvalConfig",
    "GroundingRecipe",
    "GroundingTask",
    "PhraseData",
    "TrainedGrounding",
    "grounding_scores",
]
