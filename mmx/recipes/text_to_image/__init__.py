"""The text-to-image recipe: captions -> images, a UNet reading a frozen text encoder through cross-attention.

``config`` (what a YAML file holds), ``pipeline`` (the TextToImage of a config, the image size stated
once, held-out data), ``task`` (the trainer's view), ``metrics`` (what a run is scored by: METRICS,
Evaluator) and ``recipe`` (load, evaluate, attend, sample, demo).
"""

from mmx.recipes.text_to_image.config import DiffusionConfig, EvalConfig, TextToImageConfig
from mmx.recipes.text_to_image.metrics import METRICS, Evaluation, Evaluator
from mmx.recipes.text_to_image.pipeline import (
    build_data,
    build_evaluator,
    build_pipeline,
    caption_components,
    eval_data_spec,
    fit_data_spec,
    heldout_prompts,
)
from mmx.recipes.text_to_image.recipe import RECIPE, TextToImageRecipe
from mmx.recipes.text_to_image.task import TextToImageTask

__all__ = [
    "METRICS",
    "RECIPE",
    "DiffusionConfig",
    "EvalConfig",
    "Evaluation",
    "Evaluator",
    "TextToImageConfig",
    "TextToImageRecipe",
    "TextToImageTask",
    "build_data",
    "build_evaluator",
    "build_pipeline",
    "caption_components",
    "eval_data_spec",
    "fit_data_spec",
    "heldout_prompts",
]
