"""Text-to-region attention: a streaming recorder, per-word maps and pictures of them."""

from mmx.attnmap.recorder import AttentionRecorder
from mmx.attnmap.words import NORMALIZATIONS, WordMap, normalize_map, word_maps

__all__ = ["AttentionRecorder", "NORMALIZATIONS", "WordMap", "normalize_map", "word_maps"]
