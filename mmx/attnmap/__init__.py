"""Text-to-region attention: a streaming recorder, per-word maps, policy attention, pictures of them, and
differentiable maps (AttentionCapture) with the training losses on them (ATTENTION_LOSSES)."""

from mmx.attnmap.capture import AttentionCapture, GroundingCapture, TokenTargets, mask_kl, token_targets
from mmx.attnmap.grid import query_grid
from mmx.attnmap.losses import ATTENTION_LOSSES, AttentionLoss, build_attention_losses
from mmx.attnmap.pipelines import TraceResult, trace
from mmx.attnmap.plot import save_overlay, save_steps_gif, save_word_grid
from mmx.attnmap.policy import PolicyAttention, attend_policy, save_region_overlays, save_token_heatmap
from mmx.attnmap.recorder import AttentionRecorder
from mmx.attnmap.text_to_image import attend_generate, attend_real
from mmx.attnmap.words import NORMALIZATIONS, WordMap, normalize_map, word_maps

__all__ = [
    "ATTENTION_LOSSES",
    "AttentionCapture",
    "AttentionLoss",
    "AttentionRecorder",
    "GroundingCapture",
    "TokenTargets",
    "build_attention_losses",
    "mask_kl",
    "query_grid",
    "token_targets",
    "trace",
    "TraceResult",
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
