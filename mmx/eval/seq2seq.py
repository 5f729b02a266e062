"""Scores of the sequence tasks: exact match, and whether each generated word read the right thing.

* Exact match: a generated sentence scores 1 only if it equals the reference word for word.
* Translation: alignment accuracy, the share of aligned target words (colour, shape, place, "and")
  whose strongest cross-attention falls on the source word they translate (sentences that match
  exactly).
* Captioning: attention mIoU, as for text-to-image (DAAM's protocol): each colour and shape word's
  map over the image, min-max normalised and thresholded at 0.4, against the mask of the object
  it names (objects the caption names but the image lacks are skipped); and the pointing game
  (the share of those maps whose peak lies inside the object).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["exact_match", "score_seq2seq", "decode_batch", "caption_masks"]

logger = logging.getLogger(__name__)


def exact_match(predictions: Sequence[str], references: Sequence[str]) -> float:
    """The share of predictions equal to their reference (whitespace-normalised)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("exact_match needs at least one pair")
    hits = sum(" ".join(p.split()) == " ".join(r.split()) for p, r in zip(predictions, references))
    return hits / len(references)


@torch.no_grad()
def decode_batch(
    model: nn.Module,
    memory: Any,
    method: str = "greedy",
    max_len: int = 48,
    beam_size: int = 4,
    length_penalty: float = 1.0,
    use_cache: bool = True,
):
    """Greedy or beam decoding of one batch of encoded inputs (a :class:`mmx.decoding.Decoded`)."""
    from mmx.decoding import beam_search, greedy_decode

    if method == "greedy":
        return greedy_decode(model, memory, max_len=max_len, use_cache=use_cache)
    if method == "beam":
        return beam_search(
            model, memory, beam_size=beam_size, max_len=max_len, length_penalty=length_penalty, use_cache=use_cache
        )
    raise ValueError(f"unknown decoding method {method!r}; valid: greedy, beam")


def caption_masks(caption: str, objects: Sequence[Any]) -> dict[int, torch.Tensor]:
    """Word index -> mask of the image object that the generated caption's colour / shape word names."""
    from mmx.eval.localization import object_words

    try:
        claims = object_words(caption)
    except (ValueError, StopIteration):
        return {}
    masks: dict[int, torch.Tensor] = {}
    for claim, colour_word, shape_word in claims:
        for obj in objects:
            if (obj.colour, obj.shape, obj.position) == (claim.colour, claim.shape, claim.position):
                masks[colour_word] = masks[shape_word] = obj.mask
    return masks


@torch.no_grad()
def score_seq2seq(
    model: nn.Module,
    data: Any,
    target_tokenizer: Any,
    source_tokenizer: Any | None = None,
    batch_size: int = 64,
    max_len: int = 48,
    method: str = "greedy",
    beam_size: int = 4,
    length_penalty: float = 1.0,
    threshold: float = 0.4,
    attention: bool = True,
    keep_examples: int = 8,
) -> dict[str, Any]:
    """Exact match (and the attention score of the task) of ``model`` on ``data``.

    ``data`` items are translation pairs (``source``, ``target``, ``alignment``; give
    ``source_tokenizer``) or captioned images (``image``, ``caption``, ``objects``).
    Returns ``{"exact_match", "alignment_accuracy" | ("attention_miou", "attention_pointing"),
    "examples": [...]}``.
    """
    from mmx.attnmap.seq2seq import caption_word_maps, decoder_attention, region_maps
    from mmx.eval.localization import word_ious, word_pointing

    device = next(model.parameters()).device
    captioning = source_tokenizer is None
    predictions, references, examples = [], [], []
    aligned = aligned_hits = 0
    ious: list[float] = []
    pointing: list[bool] = []
    for start in range(0, len(data), batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
        if captioning:
            memory = model.encode(torch.stack([it["image"] for it in items]).to(device))
            refs = [it["caption"] for it in items]
        else:
            ids, mask = source_tokenizer.encode([it["source"] for it in items])
            memory = model.encode(ids.to(device), mask.to(device))
            refs = [it["target"] for it in items]
        decoded = decode_batch(model, memory, method, max_len, beam_size, length_penalty)
        outputs = target_tokenizer.decode(decoded.tokens)
        predictions += outputs
        references += refs
        if attention:
            att = decoder_attention(model, memory, decoded.tokens)  # (B, T, S)
            if captioning:
                size = tuple(items[0]["image"].shape[-2:])
                maps = region_maps(att, memory.grid, size)  # (B, T, H, W)
                for it, out, m in zip(items, outputs, maps):
                    words = out.split()
                    masks = caption_masks(out, it["objects"])
                    word_maps = caption_word_maps(words, m.cpu())
                    ious += word_ious(word_maps, masks, threshold).values()
                    pointing += word_pointing(word_maps, masks).values()
            else:
                for it, out, a in zip(items, outputs, att):
                    if out != it["target"]:
                        continue
                    for t, s in it["alignment"]:
                        aligned += 1
                        aligned_hits += int(a[t].argmax().item() == s)
        for it, ref, out in zip(items, refs, outputs):
            if len(examples) < keep_examples:
                source = f"image #{it['index']}" if captioning else it["source"]
                examples.append({"input": source, "reference": ref, "output": out})
    scores: dict[str, Any] = {"exact_match": exact_match(predictions, references)}
    if attention and captioning:
        scores["attention_miou"] = sum(ious) / len(ious) if ious else float("nan")
        scores["attention_pointing"] = sum(pointing) / len(pointing) if pointing else float("nan")
    elif attention:
        scores["alignment_accuracy"] = aligned_hits / aligned if aligned else float("nan")
    scores["examples"] = examples
    return scores
