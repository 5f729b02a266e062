"""The sequence-to-sequence recipe: translation (Seq2SeqTransformer) and captioning (ImageCaptioner).

Training is teacher forcing: the decoder reads ``<s> w1 .. wn`` and predicts ``w1 .. wn </s>``,
cross-entropy with label smoothing, padding ignored. Validation decodes held-out compositions
and reports exact match plus the task's attention score (see :mod:`mmx.eval.seq2seq`).

A run folder holds ``config.yaml``, ``model/seq2seq/`` (safetensors + config.json),
``model/tokenizer_target.json`` (and ``model/tokenizer_source.json`` for translation),
``checkpoints/``, ``logs/`` and ``samples/step_N.json`` (decoded examples).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mmx.attnmap.capture import AttentionCapture
from mmx.attnmap.losses import build_attention_losses
from mmx.config import save_config
from mmx.recipes.seq2seq.config import Seq2SeqConfig

__all__ = ["Seq2SeqTask", "build_tokenizers", "region_grid"]

logger = logging.getLogger(__name__)

# The model each data set needs: its inputs are words (translation) or images (captioning).
MODEL_FOR_DATA = {"translation": "seq2seq", "captioning": "captioner"}


def build_tokenizers(data_name: str):
    """``(source tokenizer | None, target tokenizer)`` of a built-in data set."""
    from mmx.data import WordTokenizer, source_vocabulary, target_vocabulary

    if data_name == "translation":
        return WordTokenizer(source_vocabulary()), WordTokenizer(target_vocabulary())
    if data_name == "captioning":
        return None, WordTokenizer(source_vocabulary())
    raise ValueError(f"the seq2seq recipe trains on data 'translation' or 'captioning'; got {data_name!r}")


def _model_spec(cfg: Seq2SeqConfig, source, target) -> dict:
    data_name = cfg.data.get("name")
    spec = dict(cfg.model)
    want = MODEL_FOR_DATA[data_name]
    if spec.get("name") != want:
        raise ValueError(f"data {data_name!r} needs model.name: {want}; got model.name: {spec.get('name')!r}")
    ids = {"pad_id": target.pad_id, "bos_id": target.bos_id, "eos_id": target.eos_id}
    if source is None:
        sizes = {"vocab_size": len(target)}
    else:
        sizes = {"src_vocab_size": len(source), "tgt_vocab_size": len(target)}
    for key, value in {**sizes, **ids}.items():
        if key in spec and spec[key] != value:
            raise ValueError(f"model.{key} is {spec[key]} but the {data_name} tokenizers need {value}; leave it out")
        spec[key] = value
    return spec


class Seq2SeqTask:
    """The trainer's view of a seq2seq run (see :class:`mmx.train.trainer.Task`)."""

    def __init__(self, cfg: Seq2SeqConfig, run_dir: str | Path, trained: str | Path | None = None) -> None:
        """A fresh model and the data set's tokenizers, or, with ``trained`` (a run's ``model/``
        folder), the trained model (eval mode) and the tokenizers saved beside it."""
        from accelerate.utils import set_seed

        from mmx.data import WordTokenizer
        from mmx.models import MODELS

        if trained is None:  # first: the fresh model built below starts from weights that follow train.seed
            set_seed(cfg.train.seed)
        if not 0.0 <= cfg.token_dropout < 1.0:
            raise ValueError(f"token_dropout must be a probability in [0, 1); got {cfg.token_dropout}")
        losses = build_attention_losses(cfg.attention_losses, ("mask_kl",), "seq2seq")
        self.attention_losses = [term for term in losses if term.weight > 0]
        if self.attention_losses and cfg.data.get("name") != "captioning":
            raise ValueError(
                "attention_losses need object masks: they work with data.name: captioning; "
                f"got data.name: {cfg.data.get('name')!r}"
            )
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self._eval = None
        if trained is None:
            self.source, self.target = build_tokenizers(cfg.data.get("name"))
            self.model = MODELS.build_from_dict(_model_spec(cfg, self.source, self.target))
            return
        trained = Path(trained)
        self.target = WordTokenizer.from_file(trained / "tokenizer_target.json")
        source = trained / "tokenizer_source.json"
        self.source = WordTokenizer.from_file(source) if source.is_file() else None
        self.model = MODELS.get(cfg.model["name"]).from_pretrained(trained / "seq2seq").eval()

    @property
    def captioning(self) -> bool:
        return self.source is None

    def train_dataset(self) -> torch.utils.data.Dataset:
        from mmx.data import DATASETS

        return DATASETS.build_from_dict(dict(self.cfg.data))

    def eval_dataset(self) -> torch.utils.data.Dataset:
        from mmx.data import DATASETS

        if self._eval is None:
            spec = {k: v for k, v in self.cfg.data.items() if k not in ("split", "length", "seed")}
            self._eval = DATASETS.build_from_dict({**spec, **dict(self.cfg.eval.data)})
        return self._eval

    def collate(self, items: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        texts = [it["caption"] if self.captioning else it["target"] for it in items]
        target, target_mask = self.target.encode(texts, bos=True, eos=True)  # (B, T + 2)
        batch = {"target": target, "target_mask": target_mask}
        if self.captioning:
            batch["image"] = torch.stack([it["image"] for it in items])
            if self.attention_losses:
                batch["word_masks"] = _word_masks(items, target.shape[1] - 1)
        else:
            batch["source"], batch["source_mask"] = self.source.encode([it["source"] for it in items])
        return batch

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        device = generator.device
        target = batch["target"].to(device)
        inputs, labels = target[:, :-1], target[:, 1:]  # teacher forcing: read <s> w1..wn, predict w1..wn </s>
        if self.cfg.token_dropout > 0:
            drop = torch.rand(inputs.shape, generator=generator, device=device) < self.cfg.token_dropout
            drop[:, 0] = False  # <s> stays
            inputs = inputs.masked_fill(drop & (inputs != self.target.pad_id), self.target.unk_id)
        supervise = self.captioning and bool(self.attention_losses)
        with AttentionCapture(model) if supervise else contextlib.nullcontext() as capture:
            if self.captioning:
                logits = model(batch["image"].to(device), inputs)
            else:
                logits = model(batch["source"].to(device), inputs, batch["source_mask"].to(device))
        loss = F.cross_entropy(
            logits.flatten(0, 1).float(),
            labels.flatten(),
            ignore_index=self.target.pad_id,
            label_smoothing=self.cfg.label_smoothing,
        )
        if supervise:
            attention, masks = capture.mean_probs(), batch["word_masks"].to(device)  # (B, T, S), (B, T, H, W)
            grid = region_grid(attention, masks)
            for term in self.attention_losses:
                loss = loss + term(attention, masks, grid)
        return loss

    def score(self, model: nn.Module, data: Any = None, **overrides: Any) -> dict[str, Any]:
        """Held-out exact match and attention score (``overrides``: fields of :class:`Seq2SeqEvalConfig`)."""
        from mmx.eval.seq2seq import score_seq2seq

        ev = {
            **{
                k: getattr(self.cfg.eval, k)
                for k in ("batch_size", "max_len", "method", "beam_size", "length_penalty", "threshold", "attention")
            },
            **overrides,
        }
        return score_seq2seq(model, data if data is not None else self.eval_dataset(), self.target, self.source, **ev)

    def validate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        scores = self.score(model)
        examples = scores.pop("examples")
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"step_{step:07d}.json").write_text(json.dumps(examples, ensure_ascii=False, indent=1))
        return scores

    def save_model(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir / "seq2seq")
        self.target.save(out_dir / "tokenizer_target.json")
        if self.source is not None:
            self.source.save(out_dir / "tokenizer_source.json")
        save_config(self.cfg, self.run_dir / "config.yaml")


def _word_masks(items: list[dict[str, Any]], rows: int) -> torch.Tensor:
    """``[B, rows, H, W]`` bool: row i holds the mask of the object that caption word i names (colour
    and shape words; other rows are empty). Row i of the decoder's attention is the step that
    writes word i (it reads ``<s> w0 .. w(i-1)``)."""
    height, width = items[0]["image"].shape[-2:]
    out = torch.zeros(len(items), rows, height, width, dtype=torch.bool)
    for b, item in enumerate(items):
        for i, mask in item["word_masks"].items():
            if i < rows:
                out[b, i] = torch.as_tensor(mask, dtype=torch.bool)
    return out


def region_grid(attention: torch.Tensor, word_masks: torch.Tensor) -> tuple[int, int]:
    """The square ``(h, w)`` grid of the image regions a captioner's attention ``[B, T, S = h*w]`` reads.

    ``word_masks`` ``[B, T, H, W]`` (row i: the object word i names; empty rows: no target) must match
    its rows; the ``mask_kl`` loss then area-pools each to the grid and normalises it to sum 1.
    """
    b, t, s = attention.shape
    side = round(s**0.5)
    if side * side != s:
        raise ValueError(f"attention supervision needs a square grid of regions; got {s} regions")
    if word_masks.shape[:2] != (b, t):
        raise ValueError(f"word masks {tuple(word_masks.shape)} do not match attention {tuple(attention.shape)}")
    return side, side
