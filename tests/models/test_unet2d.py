"""UNet2D: shapes, masks honoured, save/load round trip, clear errors; the diffusers backbone option."""

import pytest
import torch

from mmx import Context
from mmx.models import DiffusersUNet2D, UNet2D

TINY = dict(
    channels=(16, 32),
    layers_per_block=1,
    attention_levels=(False, True),
    attention={"heads": 2, "dim_head": 8},
    context_dim=12,
    norm_groups=8,
)


def _arch(attention=None, **extra):
    """TINY with some of its attention settings (``attention``) and other arguments changed."""
    return {**TINY, "attention": {**TINY["attention"], **(attention or {})}, **extra}


def _ctx(b=2, s=5):
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 3:] = False
    return Context(tokens=torch.randn(b, s, 12), mask=mask)


def _perturbed(model):
    """Zero-initialised output layers make the output 0 at init; give them weights for the checks."""
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "conv_out" in name or "proj_out" in name or "conv2" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def test_forward_shape_non_square_and_pooled():
    torch.manual_seed(0)
    model = UNet2D(**_arch({"self_attention_levels": (False, True)}, pooled_dim=6))
    ctx = Context(tokens=torch.randn(2, 5, 12), mask=torch.ones(2, 5, dtype=torch.bool), pooled=torch.randn(2, 6))
    out = model(torch.randn(2, 3, 8, 12), torch.tensor([3, 900]), ctx)
    assert out.shape == (2, 3, 8, 12)
    assert torch.all(out == 0), "the last conv is zero-initialised"


def test_masked_padding_tokens_do_not_change_the_output():
    torch.manual_seed(0)
    model = _perturbed(UNet2D(**TINY)).eval()
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), _ctx()
    out = model(x, t, ctx)
    tokens = ctx.tokens.clone()
    tokens[0, 3:] = 1e3
    torch.testing.assert_close(model(x, t, Context(tokens=tokens, mask=ctx.mask)), out)
    assert not torch.allclose(model(x, t, Context(tokens=tokens, mask=torch.ones_like(ctx.mask))), out)


def test_timestep_and_text_change_the_output():
    torch.manual_seed(0)
    model = _perturbed(UNet2D(**TINY)).eval()
    x, ctx = torch.randn(2, 3, 8, 8), _ctx()
    out = model(x, torch.tensor([10, 10]), ctx)
    assert not torch.allclose(out, model(x, torch.tensor([700, 700]), ctx))
    assert not torch.allclose(out, model(x, torch.tensor([10, 10]), _ctx()))


@pytest.mark.parametrize(
    ("attention", "extra"),
    [
        ({}, {}),
        ({"position_frequencies": 3}, {}),
        ({}, {"split_context": True}),
        ({"ff_mult": 2}, {}),
        ({"position_frequencies": 2, "position_into": "queries"}, {"padding_mode": "circular"}),
    ],
)
def test_save_load_round_trip_gives_identical_outputs(tmp_path, attention, extra):
    torch.manual_seed(0)
    model = _perturbed(UNet2D(**_arch(attention, **extra))).eval()
    for name, p in model.named_parameters():
        if "pos_proj" in name:
            torch.nn.init.normal_(p)
    model.save_pretrained(tmp_path / "unet")
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = UNet2D.from_pretrained(tmp_path / "unet").eval()
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), _ctx()
    assert torch.equal(model(x, t, ctx), loaded(x, t, ctx))
    assert loaded.config.channels == [16, 32] or tuple(loaded.config.channels) == (16, 32)
    assert loaded.config.attention == {**TINY["attention"], **attention}
    assert loaded.config.split_context == extra.get("split_context", False)
    assert loaded.config.padding_mode == extra.get("padding_mode", "zeros")
    widths = {m.net[-1].in_features for m in loaded.modules() if type(m).__name__ == "FeedForward"}
    assert widths == {attention.get("ff_mult", 4) * 16}  # heads * dim_head = 16


@pytest.mark.parametrize("patch_size", [1, 2])
def test_circular_padding_makes_the_network_blind_to_place(patch_size):
    # Shifting the input by the network's total stride shifts the output alike with circular padding;
    # with zero padding the borders tell the convolutions where they are.
    torch.manual_seed(0)
    x, t, ctx = torch.randn(2, 3, 16, 16), torch.tensor([10, 500]), _ctx()
    stride = patch_size * 2  # TINY has two levels
    for mode, equivariant in (("circular", True), ("zeros", False)):
        model = _perturbed(UNet2D(**TINY, patch_size=patch_size, padding_mode=mode)).eval()
        shifted = model(torch.roll(x, (stride, -stride), dims=(2, 3)), t, ctx)
        same = torch.allclose(shifted, torch.roll(model(x, t, ctx), (stride, -stride), dims=(2, 3)), atol=1e-5)
        assert same == equivariant, mode
    with pytest.raises(ValueError, match="padding_mode must be one of zeros, circular; got 'reflect'"):
        UNet2D(**TINY, padding_mode="reflect")
    with pytest.raises(ValueError, match="attention.position_into must be one of tokens, queries; got 'values'"):
        UNet2D(**_arch({"position_into": "values"}, attention_levels=(False, False), mid_attention=False))
    with pytest.raises(ValueError, match="unknown key.*attention.head in UNetAttention; valid keys: attention.heads"):
        UNet2D(**_arch({"head": 2}))


def test_errors_name_the_problem():
    model = UNet2D(**TINY)
    with pytest.raises(ValueError, match="divisible by 2; got H=7"):
        model(torch.randn(1, 3, 7, 8), torch.tensor([1]), _ctx(1))
    with pytest.raises(ValueError, match=r"C=3"):
        model(torch.randn(1, 4, 8, 8), torch.tensor([1]), _ctx(1))
    with pytest.raises(ValueError, match="one entry per level"):
        UNet2D(channels=(16, 32), attention_levels=(True,), norm_groups=8)
    with pytest.raises(ValueError, match="pooled"):
        UNet2D(**TINY, pooled_dim=6)(torch.randn(2, 3, 8, 8), torch.tensor([1, 1]), _ctx())


def test_diffusers_backbone_takes_the_same_call_and_honours_the_mask():
    torch.manual_seed(0)
    model = DiffusersUNet2D(
        channels=(16, 32),
        layers_per_block=1,
        attention_levels=(False, True),
        attention={"heads": 2},
        context_dim=12,
        norm_groups=8,
        sample_size=8,
    ).eval()
    for p in model.unet.conv_out.parameters():
        torch.nn.init.normal_(p, std=0.05)
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), _ctx()
    out = model(x, t, ctx)
    assert out.shape == (2, 3, 8, 8)
    tokens = ctx.tokens.clone()
    tokens[0, 3:] = 1e3
    torch.testing.assert_close(model(x, t, Context(tokens=tokens, mask=ctx.mask)), out, atol=1e-5, rtol=1e-4)


def test_diffusers_backbone_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = DiffusersUNet2D(
        channels=(16, 32),
        layers_per_block=1,
        attention_levels=(False, True),
        attention={"heads": 2},
        context_dim=12,
        norm_groups=8,
        sample_size=8,
    ).eval()
    model.save_pretrained(tmp_path / "u")
    loaded = DiffusersUNet2D.from_pretrained(tmp_path / "u").eval()
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([1, 2]), _ctx()
    assert torch.equal(model(x, t, ctx), loaded(x, t, ctx))


def test_patch_size_folds_pixels_and_keeps_the_image_shape():
    torch.manual_seed(0)
    model = _perturbed(UNet2D(**TINY, patch_size=2))
    assert model.conv_in.in_channels == 12 and model.conv_out.out_channels == 12
    out = model(torch.randn(2, 3, 8, 12), torch.tensor([5, 6]), _ctx())
    assert out.shape == (2, 3, 8, 12)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 3, 6, 8), torch.tensor([1]), _ctx(1))


def _forward_backward(model, x, t, ctx, seed=5):
    """Output, input gradient and parameter gradients of one forward + backward (dropout seeded)."""
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x, t, ctx)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return out.detach(), x.grad, {name: p.grad for name, p in model.named_parameters()}


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients_and_reruns_the_blocks():
    torch.manual_seed(0)
    plain = _perturbed(UNet2D(**_arch({"self_attention_levels": (False, True)}, dropout=0.1))).train()
    checkpointed = UNet2D(**_arch({"self_attention_levels": (False, True)}, dropout=0.1)).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    calls = []
    checkpointed.mid_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    x, t, ctx = torch.randn(2, 3, 8, 8), torch.tensor([10, 500]), _ctx()
    out_a, dx_a, grads_a = _forward_backward(plain, x, t, ctx)
    out_b, dx_b, grads_b = _forward_backward(checkpointed, x, t, ctx)
    assert len(calls) == 2, "the block runs again in the backward pass"
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)  # dropout masks replayed too
    torch.testing.assert_close(dx_b, dx_a)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
    calls.clear()
    with torch.no_grad():
        checkpointed(x, t, ctx)
    assert len(calls) == 1, "no recomputation without gradients"
    checkpointed.disable_gradient_checkpointing()
    assert not checkpointed.is_gradient_checkpointing
