"""Attention maps for the diffusers pipelines people run: ``trace(pipe)`` (SD, SDXL, SD3, Flux).

``trace.py`` attaches to a pipeline and reads the call; ``joint.py`` computes the image -> text
probabilities of a (joint) attention call beside the fused kernel; ``words.py`` maps the
pipeline tokenizers' tokens to words; ``result.py`` holds the maps and draws them.
"""

from mmx.attnmap.pipelines.joint import image_text_probs
from mmx.attnmap.pipelines.result import TraceResult
from mmx.attnmap.pipelines.trace import FAMILIES, detect_family, trace

__all__ = ["FAMILIES", "TraceResult", "detect_family", "image_text_probs", "trace"]
