"""GroundingNet: region logits at image resolution, masks honoured, save/load; phrases name their object."""

from pathlib import Path

import pytest
import torch

from mmx import Context
from mmx.models import GroundingNet
from mmx.recipes.grounding import PhraseData

CONFIG = Path(__file__).parents[2] / "configs" / "shapes_grounding.yaml"


def _ctx():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]], dtype=torch.bool)
    return Context(tokens=torch.randn(2, 4, 12), mask=mask)


def test_logits_follow_the_image_size_and_ignore_padding(tmp_path):
    torch.manual_seed(0)
    model = GroundingNet(context_dim=12, heads=2, dim_head=8, depth=1, input_size=32).eval()
    for p in model.blocks[0].proj_out.parameters():
        torch.nn.init.normal_(p, std=0.1)
    images, ctx = torch.rand(2, 3, 24, 40) * 2 - 1, _ctx()
    out = model(images, ctx)
    assert out.shape == (2, 1, 24, 40)
    tokens = ctx.tokens.clone()
    tokens[0, 3] = 100.0
    torch.testing.assert_close(model(images, Context(tokens=tokens, mask=ctx.mask)), out)
    model.save_pretrained(tmp_path / "g")
    assert torch.equal(GroundingNet.from_pretrained(tmp_path / "g").eval()(images, ctx), out)
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        model(torch.rand(2, 1, 8, 8), ctx)


def test_phrases_name_their_target_object():
    from mmx.data import ShapesDataset

    data = PhraseData(ShapesDataset(length=40, seed=2))
    for i in range(40):
        item = data[i]
        words = item["phrase"].split()
        base = data.base[i]
        named = [o for o in base["objects"] if o.colour == words[1] and o.shape == words[2]]
        assert named and torch.equal(item["mask"][0].bool(), item["word_masks"][1])
        if len(named) > 1:
            assert len(words) > 3, "an ambiguous phrase must name the position"
