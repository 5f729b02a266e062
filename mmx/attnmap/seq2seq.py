"""What each generated word read: decoder cross-attention of a seq2seq model or an image captioner.

The generated sequence is fed back once through the decoder (teacher forcing) inside an
:class:`~mmx.attnmap.AttentionRecorder` in sequence mode, so row ``t`` is the attention of the
query that *produced* token ``t`` (its input is the token before it), whatever decoding method
produced the sequence (greedy, beam search with reordered caches, sampling). Causal attention
makes that pass compute exactly the probabilities of the decoding steps.

* translation: ``[T, S]`` word-alignment matrix (generated word x source word);
* captioning: ``[T, h, w]`` region maps, one per generated word, drawn on the image with
  :func:`mmx.attnmap.save_word_grid`.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mmx.attnmap.plot import _plt, _save
from mmx.attnmap.recorder import AttentionRecorder
from mmx.attnmap.words import WordMap, normalize_map
from mmx.context import Context, WordSpan

__all__ = ["decoder_attention", "region_maps", "caption_word_maps", "save_alignment"]


@torch.no_grad()
def decoder_attention(
    model: nn.Module, memory: Context, tokens: torch.Tensor, layers: Sequence[str] | None = None
) -> torch.Tensor:
    """``[B, T, S]``: for each generated token, the decoder's cross-attention over the memory.

    Args:
        model: a model with ``decode(tokens, memory)`` and ``config.bos_id`` (Seq2SeqTransformer,
            ImageCaptioner).
        memory: the encoder output the tokens were generated from (``model.encode(...)``).
        tokens: generated ids ``[B, T]`` without BEGIN (as :class:`mmx.decoding.Decoded` holds them).
        layers: substrings of the decoder layers to keep (default: every cross-attention layer).

    Rows are averaged over heads and layers (each row sums to 1 over the real memory tokens).
    """
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise ValueError(f"tokens must be [B, T] with T >= 1; got {tuple(tokens.shape)}")
    bos = torch.full_like(tokens[:, :1], model.config.bos_id)
    inputs = torch.cat([bos, tokens[:, :-1]], dim=1)  # (B, T): input t produced token t
    with AttentionRecorder(model, image_size=tokens.shape[1], layers=layers) as recorder:
        model.decode(inputs, memory)
    att = recorder.maps()[:, :, 0, :].transpose(1, 2)  # (B, S, 1, T) -> (B, T, S)
    return att / att.sum(dim=-1, keepdim=True).clamp_min(1e-12)


def region_maps(attention: torch.Tensor, grid: tuple[int, int], image_size: tuple[int, int]) -> torch.Tensor:
    """``[B, T, S]`` attention over ``h*w`` image tokens -> ``[B, T, H, W]`` maps (bilinear)."""
    b, t, s = attention.shape
    h, w = grid
    if h * w != s:
        raise ValueError(f"attention over {s} tokens cannot lie on a {h}x{w} grid")
    maps = attention.reshape(b, t, h, w)
    return F.interpolate(maps, size=tuple(image_size), mode="bilinear", align_corners=False)


def caption_word_maps(words: Sequence[str], maps: torch.Tensor, normalization: str = "minmax") -> list[WordMap]:
    """One :class:`WordMap` per generated word of one caption (``maps``: ``[T, H, W]``, T >= len(words))."""
    return [
        WordMap(word, i, WordSpan(word, i, i + 1), normalize_map(maps[i], normalization))
        for i, word in enumerate(words)
    ]


# Fonts that draw Chinese characters, tried in order; without one, non-ASCII words use ``fallback_labels``.
CJK_FONTS = (
    "Noto Sans CJK SC",
    "Noto Sans SC",
    "Source Han Sans SC",
    "WenQuanYi Zen Hei",
    "WenQuanYi Micro Hei",
    "SimHei",
    "Microsoft YaHei",
    "PingFang SC",
    "Heiti SC",
    "Arial Unicode MS",
)


def _cjk_font() -> str | None:
    from matplotlib.font_manager import fontManager

    installed = {f.name for f in fontManager.ttflist}
    return next((name for name in CJK_FONTS if name in installed), None)


def save_alignment(
    attention: torch.Tensor,
    source_words: Sequence[str],
    target_words: Sequence[str],
    path: str | Path,
    title: str | None = None,
    fallback_labels: dict[str, str] | None = None,
) -> Path:
    """A word-alignment picture: generated words (rows) x source words (columns), shaded by attention.

    ``attention`` is ``[T, S]`` (at least ``len(target_words) x len(source_words)``). Words outside
    ASCII (in the labels and the title) are drawn with a CJK font when one is installed
    (:data:`CJK_FONTS`); otherwise as ``fallback_labels[word]`` (e.g. a romanisation) when given.
    """
    plt = _plt()
    t, s = len(target_words), len(source_words)
    matrix = attention[:t, :s].detach().float().cpu().numpy()
    font = _cjk_font()

    def name(word: str) -> str:
        if font is None and not word.isascii() and fallback_labels:
            return fallback_labels.get(word, word)
        return word

    style = {"font.sans-serif": [font, *plt.rcParams["font.sans-serif"]]} if font else {}
    with plt.rc_context(style):
        fig, ax = plt.subplots(figsize=(0.42 * s + 2.0, 0.36 * t + 1.6))
        shown = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=max(float(matrix.max()), 1e-6), aspect="auto")
        ax.set_xticks(range(s), [name(w) for w in source_words], rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(t), [name(w) for w in target_words], fontsize=8)
        ax.set_xlabel("source word (keys, values)")
        ax.set_ylabel("generated word (queries)")
        fig.colorbar(shown, ax=ax, fraction=0.03, pad=0.02, label="cross-attention")
        if title:
            ax.set_title("\n".join(textwrap.wrap(" ".join(name(w) for w in title.split()), 80)), fontsize=9)
        return _save(fig, Path(path))
