"""CLIP text encoder on open_clip: per-token states, the projected end-of-text feature, word spans.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language Supervision".
Letters: B batch, S tokens, D width.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmx.context import WordSpan
from mmx.encoders.base import (
    ENCODERS,
    TextEncoder,
    hf_tokenize,
    preview,
    spans_from_counts,
    spans_from_prefixes,
)

__all__ = ["CLIPTextEncoder"]

logger = logging.getLogger(__name__)

_CHECKPOINT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".npz")


@ENCODERS.register("clip")
class CLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip model as a conditioning source.

    ``forward(texts)`` returns a Context with ``tokens [B, S, D]`` (states after ``ln_final``,
    S = the model's context length), ``mask [B, S]`` (True up to and including end-of-text),
    ``pooled [B, Dp]`` (exactly ``model.encode_text(ids)``) and per-word token spans.

    Args:
        model_name: an open_clip architecture (``open_clip.list_models()``), or an
            ``hf-hub:`` / ``local-dir:`` name as open_clip understands it.
        pretrained: an open_clip tag (e.g. ``"openai"``, loaded through open_clip's cache), a local
            checkpoint file of the full open_clip model, or None for random weights.
        context_length: override the model's token limit (open_clip resizes the positional
            embedding, by interpolation when loading pretrained weights).
        freeze: no gradients and eval mode, even when a parent module is put in training mode.
    """

    def __init__(
        self,
        model_name: str = "ViT-B-32",
        pretrained: str | os.PathLike | None = None,
        context_length: int | None = None,
        freeze: bool = True,
    ) -> None:
        super().__init__(model_name, freeze)
        import open_clip

        self.model_name = model_name
        self.pretrained = None if pretrained is None else os.fspath(pretrained)
        check_model_name(open_clip, model_name)
        model = create_model(open_clip, model_name, self.pretrained, context_length)
        if isinstance(model, open_clip.CoCa):
            raise NotImplementedError(_coca_message(model_name))
        if getattr(model, "visual", None) is not None:
            model.visual = None  # the image tower is never used here; free its memory
        self.model = model
        # the submodule whose output are the token states, by name (a plain attribute would register it twice)
        self._states, self._dim, self._pooled_dim = _text_tower(open_clip, model, model_name)

        tokenizer = _get_tokenizer(open_clip, model_name, context_length)
        self.context_length = int(getattr(tokenizer, "context_length", None) or model.context_length)
        self._tokenizer = tokenizer
        self._simple = isinstance(tokenizer, open_clip.SimpleTokenizer)
        self._hf_clean: Callable[[str], str] | None = None
        self._strip_sep = False
        if self._simple:
            if getattr(tokenizer, "reduction_fn", None) is not None:
                logger.warning("%s: its tokenizer's reduction mask is ignored; long texts are truncated", self._label)
        else:
            self._hf_clean = _hf_clean_fn(open_clip, tokenizer, model_name)
            self._strip_sep = bool(getattr(tokenizer, "strip_sep_token", False))
        self._finish_init()

    @property
    def dim(self) -> int:
        """D, the width of the text transformer."""
        return self._dim

    @property
    def pooled_dim(self) -> int:
        """Dp, the width of the projected text feature (the CLIP embedding size)."""
        return self._pooled_dim

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, pretrained={self.pretrained!r}, frozen={self.frozen}"

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[WordSpan]], list[int]]:
        """Token ids ``[B, S]`` exactly as open_clip's tokenizer makes them, mask ``[B, S]``, word spans, cuts."""
        if self._simple:
            return self._simple_tokenize(texts)
        hf = self._tokenizer.tokenizer
        ids, mask, words, cut = hf_tokenize(
            hf, texts, self.context_length, pad_to_max=True, clean=self._hf_clean, who=self._label
        )
        if self._strip_sep and hf.sep_token_id is not None:  # as open_clip's HFTokenizer(strip_sep_token=True)
            sep = ids == hf.sep_token_id
            ids, mask = ids.masked_fill(sep, 0), mask & ~sep
        return ids, mask, words, cut

    def _simple_tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[WordSpan]], list[int]]:
        """open_clip's SimpleTokenizer, word by word: ``[SOT] words... [EOT] 0...`` truncated like open_clip."""
        tok, length = self._tokenizer, self.context_length
        sot, eot = tok.sot_token_id, tok.eot_token_id
        ids = torch.zeros(len(texts), length, dtype=torch.long)  # [B, S]
        mask = torch.zeros(len(texts), length, dtype=torch.bool)  # [B, S]
        words, cuts = [], []
        for b, text in enumerate(texts):
            split = text.split()
            pieces = [tok.encode(word) for word in split]
            content = [i for piece in pieces for i in piece]
            full = tok.encode(text)
            exact = content == full
            if not exact:
                logger.warning(
                    "%s: tokens of the words of %s differ from tokens of the whole text; word spans are approximate",
                    self._label,
                    preview(text),
                )
                content = full
            row = [sot, *content, eot]
            cut = max(0, len(row) - length)
            if cut:
                row = row[: length - 1] + [eot]  # open_clip keeps the end-of-text token
            limit = len(row) - 1  # position of end-of-text: no word reaches it
            if exact:
                spans = spans_from_counts(split, [len(p) for p in pieces], 1, limit)
            else:
                spans = spans_from_prefixes(split, lambda s: len(tok.encode(s)), 1, limit)
            ids[b, : len(row)] = torch.tensor(row)
            mask[b, : len(row)] = True
            words.append(spans)
            cuts.append(cut)
        return ids, mask, words, cuts

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids ``[B, S]`` -> (token states ``[B, S, D]``, ``model.encode_text(ids)`` ``[B, Dp]``).

        The token states are read from the module open_clip itself runs (``ln_final``, or the
        HuggingFace transformer of an HF text tower), so they match ``encode_text`` exactly.
        """
        captured: list[torch.Tensor] = []

        def hook(module: nn.Module, args: Any, output: Any) -> None:
            captured.append(output if isinstance(output, torch.Tensor) else output[0])

        handle = self.model.get_submodule(self._states).register_forward_hook(hook)
        try:
            pooled = self.model.encode_text(ids)  # [B, Dp]
        finally:
            handle.remove()
        return captured[-1], pooled  # [B, S, D], [B, Dp]


def check_model_name(open_clip: Any, model_name: str) -> None:
    """Raise for an unknown architecture (listing the valid ones) or an unsupported family."""
    if not isinstance(model_name, str):
        raise TypeError(f"model_name must be a str; got {type(model_name).__name__}")
    if model_name.startswith(("hf-hub:", "local-dir:")):
        return
    names = open_clip.list_models()
    if model_name.replace("/", "-") not in names:
        raise ValueError(f"unknown open_clip model {model_name!r}; valid names: {', '.join(names)}")
    config = open_clip.get_model_config(model_name.replace("/", "-")) or {}
    if "multimodal_cfg" in config:
        raise NotImplementedError(_coca_message(model_name))


def _coca_message(model_name: str) -> str:
    return (
        f"CLIPTextEncoder does not support the CoCa model {model_name!r}: its text tower appends a class "
        "token and leaves its token states before the final LayerNorm; use a CLIP or SigLIP model"
    )


def create_model(open_clip: Any, model_name: str, pretrained: str | None, context_length: int | None) -> nn.Module:
    """open_clip.create_model, with errors that say what to do about a tag or a path."""
    kwargs: dict[str, Any] = {}
    if context_length is not None:
        kwargs["force_context_length"] = int(context_length)
    if pretrained is None:
        return open_clip.create_model(model_name, **kwargs)
    if os.path.isdir(pretrained):
        raise ValueError(
            f"pretrained={pretrained!r} is a folder; pass the checkpoint file inside it, or use "
            f"model_name='local-dir:{pretrained}' for a folder with an open_clip_config.json"
        )
    if os.path.isfile(pretrained):
        try:
            return open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
        except Exception as e:
            raise RuntimeError(
                f"could not load the checkpoint {pretrained!r} into open_clip model {model_name!r}: {e}"
            ) from e
    if not open_clip.get_pretrained_cfg(model_name.replace("/", "-"), pretrained):
        if Path(pretrained).suffix in _CHECKPOINT_SUFFIXES or os.sep in pretrained:
            raise FileNotFoundError(f"checkpoint file {pretrained!r} for open_clip model {model_name!r} not found")
        tags = open_clip.list_pretrained_tags_by_model(model_name.replace("/", "-"))
        raise ValueError(
            f"pretrained={pretrained!r} is neither a file nor an open_clip tag of {model_name!r}; "
            f"tags: {', '.join(tags) if tags else '(none)'}"
        )
    try:
        return open_clip.create_model(model_name, pretrained=pretrained, **kwargs)
    except Exception as e:
        raise RuntimeError(
            f"could not get open_clip weights {model_name!r} pretrained={pretrained!r} ({e}). Without network, "
            "fetch them once where there is network (open_clip caches them), or pass the path of a local "
            f"checkpoint: CLIPTextEncoder({model_name!r}, pretrained='/path/to/open_clip_pytorch_model.bin')"
        ) from e


def _text_tower(open_clip: Any, model: nn.Module, model_name: str) -> tuple[str, int, int]:
    """(name of the submodule whose output are the token states, D, Dp) of an open_clip model."""
    from open_clip.hf_model import HFTextEncoder as OpenCLIPHFTower
    from open_clip.transformer import TextTransformer

    text = getattr(model, "text", None)
    if text is None and isinstance(model, open_clip.CLIP):  # CLIP keeps its text tower inline
        return "ln_final", model.transformer.width, _proj_dim(model.text_projection, model.transformer.width)
    if isinstance(text, TextTransformer) and text.cls_emb is None:
        return "text.ln_final", text.width, _proj_dim(text.text_projection, text.width)
    if isinstance(text, OpenCLIPHFTower):
        return "text.transformer", int(text.config.hidden_size), int(text.output_dim)
    raise NotImplementedError(
        f"CLIPTextEncoder cannot read token states of the text tower of {model_name!r} "
        f"({type(model).__name__} with {type(text).__name__})"
    )


def _proj_dim(projection: nn.Module | torch.Tensor | None, width: int) -> int:
    if projection is None:
        return width
    if isinstance(projection, nn.Linear):
        return projection.out_features
    return int(projection.shape[1])


def _get_tokenizer(open_clip: Any, model_name: str, context_length: int | None) -> Any:
    """open_clip.get_tokenizer, with an error naming the tokenizer when it cannot be loaded."""
    try:
        return open_clip.get_tokenizer(model_name, context_length=context_length)
    except Exception as e:
        config = open_clip.get_model_config(model_name) if not model_name.startswith("hf-hub:") else None
        name = ((config or {}).get("text_cfg") or {}).get("hf_tokenizer_name") or model_name
        raise RuntimeError(
            f"could not load the tokenizer {name!r} of open_clip model {model_name!r} ({e}); without network it "
            "must already be in the HuggingFace cache"
        ) from e


def _hf_clean_fn(open_clip: Any, tokenizer: Any, model_name: str) -> Callable[[str], str]:
    """The text cleaning an open_clip HF-based tokenizer applies before its HF tokenizer."""
    from open_clip import tokenizer as oc_tokenizer

    if isinstance(tokenizer, oc_tokenizer.HFTokenizer):
        if getattr(tokenizer, "tokenizer_mode", "") not in ("", None):
            raise NotImplementedError(
                f"CLIPTextEncoder does not support tokenizer_mode={tokenizer.tokenizer_mode!r} of {model_name!r}"
            )
        return tokenizer.clean_fn
    if isinstance(tokenizer, oc_tokenizer.SigLipTokenizer):
        return lambda text: oc_tokenizer.canonicalize_text(oc_tokenizer.basic_clean(text))
    raise NotImplementedError(
        f"CLIPTextEncoder does not support the tokenizer {type(tokenizer).__name__} of {model_name!r}"
    )
