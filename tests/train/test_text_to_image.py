"""The text-to-image recipe's composable guidance: partial descriptions of each object of a caption."""

import pytest

from mmx.config import load_config
from mmx.train.text_to_image import TextToImageConfig, build_pipeline, caption_components


def test_caption_components_describe_each_object_by_attribute_pairs():
    parts = caption_components("on the top there is a red triangle and a blue circle is in the middle")
    assert parts == ["a red shape at the top", "a triangle at the top", "a red triangle",
                     "a blue shape in the centre", "a circle in the centre", "a blue circle"]
    assert caption_components("a photo of a cat") == []  # outside the shapes grammar: plain guidance
    with pytest.raises(ValueError, match="unknown component pairs \\['colour\\+size'\\]"):
        caption_components("a red circle", ("colour+size",))


def test_pipeline_uses_components_only_when_the_recipe_asks():
    cfg = load_config("configs/shapes_t2i_tiny.yaml", TextToImageConfig)
    assert build_pipeline(cfg).describe_parts is None
    cfg.diffusion.compose_scale = 1.5
    pipeline = build_pipeline(cfg)
    assert pipeline.component_scale == 1.5 and pipeline.describe_parts("a red circle on the left")[0] == "a red shape on the left"


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
