"""UNet1D: Diffusion Policy's layout and keys, equal outputs to an independent rebuild, cross-attention, errors."""

import pytest
import torch

from mmx import Context
from mmx.bench.upstream_unet1d import UpstreamUnet1D
from mmx.models import MODELS, UNet1D
from mmx.nn import ResBlock1D

# The published small instance (shared/reference/diffusion_policy_unet1d_keys.tsv).
SMALL = dict(
    input_dim=2,
    global_cond_dim=10,
    diffusion_step_embed_dim=32,
    down_dims=(32, 64),
    kernel_size=5,
    n_groups=8,
    cond_predict_scale=True,
)
XATTN = dict(context_dim=12, heads=2, dim_head=8, attn_ff_mult=2)


def _perturbed_state(model: torch.nn.Module, seed: int = 1, std: float = 0.05) -> dict:
    """The model's state_dict with every tensor moved by noise (so nothing is at its initial value)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + std * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def _ctx(b=3, s=6, pooled=None):
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 4:] = False
    return Context(tokens=torch.randn(b, s, 12), mask=mask, pooled=pooled)


def test_state_dict_keys_shapes_and_order_match_diffusion_policy(dp_reference_keys):
    rows = [line.split("\t") for line in dp_reference_keys.read_text().splitlines() if not line.startswith("#")]
    want = [(key, eval(shape)) for key, shape in rows]
    model = MODELS.build("unet1d", **SMALL)
    got = [(key, tuple(v.shape)) for key, v in model.state_dict().items()]
    assert got == want
    assert sum(p.numel() for p in model.parameters()) == 267_650


def test_strict_load_of_a_perturbed_state_dict_gives_equal_outputs():
    torch.manual_seed(0)
    state = _perturbed_state(UNet1D(**SMALL))
    a, b = UNet1D(**SMALL), UNet1D(**SMALL)
    a.load_state_dict(state, strict=True)
    b.load_state_dict(state, strict=True)
    x, t, g = torch.randn(3, 8, 2), torch.tensor([0, 40, 99]), torch.randn(3, 10)
    out = a(x, t, pooled=g)
    assert torch.equal(out, b(x, t, pooled=g))
    fresh = UNet1D(**SMALL)
    assert not torch.allclose(fresh(x, t, pooled=g), out), "the loaded weights must matter"


@pytest.mark.parametrize("global_cond_dim", [10, None])
@pytest.mark.parametrize("cond_predict_scale", [True, False])
def test_equals_an_independent_rebuild_of_the_upstream_model(cond_predict_scale, global_cond_dim):
    cfg = dict(SMALL, down_dims=(16, 32, 64), cond_predict_scale=cond_predict_scale, global_cond_dim=global_cond_dim)
    torch.manual_seed(0)
    upstream = UpstreamUnet1D(**cfg)
    state = _perturbed_state(upstream)
    upstream.load_state_dict(state, strict=True)
    model = UNet1D(**cfg)
    model.load_state_dict(state, strict=True)
    assert list(model.state_dict()) == list(upstream.state_dict())
    x = torch.randn(4, 16, 2)
    g = torch.randn(4, 10) if global_cond_dim else None
    for t in (torch.tensor([0, 10, 500, 999]), torch.tensor(37), 250):
        want = upstream(x, t, global_cond=g)
        torch.testing.assert_close(model(x, t, pooled=g), want, atol=1e-5, rtol=0)
    assert want.abs().max() > 0.1, "a trivial output would make the comparison empty"


def test_global_condition_can_come_from_context_pooled():
    torch.manual_seed(0)
    model = UNet1D(**SMALL)
    model.load_state_dict(_perturbed_state(model))
    x, g = torch.randn(3, 8, 2), torch.randn(3, 10)
    out = model(x, 5, pooled=g)
    torch.testing.assert_close(model(x, 5, context=_ctx(pooled=g)), out)
    assert not torch.allclose(model(x, 5, pooled=torch.randn(3, 10)), out)


def test_masked_context_tokens_have_no_effect_and_all_masked_rows_stay_finite():
    torch.manual_seed(0)
    model = UNet1D(**SMALL, **XATTN).eval()
    model.load_state_dict(_perturbed_state(model))  # proj_out no longer zero: attention matters
    x, t, g, ctx = torch.randn(3, 8, 2), torch.tensor([3, 50, 90]), torch.randn(3, 10), _ctx()
    out = model(x, t, ctx, pooled=g)
    tokens = ctx.tokens.clone()
    tokens[0, 4:] = 1e3  # masked positions of sample 0
    torch.testing.assert_close(model(x, t, Context(tokens=tokens, mask=ctx.mask), pooled=g), out)
    unmasked = model(x, t, Context(tokens=tokens, mask=torch.ones_like(ctx.mask)), pooled=g)
    assert not torch.allclose(unmasked[0], out[0]), "the same tokens unmasked must change sample 0"
    mask = ctx.mask.clone()
    mask[1] = False  # sample 1 sees no token at all
    empty = model(x, t, Context(tokens=ctx.tokens, mask=mask), pooled=g)
    assert torch.isfinite(empty).all()
    torch.testing.assert_close(empty[0], out[0])


def test_cross_attention_model_with_dp_weights_equals_the_film_only_model():
    torch.manual_seed(0)
    film_only = UNet1D(**SMALL)
    state = _perturbed_state(film_only)
    film_only.load_state_dict(state, strict=True)
    xattn = UNet1D(**SMALL, **XATTN)
    missing, unexpected = xattn.load_state_dict(state, strict=False)
    assert not unexpected and missing and all(".cross_attn." in k for k in missing)
    assert len({k.split(".cross_attn.")[0] for k in missing}) == 2 * 2 + 2 + 2  # every residual block: down, mid, up
    x, t, g = torch.randn(3, 8, 2), torch.tensor([1, 2, 3]), torch.randn(3, 10)
    torch.testing.assert_close(xattn(x, t, _ctx(), pooled=g), film_only(x, t, pooled=g), atol=1e-6, rtol=0)


def test_horizon_shape_and_condition_errors_are_clear():
    model = UNet1D(**dict(SMALL, down_dims=(16, 32, 64)), **XATTN)  # halves T twice: T % 4 == 0
    g, ctx = torch.randn(2, 10), _ctx(b=2)
    with pytest.raises(ValueError, match=r"divide by 4; got T=10 \(nearest valid horizons: 8 or 12\)"):
        model(torch.randn(2, 10, 2), 0, ctx, pooled=g)
    with pytest.raises(ValueError, match=r"T=3 \(nearest valid horizons: 4\)"):
        model(torch.randn(2, 3, 2), 0, ctx, pooled=g)
    model.check_horizon(16)  # valid: no error
    with pytest.raises(ValueError, match=r"T=14 \(nearest valid horizons: 12 or 16\)"):
        model.check_horizon(14)
    with pytest.raises(ValueError, match=r"input_dim=2.*got \(2, 8\)"):
        model(torch.randn(2, 8), 0, ctx, pooled=g)
    with pytest.raises(ValueError, match="channels-first"):
        model(torch.randn(2, 2, 8), 0, ctx, pooled=g)
    with pytest.raises(ValueError, match=r"global_cond_dim=10\]; got \(2, 7\)"):
        model(torch.randn(2, 8, 2), 0, ctx, pooled=torch.randn(2, 7))
    with pytest.raises(ValueError, match="global_cond_dim=10"):
        model(torch.randn(2, 8, 2), 0, ctx)  # neither pooled nor context.pooled
    with pytest.raises(ValueError, match=r"context tokens of width 12; got context=None"):
        model(torch.randn(2, 8, 2), 0, pooled=g)
    with pytest.raises(ValueError, match=r"context_dim=12\]; got \(2, 6, 5\)"):
        model(torch.randn(2, 8, 2), 0, Context(tokens=torch.randn(2, 6, 5), mask=ctx.mask), pooled=g)
    no_global = UNet1D(**dict(SMALL, global_cond_dim=None))
    with pytest.raises(ValueError, match="global_cond_dim=None"):
        no_global(torch.randn(2, 8, 2), 0, pooled=g)
    block = ResBlock1D(8, 8, cond_dim=4)
    with pytest.raises(ValueError, match="without cross-attention"):
        block(torch.randn(2, 8, 4), torch.randn(2, 4), ctx)


def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    torch.manual_seed(0)
    model = UNet1D(**SMALL, **XATTN).eval()
    model.load_state_dict(_perturbed_state(model))
    model.save_pretrained(tmp_path / "unet1d")
    assert (tmp_path / "unet1d" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = UNet1D.from_pretrained(tmp_path / "unet1d").eval()
    assert loaded.config.context_dim == 12 and tuple(loaded.config.down_dims) == (32, 64)
    x, t, g, ctx = torch.randn(3, 8, 2), torch.tensor([7, 8, 9]), torch.randn(3, 10), _ctx()
    assert torch.equal(loaded(x, t, ctx, pooled=g), model(x, t, ctx, pooled=g))


def test_one_optimizer_step_makes_the_output_read_the_context():
    torch.manual_seed(0)
    model = UNet1D(**SMALL, **XATTN)
    x, t, g = torch.randn(3, 8, 2), torch.tensor([5, 6, 7]), torch.randn(3, 10)
    ctx_a, ctx_b = _ctx(), _ctx()
    assert torch.equal(model(x, t, ctx_a, pooled=g), model(x, t, ctx_b, pooled=g)), "fresh cross-attn is the identity"
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = (model(x, t, ctx_a, pooled=g) - torch.randn(3, 8, 2)).pow(2).mean()
    loss.backward()
    grads = {k: p.grad for k, p in model.named_parameters() if ".cross_attn.proj_out." in k}
    assert len(grads) == 2 * 8 and all(v is not None and v.abs().sum() > 0 for v in grads.values())
    opt.step()
    with torch.no_grad():
        assert not torch.allclose(model(x, t, ctx_a, pooled=g), model(x, t, ctx_b, pooled=g))


SMALL = dict(
    input_dim=2,
    global_cond_dim=10,
    diffusion_step_embed_dim=32,
    down_dims=(32, 64),
    kernel_size=5,
    n_groups=8,
    cond_predict_scale=True,
)


def _dp_checkpoint(model: UNet1D, ema: UNet1D) -> dict:
    """A workspace checkpoint shaped like Diffusion Policy's: the UNet under ``model.`` beside the obs encoder."""

    def policy_state(unet):
        return {**{f"model.{k}": v for k, v in unet.state_dict().items()}, "obs_encoder.proj.weight": torch.zeros(3, 3)}

    return {"state_dicts": {"model": policy_state(model), "ema_model": policy_state(ema)}}


def _saved_dp_checkpoint(tmp_path):
    """``(model, ema, path)``: a workspace checkpoint on disk whose EMA weights differ from the model's."""
    torch.manual_seed(0)
    model, ema = UNet1D(**SMALL), UNet1D(**SMALL)
    ema.load_state_dict(_perturbed_state(ema))
    path = tmp_path / "latest.ckpt"
    torch.save(_dp_checkpoint(model, ema), path)
    return model, ema, path


def test_from_diffusion_policy_reads_the_config_from_shapes_and_loads_the_ema_weights(tmp_path):
    from mmx.models.unet1d import infer_diffusion_policy_config

    model, ema, path = _saved_dp_checkpoint(tmp_path)
    loaded = UNet1D.from_diffusion_policy(path)
    assert {k: loaded.config[k] for k in SMALL} == {**SMALL, "down_dims": tuple(loaded.config["down_dims"])}
    assert tuple(loaded.config["down_dims"]) == (32, 64)
    assert infer_diffusion_policy_config(model.state_dict())["global_cond_dim"] == 10
    x, t, g = torch.randn(2, 8, 2), torch.tensor([3, 70]), torch.randn(2, 10)
    assert torch.equal(loaded(x, t, pooled=g), ema(x, t, pooled=g))
    plain = UNet1D.from_diffusion_policy(path, which="model")
    assert torch.equal(plain(x, t, pooled=g), model(x, t, pooled=g))


def test_from_diffusion_policy_refuses_pickled_objects_unless_trusted(tmp_path):
    import types

    torch.manual_seed(0)
    model = UNet1D(**SMALL)
    payload = _dp_checkpoint(model, model)
    payload["cfg"] = types.SimpleNamespace(policy="diffusion_unet_lowdim")  # stands in for the pickled config
    path = tmp_path / "epoch=0100.ckpt"
    torch.save(payload, path)
    with pytest.raises(ValueError, match="trust_pickle=True"):
        UNet1D.from_diffusion_policy(path)
    loaded = UNet1D.from_diffusion_policy(path, trust_pickle=True)
    assert loaded.config.global_cond_dim == 10
    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        UNet1D.from_diffusion_policy(tmp_path / "nope.ckpt")
    with pytest.raises(KeyError, match="no keys start with 'unet.'"):
        UNet1D.from_diffusion_policy(_dp_checkpoint(model, model), prefix="unet.")


def test_convert_diffusion_policy_writes_a_folder_that_loads_without_pickle(tmp_path):
    from mmx.models.unet1d import convert_diffusion_policy

    model, ema, path = _saved_dp_checkpoint(tmp_path)
    out = tmp_path / "converted" / "unet1d"
    convert_diffusion_policy(path, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    loaded = UNet1D.from_pretrained(out)
    x, t, g = torch.randn(2, 8, 2), torch.tensor([3, 70]), torch.randn(2, 10)
    assert torch.equal(loaded(x, t, pooled=g), ema(x, t, pooled=g))
    with pytest.raises(FileExistsError, match="unet1d already exists"):
        convert_diffusion_policy(path, out)
    # a failed conversion leaves no folder and no temporary behind
    with pytest.raises(KeyError, match="no keys start with 'unet.'"):
        convert_diffusion_policy(path, tmp_path / "other", prefix="unet.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "latest.ckpt"]
    assert [p.name for p in (tmp_path / "converted").iterdir()] == ["unet1d"]


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    plain = UNet1D(**SMALL, **XATTN)
    plain.load_state_dict(_perturbed_state(plain))
    checkpointed = UNet1D(**SMALL, **XATTN)
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.enable_gradient_checkpointing()
    assert checkpointed.is_gradient_checkpointing
    calls = []
    checkpointed.mid_modules[0].register_forward_pre_hook(lambda *_: calls.append(1))
    x, t, ctx = torch.randn(3, 8, 2), torch.tensor([0, 40, 99]), _ctx(pooled=torch.randn(3, 10))
    results = []
    for model in (plain, checkpointed):
        sample = x.clone().requires_grad_(True)
        out = model(sample, t, ctx)
        (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
        results.append((out.detach(), sample.grad, {n: p.grad for n, p in model.named_parameters()}))
    assert len(calls) == 2, "the block runs again in the backward pass"
    (out_a, dx_a, grads_a), (out_b, dx_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
    torch.testing.assert_close(dx_b, dx_a)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], msg=name)
