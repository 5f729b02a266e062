"""mmx: multimodal conditioning with cross-attention for PyTorch.

Queries come from what is generated or analysed (image feature maps, action sequences); keys and
values come from the conditioning (text tokens, observation tokens), carried as a :class:`Context`.
"""

import logging
from typing import TYPE_CHECKING

from mmx.attnmap import AttentionCapture, AttentionRecorder, WordMap, word_maps
from mmx.context import Context, WordSpan
from mmx.nn import (
    BlockCache,
    Conv1dBlock,
    CrossAttention,
    DecoderCache,
    FeedForward,
    FiLM,
    KVCache,
    MultiHeadAttention,
    ResBlock1D,
    ResBlock2D,
    SinusoidalEmbedding,
    SpatialTransformer,
    TemporalTransformer,
    TransformerBlock,
    TransformerDecoder,
    TransformerEncoder,
    timestep_embedding,
)

if TYPE_CHECKING:  # the encoders import on first use (below); IDEs and type checkers see them here
    from mmx.encoders import CLIPTextEncoder, HFTextEncoder, ImageFeatures, ResNetFeatures

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
    # blocks
    "CrossAttention",
    "MultiHeadAttention",
    "TransformerBlock",
    "SpatialTransformer",
    "TemporalTransformer",
    "TransformerEncoder",
    "TransformerDecoder",
    "FeedForward",
    "FiLM",
    "ResBlock2D",
    "ResBlock1D",
    "Conv1dBlock",
    "SinusoidalEmbedding",
    "timestep_embedding",
    # key/value caches for step-by-step decoding
    "KVCache",
    "BlockCache",
    "DecoderCache",
    # attention maps
    "AttentionRecorder",
    "AttentionCapture",
    "WordMap",
    "word_maps",
    # encoders (imported on first use)
    "CLIPTextEncoder",
    "HFTextEncoder",
    "ResNetFeatures",
    "ImageFeatures",
]
