"""Which text tokens of a diffusers pipeline belong to which word of the prompt.

Each family feeds its denoiser one sequence of text tokens, made of one or two segments: CLIP
(SD, SDXL, SD3's first 77 tokens) and T5 (SD3's rest, all of Flux's). A segment's word spans
come from the pipeline's own tokenizer, through its offsets mapping, with the same padding and
truncation the pipeline uses, so token ``i`` of a map is token ``i`` the denoiser read.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from mmx.encoders.base import hf_tokenize

__all__ = ["Segment", "TracedWord", "PromptTokens", "prompt_tokens"]


@dataclass(frozen=True)
class Segment:
    """A run of the text tokens that one tokenizer made: ``label`` (e.g. ``"clip"``), ``[start, end)``."""

    label: str
    start: int
    end: int


@dataclass
class TracedWord:
    """One whitespace word of a prompt and the text tokens it became, in every segment."""

    word: str
    index: int  # position among the prompt's words
    tokens: list[int] = field(default_factory=list)  # token positions in the denoiser's text sequence
    segments: list[str] = field(default_factory=list)  # the label of each token's segment


@dataclass
class PromptTokens:
    """The words of one prompt, the special tokens beside them, and what truncation cut."""

    prompt: str
    words: list[TracedWord]
    special: dict[str, list[int]]  # "start", "end", "padding": token positions
    truncated: dict[str, int]  # segment label -> tokens cut from the prompt (0: none)


def _specials(ids: torch.Tensor, mask: torch.Tensor, content: set[int], tokenizer, start: int) -> dict[str, list[int]]:
    """Positions (offset by ``start``) of the start, end and padding tokens of one tokenized row."""
    out = {"start": [], "end": [], "padding": []}
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    seen_end = False
    for i, (token, real) in enumerate(zip(ids.tolist(), mask.tolist())):
        if i in content:
            continue
        if not real or seen_end:
            out["padding"].append(start + i)
        elif token == eos and (eos != pad or not seen_end):
            out["end"].append(start + i)
            seen_end = True
        elif token == bos:
            out["start"].append(start + i)
        else:
            out["padding"].append(start + i)
    return out


def prompt_tokens(prompts: list[str], segments: list[tuple[str, object, int, list[str] | None]]) -> list[PromptTokens]:
    """Words of each prompt over the segments ``(label, tokenizer, length, texts or None)``, in order.

    ``texts`` is what that tokenizer was given (a family feeds a second prompt to some of its
    encoders, e.g. Flux's ``prompt_2`` to T5); None means ``prompts``. Words are numbered by
    ``prompts``; a segment's words are matched to them by position.
    """
    result = [
        PromptTokens(
            p, [TracedWord(w, i) for i, w in enumerate(p.split())], {"start": [], "end": [], "padding": []}, {}
        )
        for p in prompts
    ]
    offset = 0
    for label, tokenizer, length, texts in segments:
        texts = list(prompts if texts is None else texts)
        ids, mask, spans, cut = hf_tokenize(tokenizer, texts, length, pad_to_max=True, who=label)
        for row, item in enumerate(result):
            content = set()
            for index, span in enumerate(spans[row]):
                positions = list(range(span.start, span.end))
                content.update(positions)
                if index < len(item.words):
                    word = item.words[index]
                    word.tokens += [offset + p for p in positions]
                    word.segments += [label] * len(positions)
            special = _specials(ids[row], mask[row], content, tokenizer, offset)
            for key, positions in special.items():
                item.special[key] += positions
            item.truncated[label] = int(cut[row])
        offset += length
    return result
