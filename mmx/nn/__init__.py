"""Attention math and conditioning blocks: pure ``nn.Module``s, no noise, no I/O."""

from mmx.nn.attention import CrossAttention, MultiHeadAttention, attention_probs, prepare_mask
from mmx.nn.conditioning import FiLM, ResBlock1D, ResBlock2D, Conv1dBlock, SinusoidalEmbedding, timestep_embedding
from mmx.nn.transformer import FeedForward, GEGLU, SpatialTransformer, TemporalTransformer, TransformerBlock, group_norm

__all__ = [
    "CrossAttention",
    "MultiHeadAttention",
    "attention_probs",
    "prepare_mask",
    "TransformerBlock",
    "SpatialTransformer",
    "TemporalTransformer",
    "FeedForward",
    "GEGLU",
    "group_norm",
    "FiLM",
    "ResBlock2D",
    "ResBlock1D",
    "Conv1dBlock",
    "SinusoidalEmbedding",
    "timestep_embedding",
]
