"""AttentionRecorder: equals explicit maps, leaves outputs bit-identical, handles batches and guidance."""

import pytest
import torch
import torch.nn.functional as F

from mmx import Context, CrossAttention, WordSpan
from mmx.attnmap import AttentionRecorder, word_maps
from mmx.diffusion import make_scheduler, sample, sampler_from
from mmx.models import DiffusersUNet2D, UNet2D

TINY = dict(
    channels=(16, 32),
    layers_per_block=1,
    attention_levels=(True, True),
    attention={"heads": 2, "dim_head": 8},
    context_dim=12,
    norm_groups=8,
)


def _model():
    torch.manual_seed(0)
    model = UNet2D(**TINY).eval()
    for name, p in model.named_parameters():
        if "proj_out" in name or "conv_out" in name or "conv2" in name:
            torch.nn.init.normal_(p, std=0.05)
    return model


def _prompts():
    """Three prompts of different lengths: 5, 3 and 7 real tokens."""
    lengths = [5, 3, 7]
    mask = torch.arange(7)[None] < torch.tensor(lengths)[:, None]
    return Context(tokens=torch.randn(3, 7, 12, generator=torch.Generator().manual_seed(1)), mask=mask)


def _explicit(model, x, t, ctx, grid):
    """Maps computed the slow way: capture each cross-attention's input, softmax(QK^T) by hand."""
    total = torch.zeros(x.shape[0], ctx.tokens.shape[1], *grid)
    inputs = []
    handles = [
        m.register_forward_pre_hook(lambda m, args, kwargs: inputs.append((m, args[0])), with_kwargs=True)
        for m in model.modules()
        if isinstance(m, CrossAttention) and m.is_cross
    ]
    model(x, t, ctx)
    for h in handles:
        h.remove()
    for module, queries in inputs:
        q = module.to_q(queries).view(x.shape[0], -1, module.heads, module.dim_head).transpose(1, 2)
        k = module.to_k(ctx.tokens).view(x.shape[0], -1, module.heads, module.dim_head).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / module.dim_head**0.5
        scores = scores.masked_fill(~ctx.mask[:, None, None, :], float("-inf"))
        probs = scores.softmax(-1).sum(1)  # (B, L, S)
        l = probs.shape[1]
        f = int((x.shape[2] * x.shape[3] / l) ** 0.5)
        maps = probs.transpose(1, 2).reshape(x.shape[0], -1, x.shape[2] // f, x.shape[3] // f)
        total += F.interpolate(maps, size=grid, mode="bilinear", align_corners=False)
    return total


@pytest.mark.parametrize("size", [(8, 8), (8, 12)])
def test_recorded_sums_equal_explicit_maps_and_outputs_are_bit_identical(size):
    model, ctx = _model(), _prompts()
    x, t = torch.randn(3, 3, *size), torch.tensor([10, 20, 30])
    plain = model(x, t, ctx)
    with AttentionRecorder(model, image_size=size) as rec:
        recorded = model(x, t, ctx)
    assert torch.equal(plain, recorded), "the recorder must not change the model output"
    assert rec.layers_attached == sum(isinstance(m, CrossAttention) and m.is_cross for m in model.modules()) == 7
    maps = rec.maps()
    assert maps.shape == (3, 7, *size)
    torch.testing.assert_close(maps, _explicit(model, x, t, ctx, size), atol=1e-5, rtol=1e-5)
    # padding tokens get no attention; each position's attention sums to the number of layers x heads
    assert maps[1, 3:].abs().max() == 0
    torch.testing.assert_close(
        maps.sum(1), torch.full((3, *size), float(rec.calls * TINY["attention"]["heads"])), atol=1e-4, rtol=1e-4
    )


def test_only_the_conditional_rows_are_recorded_under_guidance_and_memory_stays_flat():
    model, ctx = _model(), _prompts()
    null = Context(tokens=torch.randn(1, 2, 12), mask=torch.ones(1, 2, dtype=torch.bool))
    scheduler = sampler_from(make_scheduler("ddpm", num_train_timesteps=100), "ddim")
    with AttentionRecorder(model, image_size=(8, 8)) as rec:
        sample(
            model,
            scheduler,
            ctx,
            (3, 8, 8),
            num_steps=3,
            guidance_scale=3.0,
            null_context=null,
            generator=torch.Generator().manual_seed(0),
            callback=rec.callback,
        )
    held_after_3 = rec.memory_bytes()
    assert rec.maps().shape[0] == 3, "the unconditional half must not be recorded"
    with AttentionRecorder(model, image_size=(8, 8)) as rec8:
        sample(
            model,
            scheduler,
            ctx,
            (3, 8, 8),
            num_steps=8,
            guidance_scale=3.0,
            null_context=null,
            generator=torch.Generator().manual_seed(0),
            callback=rec8.callback,
        )
    assert rec8.memory_bytes() == held_after_3, "memory must not grow with the number of steps"
    assert rec8.calls == 8 * rec8.layers_attached


def test_without_guidance_every_row_is_recorded_and_step_filters_apply():
    model, ctx = _model(), _prompts()
    scheduler = sampler_from(make_scheduler("ddpm", num_train_timesteps=100), "ddim")
    with AttentionRecorder(model, image_size=(8, 8), steps=lambda s: s >= 2, window=2, per_layer=True) as rec:
        sample(
            model,
            scheduler,
            ctx,
            (3, 8, 8),
            num_steps=4,
            generator=torch.Generator().manual_seed(0),
            callback=rec.callback,
        )
    assert rec.maps().shape[0] == 3
    assert rec.calls == 2 * rec.layers_attached and sorted(rec.window_totals) == [1]
    assert len(rec.layer_totals) == rec.layers_attached


def test_layer_filter_and_no_match_error():
    model = _model()
    with AttentionRecorder(model, image_size=(8, 8), layers=["mid_attn"]) as rec:
        model(torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3]), _prompts())
    assert rec.layers_attached == 1
    with pytest.raises(ValueError, match="no cross-attention layer"):
        AttentionRecorder(model, image_size=(8, 8), layers=["nothing"]).__enter__()


def test_max_downsample_keeps_only_the_finer_maps():
    """TINY has cross-attention at full resolution (level 0) and at half (level 1, the middle)."""
    model, ctx = _model(), _prompts()
    x, t = torch.randn(3, 3, 8, 12), torch.tensor([10, 20, 30])
    with AttentionRecorder(model, image_size=(8, 12), per_layer=True) as every:
        model(x, t, ctx)
    fine = [name for name in every.layer_totals if name.startswith(("down.0", "up.1"))]
    assert 0 < len(fine) < every.layers_attached
    with AttentionRecorder(model, image_size=(8, 12), max_downsample=1) as rec:
        model(x, t, ctx)
    assert rec.calls == len(fine) and set(rec.skipped_layers) == set(every.layer_totals) - set(fine)
    assert set(rec.skipped_layers.values()) == {(4, 6)} and set(every.layer_grids.values()) == {(8, 12), (4, 6)}
    assert set(rec.layer_grids) == set(fine)
    torch.testing.assert_close(rec.maps(), sum(every.layer_totals[name] for name in fine))
    with AttentionRecorder(model, image_size=(8, 12), max_downsample=2) as rec:
        model(x, t, ctx)
    assert rec.calls == every.layers_attached and not rec.skipped_layers


def test_max_downsample_errors_name_the_value_and_the_grids():
    with pytest.raises(ValueError, match="max_downsample must be >= 1.*got 0.5"):
        AttentionRecorder(_model(), image_size=(8, 8), max_downsample=0.5)
    model = UNet2D(**{**TINY, "attention_levels": (False, True)}).eval()
    with AttentionRecorder(model, image_size=(8, 8), max_downsample=1) as rec:
        model(torch.randn(3, 3, 8, 8), torch.tensor([1, 2, 3]), _prompts())
    with pytest.raises(RuntimeError, match=r"every layer's maps \(4x4\) are coarser than max_downsample=1 .* 8x8"):
        rec.maps()


def test_diffusers_unet_path_records_and_keeps_outputs_identical():
    torch.manual_seed(0)
    model = DiffusersUNet2D(
        channels=(16, 32),
        layers_per_block=1,
        attention_levels=(True, True),
        attention={"heads": 2},
        context_dim=12,
        norm_groups=8,
        sample_size=8,
    ).eval()
    ctx = _prompts()
    x, t = torch.randn(3, 3, 8, 12), torch.tensor([10, 20, 30])
    plain = model(x, t, ctx)
    with AttentionRecorder(model, image_size=(8, 12)) as rec:
        recorded = model(x, t, ctx)
    assert torch.equal(plain, recorded)
    maps = rec.maps()
    assert maps.shape == (3, 7, 8, 12) and rec.layers_attached > 0
    assert maps[1, 3:].abs().max() < 1e-6, "the Context mask reaches diffusers as encoder_attention_mask"
    # processors are restored on exit
    assert not any(type(m.processor).__name__ == "_TappedProcessor" for m in model.modules() if hasattr(m, "processor"))


def test_diffusers_pipeline_layout_takes_the_second_half():
    model, ctx = _model(), _prompts()
    doubled = Context(
        tokens=torch.cat([torch.zeros_like(ctx.tokens), ctx.tokens]), mask=torch.cat([ctx.mask, ctx.mask])
    )
    x = torch.randn(3, 3, 8, 8)
    with AttentionRecorder(model, image_size=(8, 8), num_prompts=3, guidance_order="uncond_first") as rec:
        model(torch.cat([x, x]), torch.tensor([5] * 6), doubled)
    with AttentionRecorder(model, image_size=(8, 8)) as ref:
        model(x, torch.tensor([5] * 3), ctx)
    torch.testing.assert_close(rec.maps(), ref.maps(), atol=1e-5, rtol=1e-5)


def test_word_maps_average_the_tokens_of_a_word():
    maps = torch.rand(1, 6, 4, 4)
    words = [[WordSpan("a", 1, 2), WordSpan("photorealistic", 2, 5)]]
    result = word_maps(
        maps, words, image_size=(8, 8), normalize="none", mask=torch.ones(1, 6, dtype=torch.bool), special_tokens=True
    )[0]
    assert [w.word for w in result] == ["a", "photorealistic", "<start>", "<end>"]
    expected = F.interpolate(maps, size=(8, 8), mode="bilinear", align_corners=False)[0, 2:5].mean(0)
    torch.testing.assert_close(result[1].map, expected)
    normed = word_maps(maps, words)[0][1].map
    assert normed.min() == 0 and torch.isclose(normed.max(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="normalization"):
        word_maps(maps, words, normalize="softmax")
