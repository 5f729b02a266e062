"""The text-to-image recipe's pipeline: composable guidance, the guidance interval, split key/value text states."""

import pytest

from mmx.config import load_config
from mmx.recipes.text_to_image import TextToImageConfig, build_pipeline, caption_components, heldout_prompts


def test_caption_components_describe_each_object_by_attribute_pairs():
    parts = caption_components("on the top there is a red triangle and a blue circle is in the middle")
    assert parts == [
        "a red shape at the top",
        "a triangle at the top",
        "a red triangle",
        "a blue shape in the centre",
        "a circle in the centre",
        "a blue circle",
    ]
    assert caption_components("a photo of a cat") == []  # outside the shapes grammar: plain guidance
    with pytest.raises(ValueError, match="unknown component pairs \\['colour\\+size'\\]"):
        caption_components("a red circle", ("colour+size",))


def test_pipeline_uses_components_only_when_the_recipe_asks():
    cfg = load_config("configs/shapes_t2i_tiny.yaml", TextToImageConfig)
    assert build_pipeline(cfg).describe_parts is None
    cfg.compose.scale = 1.5
    pipeline = build_pipeline(cfg)
    assert (
        pipeline.component_scale == 1.5
        and pipeline.describe_parts("a red circle on the left")[0] == "a red shape on the left"
    )


def test_guidance_interval_reaches_generate_from_the_config():
    import torch

    cfg = load_config("configs/shapes_t2i_tiny.yaml", TextToImageConfig, ["diffusion.guidance_interval=[0, 500]"])
    pipeline = build_pipeline(cfg).eval()
    assert pipeline.guidance_interval == (0.0, 500.0)
    rows = []
    pipeline.unet.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    pipeline.generate(["a red circle"], num_steps=4, guidance_scale=2.0, generator=torch.Generator().manual_seed(0))
    # the tiny recipe trains on 1000 timesteps: 4 DDIM steps at 750, 500, 250, 0; the first is unguided
    assert rows == [1, 2, 2, 2]
    cfg.diffusion.guidance_interval = (500, 0)
    with pytest.raises(ValueError, match=r"guidance_interval must be \(low, high\) timesteps with low <= high"):
        build_pipeline(cfg)


def test_value_layer_builds_a_unet_that_splits_keys_and_values_and_a_mismatch_is_named():
    from mmx.nn import CrossAttention

    cfg = load_config("configs/shapes_t2i_tiny.yaml", TextToImageConfig, ["text_encoder.value_layer=0"])
    pipeline = build_pipeline(cfg)
    assert pipeline.unet.config.split_context and pipeline.unet.config.context_dim == 2 * 384
    cross = [m for m in pipeline.unet.modules() if isinstance(m, CrossAttention) and m.is_cross]
    assert cross and all(m.split_context and m.to_v.in_features == 384 for m in cross)
    with pytest.raises(
        ValueError, match=r"model.split_context=False does not match the text encoder, whose tokens are"
    ):
        build_pipeline(
            load_config(
                "configs/shapes_t2i_tiny.yaml",
                TextToImageConfig,
                ["text_encoder.value_layer=0", "model.split_context=false"],
            )
        )
    with pytest.raises(ValueError, match=r"model 'diffusers_unet2d' cannot read"):
        build_pipeline(
            load_config(
                "configs/shapes_t2i_tiny.yaml",
                TextToImageConfig,
                ["text_encoder.value_layer=0", "model.name=diffusers_unet2d"],
            )
        )


def test_heldout_prompts_read_captions_in_order_from_the_given_or_the_configured_data():
    from mmx.data import DATASETS

    cfg = load_config("configs/shapes_t2i_tiny.yaml", TextToImageConfig, ["eval.num_prompts=5"])
    data = DATASETS.build_from_dict(dict(cfg.eval.data))
    drawn = [data[i]["caption"] for i in range(5)]
    assert heldout_prompts(cfg) == drawn  # built from eval.data, described without drawing
    assert heldout_prompts(cfg, data) == drawn

    class Drawn(list):  # a data set that can only be drawn
        pass

    assert heldout_prompts(cfg, Drawn({"caption": c} for c in ["x", "y"])) == ["x", "y"]  # fewer than num_prompts
