"""The sequence-to-sequence recipe: translation (Seq2SeqTransformer) and captioning (ImageCaptioner).

``config`` (what a YAML file holds), ``task`` (tokenizers, teacher forcing, validation by decoding)
and ``recipe`` (load, evaluate, attend).
"""

from mmx.recipes.seq2seq.config import Seq2SeqConfig, Seq2SeqEvalConfig
from mmx.recipes.seq2seq.recipe import RECIPE, Seq2SeqRecipe
from mmx.recipes.seq2seq.task import Seq2SeqTask, build_tokenizers, region_grid

__all__ = [
    "RECIPE",
    "Seq2SeqConfig",
    "Seq2SeqEvalConfig",
    "Seq2SeqRecipe",
    "Seq2SeqTask",
    "build_tokenizers",
    "region_grid",
]
