"""Differentiable attention maps and their losses: zero when attention sits on the object, positive otherwise."""

import pytest
import torch
import torch.nn.functional as F

from mmx import Context, WordSpan
from mmx.attnmap.capture import GroundingCapture, mask_kl, token_targets
from mmx.diffusion.loss import drop_conditions
from mmx.models import UNet2D


def test_token_targets_put_each_object_mask_on_its_words_tokens():
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[:2, :2] = True
    words = [[WordSpan("a", 1, 2), WordSpan("photorealistic", 2, 4), WordSpan("circle", 4, 5)]]
    targets, valid = token_targets(words, [{1: mask, 2: mask}], tokens=6, size=(4, 4))
    assert valid.tolist() == [[False, False, True, True, True, False]]
    assert torch.equal(targets[0, 3].bool(), mask) and targets[0, 1].sum() == 0


def test_loss_is_zero_inside_and_one_outside_and_has_gradients():
    torch.manual_seed(0)
    model = UNet2D(
        channels=(16, 32),
        layers_per_block=1,
        attention_levels=(True, True),
        attention={"heads": 2, "dim_head": 8},
        context_dim=12,
        norm_groups=8,
    )
    ctx = Context(tokens=torch.randn(1, 3, 12, requires_grad=True), mask=torch.ones(1, 3, dtype=torch.bool))
    with GroundingCapture(model) as capture:
        model(torch.randn(1, 3, 8, 8), torch.tensor([10]), ctx)
    assert len(capture.calls) == 7
    everywhere = torch.ones(1, 3, 8, 8)
    valid = torch.tensor([[False, True, False]])
    inside = capture.grounding_loss(everywhere, valid, (8, 8))
    assert inside.abs() < 1e-6, "all attention is inside a mask covering the whole image"
    nowhere = capture.grounding_loss(torch.zeros(1, 3, 8, 8), valid, (8, 8))
    torch.testing.assert_close(nowhere, torch.tensor(1.0))
    half = torch.zeros(1, 3, 8, 8)
    half[..., :4] = 1
    loss = capture.grounding_loss(half, valid, (8, 8))
    loss.backward()
    assert 0 < loss < 1 and ctx.tokens.grad is not None and ctx.tokens.grad.abs().sum() > 0


def test_coverage_loss_wants_the_map_to_cover_the_object_not_only_to_lie_in_it():
    from mmx.nn import CrossAttention

    attn = CrossAttention(4, 4, heads=1, dim_head=4)
    # 4x4 grid of queries, 2 tokens; token 1's attention is exactly the object's mask (a 2x2 block) or a
    # single peak inside it
    obj = torch.zeros(4, 4)
    obj[:2, :2] = 1
    targets = torch.stack([torch.zeros(4, 4), obj])[None]  # (1, S=2, 4, 4)
    valid = torch.tensor([[False, True]])

    def loss_for(scores_of_token1: torch.Tensor) -> torch.Tensor:
        capture = GroundingCapture(attn)
        # q @ k^T * scale = the given scores for token 1, 0 for token 0 (q, k one-hot-ish by construction)
        q = torch.stack([torch.zeros(16), scores_of_token1.flatten()], dim=-1)[None, None]  # (1, 1, 16, 2)
        k = torch.eye(2)[None, None]  # (1, 1, 2, 2)
        capture.calls.append((q, k, None, 1.0))
        return capture.coverage_loss(targets, valid, (4, 4))

    covering = loss_for(obj * 40 - 20)  # object queries read token 1, the others token 0
    peak = torch.full((4, 4), -20.0)
    peak[0, 0] = 20
    assert covering < 1e-3, "a map that is the object's mask costs nothing"
    assert loss_for(peak) > 1.0, "a single peak inside the object leaves most of it uncovered"
    assert loss_for(torch.zeros(4, 4)) > 0.5  # every query reads both tokens alike: spread over the image
    assert GroundingCapture(attn).coverage_loss(targets, valid, (4, 4)) == 0  # nothing captured


def test_reading_loss_wants_object_positions_to_read_all_their_words():
    """3 tokens: 0 a function word, 1 the colour and 2 the shape of an object covering a 2x2 block."""
    obj = torch.zeros(4, 4)
    obj[:2, :2] = 1
    targets = torch.stack([torch.zeros(4, 4), obj, obj])[None]  # (1, S=3, 4, 4)
    valid = torch.tensor([[False, True, True]])

    def loss_for(scores: torch.Tensor) -> torch.Tensor:  # scores [16, 3]: q k^T * scale per query and token
        capture = GroundingCapture(torch.nn.Identity())
        capture.calls.append((scores[None, None], torch.eye(3)[None, None], None, 1.0))
        return capture.reading_loss(targets, valid, (4, 4))

    inside = obj.flatten().bool()
    balanced = torch.full((16, 3), -20.0)
    balanced[inside, 1:] = 20  # object positions read colour and shape alike; the rest reads token 0
    balanced[~inside, 0] = 20
    colour_heavy = balanced.clone()
    colour_heavy[inside, 2] = 20 - torch.log(torch.tensor(9.0))  # reads 0.9 colour, 0.1 shape
    torch.testing.assert_close(loss_for(balanced), torch.tensor(0.0), atol=1e-4, rtol=0)
    want = 0.5 * torch.log(torch.tensor(0.5 / 0.9)) + 0.5 * torch.log(torch.tensor(0.5 / 0.1))
    torch.testing.assert_close(loss_for(colour_heavy), want, atol=1e-4, rtol=0)
    background = balanced.clone()
    background[~inside] = 0.0  # what positions outside every object read is not its business
    torch.testing.assert_close(loss_for(background), torch.tensor(0.0), atol=1e-4, rtol=0)
    scores = torch.zeros(16, 3, requires_grad=True)
    loss = loss_for(scores)
    loss.backward()
    torch.testing.assert_close(loss, torch.log(torch.tensor(3 / 2)))  # uniform over 3 tokens against 2 words
    assert (scores.grad[inside, 1:] < 0).all() and (scores.grad[inside, 0] > 0).all()  # descent raises the words
    assert GroundingCapture(torch.nn.Identity()).reading_loss(targets, valid, (4, 4)) == 0  # nothing captured


def test_reading_loss_min_cover_leaves_out_the_cells_on_an_objects_edge():
    """Image 8x8 read on a 4x4 grid: an object of 3x3 pixels covers one cell fully and three a quarter
    or a half; the edge cells read only token 0 (the background's), the full cell its two words."""
    obj = torch.zeros(8, 8)
    obj[:3, :3] = 1
    targets = torch.stack([torch.zeros(8, 8), obj, obj])[None]
    valid = torch.tensor([[False, True, True]])
    scores = torch.full((16, 3), -20.0)
    scores[:, 0] = 20  # every cell reads token 0 ...
    scores[0] = torch.tensor([-20.0, 20.0, 20.0])  # ... but the covered one, which reads both words

    def loss_for(min_cover: float) -> torch.Tensor:
        capture = GroundingCapture(torch.nn.Identity())
        capture.calls.append((scores[None, None], torch.eye(3)[None, None], None, 1.0))
        return capture.reading_loss(targets, valid, (8, 8), min_cover=min_cover)

    assert loss_for(0.0) > 5  # the edge cells (cover 1/4 and 1/2) are asked to read the object's words
    assert loss_for(0.5) > 5  # the half-covered cells still are
    torch.testing.assert_close(loss_for(0.51), torch.tensor(0.0), atol=1e-4, rtol=0)  # only the full cell is left
    with pytest.raises(ValueError, match=r"min_cover must be in \[0, 1\]; got 1.5"):
        loss_for(1.5)
    per_token = torch.tensor([[0.0, 0.51, 0.0]])  # token 1 only where the object lies mostly; token 2 wherever it is
    edge = (F.adaptive_avg_pool2d(obj[None], (4, 4))[0].flatten() > 0) & (torch.arange(16) != 0)
    scores[edge] = torch.tensor([-20.0, -20.0, 20.0])  # the edge cells read token 2 alone
    torch.testing.assert_close(loss_for(per_token), torch.tensor(0.0), atol=1e-4, rtol=0)
    assert loss_for(0.0) > 1  # with one threshold for both, the edge cells miss token 1


def test_drop_conditions_reports_the_replaced_rows():
    ctx = Context(tokens=torch.randn(32, 3, 4), mask=torch.ones(32, 3, dtype=torch.bool))
    null = Context(tokens=torch.zeros(1, 3, 4), mask=torch.ones(1, 3, dtype=torch.bool))
    out, dropped = drop_conditions(ctx, null, 0.5, torch.Generator().manual_seed(0), return_dropped=True)
    assert torch.equal(out.tokens[dropped], torch.zeros(int(dropped.sum()), 3, 4))
    assert torch.equal(out.tokens[~dropped], ctx.tokens[~dropped])
    _, none = drop_conditions(ctx, null, 0.0, return_dropped=True)
    assert not none.any()


def test_losses_share_one_softmax_per_captured_call(monkeypatch):
    import mmx.attnmap.capture as gl

    computed = []
    real = gl.attention_probs
    monkeypatch.setattr(gl, "attention_probs", lambda *a, **kw: computed.append(1) or real(*a, **kw))
    capture = GroundingCapture(torch.nn.Identity())
    capture.calls += [(torch.randn(1, 1, 16, 4), torch.randn(1, 1, 3, 4), None, 0.5)] * 2
    targets, valid = torch.rand(1, 3, 4, 4), torch.tensor([[False, True, True]])
    losses = [
        capture.coverage_loss(targets, valid, (4, 4)),
        capture.reading_loss(targets, valid, (4, 4)),
        capture.grounding_loss(targets, valid, (4, 4)),
    ]
    assert len(computed) == 2 and all(torch.isfinite(x) for x in losses)  # one softmax per call, three losses
    capture.calls.append(capture.calls[0])  # a new call: the maps are computed again
    capture.coverage_loss(targets, valid, (4, 4))
    assert len(computed) == 5


def test_mask_kl_is_zero_for_a_map_that_covers_its_mask_and_skips_empty_rows():
    mask = torch.zeros(1, 2, 8, 8)
    mask[0, 0, :4, :4] = 1  # row 0: the top-left quarter; row 1: no mask, never counted
    covering = torch.zeros(1, 2, 4, 4)
    covering[0, 0, :2, :2] = 5.0  # any scale: rows are normalised
    covering[0, 1] = torch.rand(4, 4)
    assert mask_kl(covering.flatten(2), mask, (4, 4)).item() == pytest.approx(0.0, abs=1e-6)
    peak = torch.full((1, 2, 16), 1e-9)
    peak[0, 0, 0] = 1.0  # one position of the four the mask covers
    three = peak.clone()
    three[0, 0, [0, 1, 4]] = 1.0  # three of the four positions
    assert mask_kl(peak, mask, (4, 4)).item() > mask_kl(three, mask, (4, 4)).item() > 0, "more cover, less loss"
    assert mask_kl(peak, mask, (4, 4), valid=torch.tensor([[False, True]])).item() == 0.0


def test_a_diffusers_unet_is_captured_like_an_mmx_one_and_its_projections_get_gradients():
    from mmx.models.unet2d import DiffusersUNet2D

    torch.manual_seed(0)
    model = DiffusersUNet2D(
        channels=(16, 32),
        layers_per_block=1,
        attention_levels=(True, True),
        attention={"heads": 2},
        context_dim=12,
        norm_groups=8,
        sample_size=8,
    )
    ctx = Context(tokens=torch.randn(1, 3, 12), mask=torch.tensor([[True, True, False]]))
    with GroundingCapture(model) as capture:
        model(torch.randn(1, 3, 8, 8), torch.tensor([10]), ctx)
    assert len(capture.calls) == 7  # like the mmx UNet: 2 down, 1 middle, 2 x 2 up
    q, k, mask, scale = capture.calls[0]
    assert q.shape[:2] == (1, 2) and k.shape[2] == 3 and scale == q.shape[-1] ** -0.5
    probs, _ = capture._layer_maps((8, 8))[0]
    assert probs[..., 2].max() < 1e-6  # the padding token is masked out
    targets = torch.zeros(1, 3, 8, 8)
    targets[:, :, :4, :4] = 1
    loss = capture.coverage_loss(targets, torch.tensor([[False, True, False]]), (8, 8))
    assert loss > 0
    loss.backward()
    to_k = next(m.to_k for m in model.modules() if getattr(m, "is_cross_attention", False))
    assert to_k.weight.grad is not None and to_k.weight.grad.abs().sum() > 0


def test_a_model_without_cross_attention_is_an_error_not_a_silent_zero_loss():
    with pytest.raises(ValueError, match="Identity has no cross-attention layer"):
        with GroundingCapture(torch.nn.Identity()):
            pass
