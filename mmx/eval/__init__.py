"""Evaluation: caption accuracy of generated shapes images, how well attention maps localize, policy rollouts."""

from __future__ import annotations

from mmx.eval.detector import (
    CaptionCheck,
    Claim,
    Detection,
    accuracy_by_pair,
    caption_accuracy,
    caption_correct,
    check_caption,
    classify_pixels,
    detect_objects,
    parse_caption,
)
from mmx.eval.localization import binarize, detection_masks, iou, object_words, word_ious, word_pointing
from mmx.eval.rollout import RolloutResult, chunk_latency, evaluate_policy

__all__ = [
    "CaptionCheck",
    "Claim",
    "Detection",
    "accuracy_by_pair",
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
    "word_pointing",
    "RolloutResult",
    "chunk_latency",
    "evaluate_policy",
]
