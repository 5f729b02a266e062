"""Evaluation: caption accuracy of generated shapes images, and how well attention maps localize."""

from __future__ import annotations

from mmx.eval.detector import (
    CaptionCheck,
    Claim,
    Detection,
    caption_accuracy,
    caption_correct,
    check_caption,
    classify_pixels,
    detect_objects,
    parse_caption,
)
from mmx.eval.localization import binarize, detection_masks, iou, object_words, word_ious

__all__ = [
    "CaptionCheck",
    "Claim",
    "Detection",
    "caption_accuracy",
    "caption_correct",
    "check_caption",
    "classify_pixels",
    "detect_objects",
    "parse_caption",
    "binarize",
    "detection_masks",
    "iou",
    "object_words",
    "word_ious",
]
