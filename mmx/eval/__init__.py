"""Evaluation: caption accuracy of generated shapes images (object detector + caption parser)."""

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
]
