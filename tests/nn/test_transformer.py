"""TransformerBlock, SpatialTransformer and TemporalTransformer: identity at init, masks, layouts."""

import pytest
import torch

from mmx import Context, SpatialTransformer, TemporalTransformer, TransformerBlock


def _perturb_output(block):
    """Give the zero-initialised output projection weights, so the block does something."""
    torch.nn.init.normal_(block.proj_out.weight, std=0.2)
    return block


def test_spatial_transformer_is_identity_at_init_and_keeps_non_square_shape():
    torch.manual_seed(0)
    block = SpatialTransformer(32, context_dim=24, heads=2, dim_head=8)
    x = torch.randn(2, 32, 5, 9)  # H != W
    ctx = torch.randn(2, 7, 24)
    out = block(x, ctx)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x)
    out = _perturb_output(block)(x, ctx)
    assert not torch.allclose(out, x)
    assert not torch.allclose(out, block(x, torch.randn(2, 7, 24))), "the output must depend on the context"


def test_spatial_position_order_is_row_major():
    """Position (i, j) of the map is token i*W + j: a change at one pixel shows mainly at that pixel.

    (Only GroupNorm statistics, shared by all positions, spread a little of it elsewhere.)"""
    torch.manual_seed(0)
    block = _perturb_output(SpatialTransformer(8, context_dim=4, heads=1, dim_head=8, self_attention=False))
    block.eval()
    x = torch.randn(1, 8, 3, 4)
    ctx = torch.randn(1, 2, 4)
    base = block(x, ctx)
    x2 = x.clone()
    x2[0, :, 1, 2] += 1.0
    diff = (block(x2, ctx) - base).abs().sum(1)[0]
    assert diff.argmax() == 1 * 4 + 2 and diff[1, 2] > 5 * diff.flatten().topk(2).values[1]


@pytest.mark.parametrize("cls,shape", [(SpatialTransformer, (2, 16, 4, 6)), (TemporalTransformer, (2, 16, 10))])
def test_padding_tokens_cannot_change_the_output(cls, shape):
    torch.manual_seed(0)
    block = _perturb_output(cls(16, context_dim=12, heads=2, dim_head=8, depth=2))
    x = torch.randn(shape)
    tokens = torch.randn(2, 6, 12)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = block(x, Context(tokens=tokens, mask=mask))
    tokens2 = tokens.clone()
    tokens2[~mask] = torch.randn(int((~mask).sum()), 12) * 100
    torch.testing.assert_close(block(x, tokens2, mask=mask), out)
    assert out.shape == x.shape


def test_temporal_transformer_attends_per_step():
    torch.manual_seed(0)
    block = _perturb_output(TemporalTransformer(16, context_dim=8, heads=2, dim_head=8))
    x = torch.randn(3, 16, 12)
    out = block(x, torch.randn(3, 4, 8))
    assert out.shape == (3, 16, 12)


def test_wrong_layout_names_the_expected_one():
    block = SpatialTransformer(16, context_dim=8, heads=2, dim_head=8)
    with pytest.raises(ValueError, match=r"\[B, C, H, W\] with C=16; got \(2, 16, 10\)"):
        block(torch.randn(2, 16, 10), torch.randn(2, 3, 8))
    with pytest.raises(ValueError, match=r"context_dim=8"):
        block(torch.randn(2, 16, 4, 4), torch.randn(2, 3, 9))
    with pytest.raises(ValueError, match="divisor of channels=30"):
        SpatialTransformer(30, norm_groups=8)


def test_transformer_block_requires_context_when_built_for_it():
    block = TransformerBlock(16, context_dim=8, heads=2, dim_head=8)
    with pytest.raises(ValueError, match="context=None"):
        block(torch.randn(1, 3, 16))
    self_only = TransformerBlock(16, heads=2, dim_head=8)
    assert self_only.attn2 is None
    with pytest.raises(ValueError, match="without cross-attention"):
        self_only(torch.randn(1, 3, 16), torch.randn(1, 2, 8))


def test_transformer_block_loads_diffusers_basic_transformer_block_weights():
    from diffusers.models.attention import BasicTransformerBlock

    torch.manual_seed(0)
    theirs = BasicTransformerBlock(32, 4, 8, cross_attention_dim=12, activation_fn="geglu").eval()
    ours = TransformerBlock(32, context_dim=12, heads=4, dim_head=8).eval()
    ours.load_state_dict(theirs.state_dict())
    x, ctx = torch.randn(2, 10, 32), torch.randn(2, 5, 12)
    torch.testing.assert_close(ours(x, ctx), theirs(x, encoder_hidden_states=ctx), atol=1e-5, rtol=1e-5)


def test_spatial_transformer_loads_diffusers_transformer2d_weights():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    torch.manual_seed(0)
    theirs = Transformer2DModel(
        2, 16, in_channels=32, cross_attention_dim=12, norm_num_groups=8, use_linear_projection=True
    ).eval()
    ours = SpatialTransformer(32, context_dim=12, heads=2, dim_head=16, norm_groups=8).eval()
    missing = ours.load_state_dict(theirs.state_dict(), strict=True)
    assert not missing.missing_keys
    x, ctx = torch.randn(2, 32, 4, 6), torch.randn(2, 5, 12)
    torch.nn.init.normal_(ours.proj_out.weight)
    theirs.proj_out.weight.data.copy_(ours.proj_out.weight)
    torch.testing.assert_close(ours(x, ctx), theirs(x, encoder_hidden_states=ctx).sample, atol=1e-4, rtol=1e-4)


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    block = _perturb_output(SpatialTransformer(16, context_dim=8, heads=2, dim_head=8))
    block(torch.randn(2, 16, 4, 4), torch.randn(2, 3, 8)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in block.parameters())


def test_grid_fourier_features_place_cells_by_fraction_of_the_map():
    from mmx.nn import grid_fourier_features

    feats = grid_fourier_features((3, 5), 2)
    assert feats.shape == (15, 2 * 2 * 2)
    # The centre cell of a 3x5 map sits at (0, 0) whatever the map's size: sin 0, cos 1.
    torch.testing.assert_close(feats[1 * 5 + 2], torch.tensor([0.0, 0, 0, 0, 1, 1, 1, 1]))
    # Cell 0 of a 2-wide row and cell 1 of a 6-wide row are both centred a quarter of the way in.
    torch.testing.assert_close(grid_fourier_features((2,), 3)[0], grid_fourier_features((6,), 3)[1])
    one_d = grid_fourier_features((6,), 1)
    assert one_d.shape == (6, 2) and torch.all(one_d[:3, 0] < 0) and torch.all(one_d[3:, 0] > 0)


@pytest.mark.parametrize("cls,shape", [(SpatialTransformer, (1, 16, 3, 5)), (TemporalTransformer, (1, 16, 7))])
def test_position_embedding_starts_as_nothing_and_then_tells_positions_apart(cls, shape):
    torch.manual_seed(0)
    plain = cls(16, context_dim=8, heads=2, dim_head=8, self_attention=False)
    placed = cls(16, context_dim=8, heads=2, dim_head=8, self_attention=False, position_frequencies=3)
    assert placed.load_state_dict(plain.state_dict(), strict=False).missing_keys == ["pos_proj.weight", "pos_proj.bias"]
    _perturb_output(plain), placed.proj_out.weight.data.copy_(plain.proj_out.weight)
    # Every position sees the same input: without a place embedding every output is the same.
    x = torch.randn(shape[:2]).reshape(*shape[:2], *[1] * (len(shape) - 2)).expand(shape).contiguous()
    ctx = torch.randn(1, 4, 8)
    torch.testing.assert_close(placed(x, ctx), plain(x, ctx))  # zero-initialised: no change yet
    flat = plain(x, ctx).flatten(2)
    assert torch.allclose(flat, flat[..., :1].expand_as(flat), atol=1e-5)
    torch.nn.init.normal_(placed.pos_proj.weight)
    flat = placed(x, ctx).flatten(2)
    assert (flat - flat[..., :1]).abs().amax(1).min(-1).values.item() == 0.0  # position 0 against itself
    assert (flat - flat[..., :1]).abs().amax(1)[0, 1:].min() > 1e-3, "every position should differ from the first"


def test_position_frequencies_must_be_a_non_negative_int():
    with pytest.raises(ValueError, match="position_frequencies must be an int >= 0; got -1"):
        SpatialTransformer(16, context_dim=8, heads=2, dim_head=8, position_frequencies=-1)
    with pytest.raises(ValueError, match="position_into must be one of tokens, queries; got 'keys'"):
        SpatialTransformer(16, context_dim=8, heads=2, dim_head=8, position_frequencies=2, position_into="keys")


def test_position_into_queries_steers_what_is_read_but_never_writes_place():
    torch.manual_seed(0)
    kwargs = dict(context_dim=8, heads=2, dim_head=8, self_attention=False, position_frequencies=3)
    tokens = SpatialTransformer(16, **kwargs)
    queries = SpatialTransformer(16, **kwargs, position_into="queries")
    queries.load_state_dict(tokens.state_dict())
    _perturb_output(tokens), queries.proj_out.weight.data.copy_(tokens.proj_out.weight)
    torch.nn.init.normal_(tokens.pos_proj.weight), queries.pos_proj.weight.data.copy_(tokens.pos_proj.weight)
    x = torch.randn(1, 16, 1, 1).expand(1, 16, 3, 5).contiguous()  # every position sees the same input

    def spread(out):  # how much the output differs between positions
        flat = out.flatten(2)
        return (flat - flat[..., :1]).abs().max().item()

    one_word = torch.randn(1, 1, 8)
    # One word to read: every position reads all of it, so with the place only in the queries every
    # output is the same; added to the tokens, the place reaches the output.
    assert spread(queries(x, one_word)) < 1e-5
    assert spread(tokens(x, one_word)) > 1e-3
    # Several words: the place decides how much of each a position reads.
    assert spread(queries(x, torch.randn(1, 4, 8))) > 1e-3
