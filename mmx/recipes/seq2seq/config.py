"""The seq2seq recipe's config: model and data specs, label smoothing, word dropout, held-out decoding."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmx.train.trainer import TrainConfig

__all__ = ["Seq2SeqConfig", "Seq2SeqEvalConfig"]


@dataclass
class Seq2SeqEvalConfig:
    """Held-out compositions decoded at validation and by ``mmx eval``."""

    data: dict = field(default_factory=lambda: {"split": "heldout", "length": 256, "seed": 1})
    batch_size: int = 64
    max_len: int = 40
    method: Literal["greedy", "beam"] = "greedy"
    beam_size: int = 4
    length_penalty: float = 1.0
    threshold: float = 0.4
    attention: bool = True


@dataclass
class Seq2SeqConfig:
    """Everything a seq2seq run needs; ``model`` and ``data`` are registry specs.

    ``data.name`` is ``translation`` (with ``model.name: seq2seq``) or ``captioning`` (with
    ``model.name: captioner``); vocabulary sizes and special ids are filled in from the tokenizers.
    """

    task: Literal["seq2seq"] = "seq2seq"
    model: dict = field(default_factory=lambda: {"name": "seq2seq"})
    data: dict = field(default_factory=lambda: {"name": "translation", "split": "train", "length": 20000})
    label_smoothing: float = 0.1
    # Word dropout on the decoder's inputs (Bowman et al., 2016): each input word but <s> becomes
    # <unk> with this probability, so the next word must come from the source / image, not from
    # the words before it (the prior that writes "blue square" where the image shows a blue circle).
    token_dropout: float = 0.0
    # Losses on the decoder's cross-attention (captioning; mmx.attnmap.losses: mask_kl, as
    # {name: mask_kl, weight: 1.0}; Liu et al., 2017, "Attention correctness in neural image
    # captioning"): each colour and shape word's attention (mean over heads and decoder layers) is
    # pulled toward its object's mask, spread evenly over the regions it covers. None: the maps
    # are whatever the caption loss makes them.
    attention_losses: list[dict] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: Seq2SeqEvalConfig = field(default_factory=Seq2SeqEvalConfig)
