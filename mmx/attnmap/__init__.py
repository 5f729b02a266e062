"""Text-to-region attention: a streaming recorder, per-word maps, policy attention and pictures of them."""

from mmx.attnmap.plot import save_overlay, save_steps_gif, save_word_grid
from mmx.attnmap.policy import PolicyAttention, attend_policy, save_region_overlays, save_token_heatmap
from mmx.attnmap.recorder import AttentionRecorder
from mmx.attnmap.text_to_image import attend_generate, attend_real
from mmx.attnmap.words import NORMALIZATIONS, WordMap, normalize_map, word_maps

__all__ = [
    "AttentionRecorder",
    "NORMALIZATIONS",
    "PolicyAttention",
    "WordMap",
    "attend_generate",
    "attend_policy",
    "attend_real",
    "normalize_map",
    "save_region_overlays",
    "save_token_heatmap",
    "save_overlay",
    "save_steps_gif",
    "save_word_grid",
    "word_maps",
]
