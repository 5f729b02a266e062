"""mmx: multimodal conditioning with cross-attention for PyTorch.

Queries come from what is generated or analysed (image feature maps, action sequences); keys and
values come from the conditioning (text tokens, observation tokens), carried as a :class:`Context`.
"""

import logging

from mmx.context import Context, WordSpan
from mmx.nn import (
    Conv1dBlock,
    CrossAttention,
    FeedForward,
    FiLM,
    MultiHeadAttention,
    ResBlock1D,
    ResBlock2D,
    SinusoidalEmbedding,
    SpatialTransformer,
    TemporalTransformer,
    TransformerBlock,
    timestep_embedding,
)

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

_LAZY = {"CLIPTextEncoder", "HFTextEncoder", "ResNetFeatures", "ImageFeatures"}


def __getattr__(name: str):
    """Encoders import on first use, so ``import mmx`` stays light (PEP 562)."""
    if name in _LAZY:
        import mmx.encoders

        return getattr(mmx.encoders, name)
    raise AttributeError(f"module 'mmx' has no attribute {name!r}")

__all__ = [
    "__version__",
    "Context",
    "WordSpan",
    "CrossAttention",
    "MultiHeadAttention",
    "TransformerBlock",
    "SpatialTransformer",
    "TemporalTransformer",
    "FeedForward",
    "FiLM",
    "ResBlock2D",
    "ResBlock1D",
    "Conv1dBlock",
    "SinusoidalEmbedding",
    "timestep_embedding",
    "CLIPTextEncoder",
    "HFTextEncoder",
    "ResNetFeatures",
    "ImageFeatures",
]
