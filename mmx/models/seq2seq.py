"""Encoder-decoder Transformers: sequence to sequence, and image to caption.

Both models follow the one idea of mmx: the decoder's queries are the target tokens generated so
far, its keys and values the encoder memory, a :class:`~mmx.context.Context` (source tokens with
their padding mask, or ResNet image regions with their ``grid``, so the decoder's cross-attention
can be drawn back on the image). Both expose the same decoding interface, used by
:mod:`mmx.decoding`:

* ``encode(inputs) -> Context`` (the memory),
* ``decode(tokens [B, T], memory, tokens_mask=None, cache=None) -> logits [B, T, V]``,
* ``new_cache() -> DecoderCache`` (key/value caches for step-by-step decoding),
* ``config.pad_id / bos_id / eos_id``.

Both are diffusers ``ModelMixin`` + ``ConfigMixin``: ``save_pretrained`` writes safetensors +
config.json, ``from_pretrained`` rebuilds the model.

Letters: B batch, S source tokens, T target tokens, D = ``d_model``, V vocabulary.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from mmx.context import Context
from mmx.encoders.observation import _grid_embedding
from mmx.encoders.resnet import ResNetFeatures
from mmx.nn.seq2seq import (
    DecoderCache,
    TransformerDecoder,
    TransformerEncoder,
    check_key_mask,
    positions_from_mask,
    sinusoidal_positions,
)

__all__ = ["Seq2SeqTransformer", "ImageCaptioner"]


def _check_ids(ids: torch.Tensor, vocab_size: int, name: str) -> None:
    """Raise unless ``ids`` is an integer ``[B, T]`` tensor with every id in ``[0, vocab_size)``.

    The range check reads the minimum and maximum on the host (one synchronisation).
    """
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        got = f"shape {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"{name} must be token ids [B, T]; got {got}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"{name} must be integer token ids (torch.long); got {ids.dtype}")
    if ids.numel() == 0:
        return
    lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"{name} holds ids outside the vocabulary: max id {hi}, min id {lo}, but the vocab size is "
            f"{vocab_size} (valid ids 0..{vocab_size - 1})"
        )


def _check_specials(vocab_size: int, pad_id: int, bos_id: int, eos_id: int) -> None:
    for name, value in (("pad_id", pad_id), ("bos_id", bos_id), ("eos_id", eos_id)):
        if not isinstance(value, int) or not 0 <= value < vocab_size:
            raise ValueError(f"{name} must be an id in [0, {vocab_size}) (the target vocab size); got {value!r}")
    if bos_id == eos_id:
        raise ValueError(f"bos_id and eos_id must differ; both are {bos_id}")


class _DecoderMixin:
    """``decode`` / ``new_cache`` shared by both models (they own ``self.decoder``)."""

    decoder: TransformerDecoder

    def new_cache(self) -> DecoderCache:
        """An empty :class:`~mmx.nn.seq2seq.DecoderCache` for step-by-step decoding."""
        return self.decoder.new_cache()

    def decode(
        self,
        tokens: torch.Tensor,
        memory: Context | torch.Tensor | None,
        tokens_mask: torch.Tensor | None = None,
        cache: DecoderCache | None = None,
    ) -> torch.Tensor:
        """Next-token logits ``[B, T, V]`` after each target token of ``tokens [B, T]``.

        Args:
            tokens: target ids ``[B, T]`` (BOS first); with ``cache``, only the tokens not fed yet.
            memory: the :class:`Context` returned by ``encode`` (may be None once ``cache`` holds
                the projected memory).
            tokens_mask: ``[B, T]`` bool, True = real target token (self-attention key padding).
            cache: from :meth:`new_cache`, updated in place.

        Token ids are range-checked on every call except the later steps of a cache (whose
        tokens are the model's own predictions), so step-by-step decoding does not synchronise.
        """
        if cache is None or cache.length == 0:
            _check_ids(tokens, self.decoder.vocab_size, "tokens")
        if isinstance(memory, Context) and memory.batch_size != tokens.shape[0]:
            raise ValueError(
                f"tokens and memory must have the same batch size; got tokens {tuple(tokens.shape)}, "
                f"memory tokens {tuple(memory.tokens.shape)}"
            )
        return self.decoder(tokens, memory, tokens_mask=tokens_mask, cache=cache)


class Seq2SeqTransformer(_DecoderMixin, ModelMixin, ConfigMixin):
    """Encoder-decoder Transformer (Vaswani et al., 2017): source ids ``[B, S]`` -> target logits ``[B, T, V]``.

    Pre-norm blocks, GELU feed-forward, sinusoidal positions counted over real tokens (so left and
    right padding give the same result).

    Args:
        src_vocab_size, tgt_vocab_size: vocabulary sizes.
        d_model: width D.
        heads, dim_head: attention heads and width per head (None: ``d_model // heads``).
        encoder_layers, decoder_layers: blocks in each stack.
        ff_mult: feed-forward hidden width as a multiple of D.
        dropout: dropout on embeddings, attention outputs and feed-forwards (call ``eval()`` to decode).
        tie_output: the output projection reuses the target embedding matrix.
        share_embeddings: source and target use one embedding (needs equal vocab sizes).
        pad_id, bos_id, eos_id: special target ids (``pad_id`` also marks source padding when no
            ``src_mask`` is given).
    """

    # blocks kept whole when sharded (Accelerate's FSDP TRANSFORMER_BASED_WRAP, diffusers' device_map)
    _no_split_modules = ["TransformerBlock"]

    @register_to_config
    def __init__(
        self,
        src_vocab_size: int,
        tgt_vocab_size: int,
        d_model: int = 256,
        heads: int = 4,
        dim_head: int | None = None,
        encoder_layers: int = 3,
        decoder_layers: int = 3,
        ff_mult: int = 4,
        dropout: float = 0.1,
        tie_output: bool = True,
        share_embeddings: bool = False,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
    ) -> None:
        super().__init__()
        for name, value in (("src_vocab_size", src_vocab_size), ("tgt_vocab_size", tgt_vocab_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int; got {value!r}")
        if share_embeddings and src_vocab_size != tgt_vocab_size:
            raise ValueError(
                f"share_embeddings needs src_vocab_size == tgt_vocab_size; got {src_vocab_size} and {tgt_vocab_size}"
            )
        _check_specials(tgt_vocab_size, pad_id, bos_id, eos_id)
        self.decoder = TransformerDecoder(
            tgt_vocab_size, d_model, heads, dim_head, decoder_layers, ff_mult, dropout, None, tie_output
        )
        # A shared embedding is the decoder's own (no second parameter sharing its memory: safetensors refuses those).
        self.src_embed = None if share_embeddings else nn.Embedding(src_vocab_size, d_model)
        if self.src_embed is not None:
            nn.init.normal_(self.src_embed.weight, std=d_model**-0.5)
        self.src_dropout = nn.Dropout(dropout)
        self.encoder = TransformerEncoder(d_model, heads, dim_head, encoder_layers, ff_mult, dropout)

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> Context:
        """Source ids ``[B, S]`` -> memory ``Context(tokens [B, S, D], mask [B, S])``.

        ``src_mask`` (bool, True = real token) defaults to ``src != pad_id``; positions count real
        tokens only, so padding may sit on either side.
        """
        _check_ids(src, self.config.src_vocab_size, "src")
        check_key_mask(src_mask, src.shape[0], src.shape[1], "src_mask")
        mask = src_mask if src_mask is not None else src != self.config.pad_id
        embed = self.src_embed if self.src_embed is not None else self.decoder.embed
        d = self.config.d_model
        x = embed(src) * math.sqrt(d)
        x = x + sinusoidal_positions(positions_from_mask(mask), d).to(x.dtype)
        x = self.encoder(self.src_dropout(x), mask)  # (B, S, D)
        return Context(tokens=x, mask=mask)

    def forward(
        self,
        src: torch.Tensor,
        tgt_in: torch.Tensor,
        src_mask: torch.Tensor | None = None,
        tgt_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Teacher forcing: logits ``[B, T, V]`` for target inputs ``tgt_in [B, T]`` (BOS + target[:-1])."""
        _check_ids(tgt_in, self.config.tgt_vocab_size, "tgt_in")
        if isinstance(src, torch.Tensor) and src.ndim == 2 and src.shape[0] != tgt_in.shape[0]:
            raise ValueError(
                f"src and tgt_in must have the same batch size; got {tuple(src.shape)} and {tuple(tgt_in.shape)}"
            )
        return self.decoder(tgt_in, self.encode(src, src_mask), tokens_mask=tgt_mask)


class ImageCaptioner(_DecoderMixin, ModelMixin, ConfigMixin):
    """Images ``[B, 3, H, W]`` in [-1, 1] -> caption logits ``[B, T, V]``.

    A torchvision ResNet cut after ``stage`` gives a ``[B, C, h, w]`` map; each position becomes a
    token (linear to D + 2D sinusoidal position), optionally refined by ``encoder_layers``
    self-attention blocks. The memory is ``Context(tokens [B, h*w, D], mask all True, grid=(h, w))``:
    the decoder's attention over it is an attention map on the image.

    Args:
        vocab_size: V.
        d_model, heads, dim_head, ff_mult, dropout, tie_output: as :class:`Seq2SeqTransformer`.
        decoder_layers: decoder blocks.
        encoder_layers: self-attention blocks over the image tokens (0: none).
        arch, stage, norm: the ResNet trunk (see :class:`mmx.encoders.ResNetFeatures`); random
            weights, see :meth:`load_trunk` for pretrained ones.
        input_size: images are resized (bilinear) to ``input_size x input_size`` first (None: as given).
        colour_stream: split the image into intensity and colour (like a luminance / chrominance
            split): the trunk sees only the intensity (the channel mean, repeated), and each token
            gets a learned embedding of its region's mean colour added. Shape features then cannot
            depend on the colour they were seen in, which is what lets a captioner name colour and
            shape pairs it never saw together.
        pad_id, bos_id, eos_id: special ids.
    """

    # blocks kept whole when sharded (Accelerate's FSDP TRANSFORMER_BASED_WRAP, diffusers' device_map)
    _no_split_modules = ["TransformerBlock"]

    @register_to_config
    def __init__(
        self,
        vocab_size: int,
        d_model: int = 256,
        heads: int = 4,
        dim_head: int | None = None,
        decoder_layers: int = 3,
        encoder_layers: int = 0,
        ff_mult: int = 4,
        dropout: float = 0.1,
        tie_output: bool = True,
        arch: str = "resnet18",
        stage: str = "layer1",
        norm: str = "group",
        input_size: int | None = 64,
        colour_stream: bool = False,
        pad_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
    ) -> None:
        super().__init__()
        if not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int; got {vocab_size!r}")
        if not isinstance(encoder_layers, int) or encoder_layers < 0:
            raise ValueError(f"encoder_layers must be an int >= 0; got {encoder_layers!r}")
        if input_size is not None and (not isinstance(input_size, int) or input_size < 1):
            raise ValueError(f"input_size must be a positive int or None; got {input_size!r}")
        _check_specials(vocab_size, pad_id, bos_id, eos_id)
        self.trunk = ResNetFeatures(arch, stage, weights=None, norm=norm, normalize=False)
        self.proj = nn.Linear(self.trunk.channels, d_model)
        # Region colour -> token embedding (only with colour_stream): a small MLP so colour names need
        # not be linear in RGB.
        self.colour = (
            nn.Sequential(nn.Linear(3, d_model), nn.GELU(), nn.Linear(d_model, d_model)) if colour_stream else None
        )
        self.encoder = (
            TransformerEncoder(d_model, heads, dim_head, encoder_layers, ff_mult, dropout) if encoder_layers else None
        )
        self.decoder = TransformerDecoder(
            vocab_size, d_model, heads, dim_head, decoder_layers, ff_mult, dropout, None, tie_output
        )

    def load_trunk(self, weights: str) -> None:
        """Load torchvision ResNet weights (a weights name or a local state_dict file) into the trunk."""
        if self.config.norm != "batch":
            raise ValueError("pretrained trunk weights need norm='batch' (GroupNorm has no ImageNet statistics)")
        config = self.config
        pretrained = ResNetFeatures(config.arch, config.stage, weights=weights, norm="batch", normalize=False)
        self.trunk.load_state_dict(pretrained.state_dict())

    def encode(self, images: torch.Tensor) -> Context:
        """Images ``[B, 3, H, W]`` in [-1, 1] -> memory ``Context(tokens [B, h*w, D], mask, grid=(h, w))``."""
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            got = f"shape {tuple(images.shape)}" if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"ImageCaptioner expects images [B, 3, H, W] in [-1, 1]; got {got}")
        if not images.dtype.is_floating_point:
            raise TypeError(f"images must be floating point in [-1, 1]; got {images.dtype}")
        x = images
        size = self.config.input_size
        if size is not None and tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        trunk_input = x.mean(dim=1, keepdim=True).expand_as(x) if self.colour is not None else x
        fmap = self.trunk(trunk_input).map  # (B, C, h, w)
        b, _, h, w = fmap.shape
        tokens = self.proj(fmap.flatten(2).transpose(1, 2))  # (B, h*w, D)
        if self.colour is not None:
            region_colour = F.adaptive_avg_pool2d(x, (h, w)).flatten(2).transpose(1, 2)  # (B, h*w, 3)
            tokens = tokens + self.colour(region_colour)
        tokens = tokens + _grid_embedding(h, w, self.config.d_model, tokens.device, tokens.dtype)
        if self.encoder is not None:
            tokens = self.encoder(tokens)
        mask = torch.ones(b, h * w, dtype=torch.bool, device=tokens.device)
        return Context(tokens=tokens, mask=mask, grid=(h, w))

    def forward(self, images: torch.Tensor, tgt_in: torch.Tensor, tgt_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: caption logits ``[B, T, V]`` for target inputs ``tgt_in [B, T]`` (BOS + caption[:-1])."""
        _check_ids(tgt_in, self.config.vocab_size, "tgt_in")
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.shape[0] != tgt_in.shape[0]:
            raise ValueError(
                f"images and tgt_in must have the same batch size; got {tuple(images.shape)} and {tuple(tgt_in.shape)}"
            )
        return self.decoder(tgt_in, self.encode(images), tokens_mask=tgt_mask)
