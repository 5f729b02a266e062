"""Tiny random-weight diffusers pipelines of the four families, built offline from configs, with real
tokenizers (:mod:`mmx.attnmap.pipelines.offline`: CLIP's BPE from open_clip's vocabulary; T5's class over
a vocabulary from the MiniLM package)."""

from __future__ import annotations

import pytest
import torch

CLIP_TEXT = dict(
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


def _vae(latent_channels=4):
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


def _t5(tokenizer):
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


def _clip(projection=False, **changes):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(CLIPTextConfig(**{**CLIP_TEXT, **changes})).eval()


def build(family: str, clip_tokenizer, t5_tokenizer):
    """A tiny pipeline of ``family`` (sd, sdxl, sd3, flux) with random weights (seeded)."""
    import diffusers

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
            tokenizer=clip_tokenizer,
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
            tokenizer=clip_tokenizer,
            tokenizer_2=clip_tokenizer,
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
            tokenizer=clip_tokenizer,
            text_encoder_2=_clip(projection=True),
            tokenizer_2=clip_tokenizer,
            text_encoder_3=_t5(t5_tokenizer),
            tokenizer_3=t5_tokenizer,
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
            tokenizer=clip_tokenizer,
            text_encoder_2=_t5(t5_tokenizer),
            tokenizer_2=t5_tokenizer,
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(),
        )
    raise ValueError(family)


@pytest.fixture(scope="session")
def clip_tokenizer():
    from mmx.attnmap.pipelines.offline import clip_tokenizer

    return clip_tokenizer()


@pytest.fixture(scope="session")
def t5_tokenizer():
    from mmx.attnmap.pipelines.offline import t5_tokenizer

    return t5_tokenizer()


@pytest.fixture(scope="session")
def tiny_pipelines(clip_tokenizer, t5_tokenizer):
    """``family -> pipeline``: one tiny pipeline of each family (built once per session)."""
    return {family: build(family, clip_tokenizer, t5_tokenizer) for family in ("sd", "sdxl", "sd3", "flux")}
