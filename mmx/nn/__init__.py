"""Attention math and conditioning blocks: pure ``nn.Module``s, no noise, no I/O."""

from mmx.nn.attention import CrossAttention, MultiHeadAttention, attention_probs
from mmx.nn.conditioning import Conv1dBlock, FiLM, ResBlock1D, ResBlock2D, SinusoidalEmbedding, timestep_embedding
from mmx.nn.kv_cache import KVCache
from mmx.nn.masks import prepare_mask
from mmx.nn.seq2seq import (
    DecoderCache,
    TransformerDecoder,
    TransformerEncoder,
    positions_from_mask,
    sinusoidal_positions,
)
from mmx.nn.transformer import (
    GEGLU,
    BlockCache,
    FeedForward,
    SpatialTransformer,
    TemporalTransformer,
    TransformerBlock,
    grid_fourier_features,
    group_norm,
)

__all__ = [
    "CrossAttention",
    "MultiHeadAttention",
    "KVCache",
    "attention_probs",
    "prepare_mask",
    "TransformerBlock",
    "BlockCache",
    "TransformerEncoder",
    "TransformerDecoder",
    "DecoderCache",
    "sinusoidal_positions",
    "positions_from_mask",
    "SpatialTransformer",
    "TemporalTransformer",
    "FeedForward",
    "GEGLU",
    "grid_fourier_features",
    "group_norm",
    "FiLM",
    "ResBlock2D",
    "ResBlock1D",
    "Conv1dBlock",
    "SinusoidalEmbedding",
    "timestep_embedding",
]
