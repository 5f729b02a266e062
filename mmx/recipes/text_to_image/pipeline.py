"""The recipe's TextToImage (encoder + UNet + schedule) and its data: the image size stated once, held-out data."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Sequence

import torch
from torch import nn

from mmx.attnmap.losses import build_attention_losses
from mmx.recipes.text_to_image.config import TextToImageConfig

__all__ = [
    "build_data",
    "build_evaluator",
    "build_pipeline",
    "caption_components",
    "eval_data_spec",
    "fit_data_spec",
    "heldout_prompts",
]

ATTENTION_LOSSES_T2I = ("inside", "coverage", "reading")  # what per-word object masks can feed


def build_pipeline(cfg: TextToImageConfig, unet: nn.Module | None = None):
    """The TextToImage of a config (a fresh UNet unless one is given); the UNet's context_dim follows the encoder."""
    from mmx.diffusion import TextToImage, make_scheduler
    from mmx.encoders import ENCODERS
    from mmx.models import MODELS

    encoder = ENCODERS.build_from_dict(dict(cfg.text_encoder))
    if unet is None:
        spec = dict(cfg.model)
        spec.setdefault("context_dim", encoder.dim)
        if spec["context_dim"] != encoder.dim:
            raise ValueError(
                f"model.context_dim={spec['context_dim']} does not match the text encoder's width {encoder.dim}"
            )
        spec.setdefault("in_channels", cfg.image_size[0])
        spec.setdefault("out_channels", cfg.image_size[0])
        _match_split_context(spec, encoder, MODELS.get(spec.get("name", "unet2d")))
        unet = MODELS.build_from_dict(spec)
    d = cfg.diffusion
    scheduler = make_scheduler(
        "ddpm",
        num_train_timesteps=d.num_train_timesteps,
        beta_schedule=d.beta_schedule,
        prediction_type=d.prediction_type,
    )
    parts = None
    if cfg.compose.scale > 0:
        caption_components("a red circle", cfg.compose.pairs)  # checks the pair names now, not at the first validation
        parts = functools.partial(caption_components, pairs=tuple(cfg.compose.pairs))
    losses = build_attention_losses(cfg.attention_losses, ATTENTION_LOSSES_T2I, "text_to_image")
    return TextToImage(
        unet,
        encoder,
        scheduler,
        tuple(cfg.image_size),
        d.cond_drop_prob,
        d.min_snr_gamma,
        cfg.max_tokens,
        losses,
        parts,
        cfg.compose.scale,
        d.guidance_interval,
    )


def _match_split_context(spec: dict, encoder: nn.Module, model_cls: type) -> None:
    """Tokens of ``[keys ; values]`` (``text_encoder.value_layer``) need a model that splits them, and back."""
    split = bool(getattr(encoder, "split_context", False))
    if "split_context" not in inspect.signature(model_cls).parameters:
        if split:
            raise ValueError(
                f"text_encoder.value_layer gives tokens of keys and values side by side, which model "
                f"{spec.get('name')!r} cannot read; use model.name: unet2d"
            )
        return
    spec.setdefault("split_context", split)
    if bool(spec["split_context"]) != split:
        raise ValueError(
            f"model.split_context={spec['split_context']!r} does not match the text encoder, whose tokens "
            f"{'are' if split else 'are not'} keys and values side by side (text_encoder.value_layer)"
        )


def fit_data_spec(spec: dict, image_size: Sequence[int], key: str = "data") -> dict:
    """``spec`` with the recipe's image size: the image size is stated once, by ``image_size``.

    A data source that takes ``size`` gets ``image_size``'s height and width; a ``size`` given in
    the spec that differs is an error naming both values (the model would train on one size and
    sample another).
    """
    from mmx.data import DATASETS

    spec = dict(spec)
    if "name" not in spec:
        raise ValueError(f"{key} needs a 'name' (one of {', '.join(DATASETS.names())}); got {spec!r}")
    if "size" not in (DATASETS.parameters(spec["name"]) or []):
        return spec
    _, height, width = image_size
    want = height if height == width else [height, width]
    given = spec.get("size")
    if given is None:
        spec["size"] = want
        return spec
    pair = [given, given] if isinstance(given, int) and not isinstance(given, bool) else given
    if not isinstance(pair, (list, tuple)) or [*pair] != [height, width]:
        raise ValueError(
            f"{key}.size = {given!r} but image_size = {list(image_size)}: the data would give images of "
            f"another size than the model samples. State the size once: remove {key}.size (the data then "
            "takes image_size), or change image_size"
        )
    return spec


def eval_data_spec(cfg: TextToImageConfig) -> dict:
    """The held-out data spec: ``eval.data``, over the training ``data`` when it names no source, at ``image_size``."""
    spec = dict(cfg.eval.data)
    if "name" not in spec:
        spec = {**cfg.data, **spec}
    return fit_data_spec(spec, cfg.image_size, "eval.data")


def build_data(spec: dict, image_size: Sequence[int], key: str) -> torch.utils.data.Dataset:
    """The data set of a (fitted) spec, checked to give images of ``image_size``; errors name the key."""
    from mmx.data import DATASETS

    data = DATASETS.build_from_dict(spec)
    if len(data) == 0:
        raise ValueError(f"{key} ({spec.get('name')}) has no samples")
    with torch.random.fork_rng(devices=[]):  # a random crop of the first sample draws nothing from the run's seed
        shape = tuple(data[0]["image"].shape)
    if shape != tuple(image_size):
        raise ValueError(
            f"{key} ({spec.get('name')}) gives images of shape {list(shape)}, but image_size is "
            f"{list(image_size)} (channels, height, width)"
        )
    return data


def heldout_prompts(cfg: TextToImageConfig, data: torch.utils.data.Dataset | None = None) -> list[str]:
    """The evaluation prompts: the first ``eval.num_prompts`` captions of the held-out data set, in order.

    ``data``: that data set when the caller already built it (default: built from ``eval.data``).
    A data set that can describe a sample without drawing it (``ShapesDataset.describe``) is not drawn.
    """
    from mmx.recipes.text_to_image.metrics import heldout_captions

    if data is None:
        from mmx.data import DATASETS

        data = DATASETS.build_from_dict(eval_data_spec(cfg))
    return heldout_captions(data, cfg.eval.num_prompts)


def caption_components(
    caption: str, pairs: Sequence[str] = ("colour+position", "shape+position", "colour+shape")
) -> list[str]:
    """Partial descriptions of each object of a shapes caption, one per attribute pair in ``pairs``.

    "a red triangle on the left" -> "a red shape on the left", "a triangle on the left", "a red
    triangle" (the forms ``ShapesDataset(drop_attribute=...)`` trains on). A caption outside the
    shapes grammar has no components.
    """
    from mmx.data.shapes import POSITION_PHRASES
    from mmx.eval.detector import parse_caption

    forms = {
        "colour+position": "a {c} shape {p}",
        "shape+position": "a {s} {p}",
        "colour+shape": "a {c} {s}",
    }
    unknown = [pair for pair in pairs if pair not in forms]
    if unknown:
        raise ValueError(f"unknown component pairs {unknown}; valid: {list(forms)}")
    try:
        claims = parse_caption(caption)
    except ValueError:
        return []
    return [
        forms[pair].format(c=claim.colour, s=claim.shape, p=POSITION_PHRASES[claim.position][0])
        for claim in claims
        for pair in pairs
    ]


def build_evaluator(pipeline, cfg: TextToImageConfig, num: int | None = None, max_downsample: int | None = None):
    """The :class:`~mmx.recipes.text_to_image.metrics.Evaluator` of a run: its held-out data and metrics.

    ``num``: at least this many held-out samples (a data source with a ``length`` is lengthened);
    ``max_downsample``: the layers attention metrics read (None: every layer).
    """
    from mmx.data import DATASETS
    from mmx.recipes.text_to_image.metrics import Evaluator

    spec = eval_data_spec(cfg)
    if num is not None and "length" in (DATASETS.parameters(spec["name"]) or []):
        spec["length"] = max(num, spec.get("length", num))
    heldout = build_data(spec, cfg.image_size, "eval.data")
    return Evaluator(pipeline, cfg, heldout, cfg.eval.metrics, max_downsample)
