"""Diffusion glue: loss targets, min-SNR weights, condition dropout, guided sampling with any scheduler."""

import pytest
import torch

from mmx import Context
from mmx.diffusion import (
    denoising_losses,
    diffusion_loss,
    drop_conditions,
    make_scheduler,
    pad_context,
    sample,
    sampler_from,
)


class Recorder(torch.nn.Module):
    """A fake denoiser that remembers its inputs and returns a fixed function of them."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.w = torch.nn.Parameter(torch.tensor(0.5))

    def forward(self, x, t, context):
        self.calls.append((x.clone(), t.clone(), context))
        return self.w * x + context.tokens.mean(dim=(1, 2))[:, None, None, None]


def _ctx(b=2, s=4, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Context(tokens=torch.randn(b, s, d, generator=g), mask=torch.ones(b, s, dtype=torch.bool))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_loss_uses_the_schedulers_target(prediction_type):
    scheduler = make_scheduler("ddpm", num_train_timesteps=100, prediction_type=prediction_type)
    model = Recorder()
    x0 = torch.randn(2, 1, 4, 4)
    g = torch.Generator().manual_seed(3)
    loss = diffusion_loss(model, x0, _ctx(), scheduler, generator=g)
    x_t, t, ctx = model.calls[0]
    g = torch.Generator().manual_seed(3)
    t_ref = torch.randint(0, 100, (2,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert torch.equal(t, t_ref)
    torch.testing.assert_close(x_t, scheduler.add_noise(x0, noise, t))
    target = {"epsilon": noise, "v_prediction": scheduler.get_velocity(x0, noise, t), "sample": x0}[prediction_type]
    pred = model.w * x_t + ctx.tokens.mean(dim=(1, 2))[:, None, None, None]
    torch.testing.assert_close(loss, ((pred - target) ** 2).mean())


@pytest.mark.parametrize("prediction_type", ["epsilon", "sample"])
def test_denoising_losses_at_fixed_timesteps_and_noise(prediction_type):
    scheduler = make_scheduler("ddpm", num_train_timesteps=100, prediction_type=prediction_type)
    model = Recorder()
    x0 = torch.randn(3, 1, 4, 4)
    losses = denoising_losses(model, x0, _ctx(b=3), scheduler, [10, 90], torch.Generator().manual_seed(5))
    assert losses.shape == (2, 3)
    assert [int(call[1][0]) for call in model.calls] == [10, 90] and all(call[1].numel() == 3 for call in model.calls)
    g = torch.Generator().manual_seed(5)
    for row, (x_t, t, ctx) in zip(losses, model.calls):
        noise = torch.randn(x0.shape, generator=g)  # the noise of each timestep, drawn in order
        torch.testing.assert_close(x_t, scheduler.add_noise(x0, noise, t))
        target = noise if prediction_type == "epsilon" else x0
        pred = model.w * x_t + ctx.tokens.mean(dim=(1, 2))[:, None, None, None]
        torch.testing.assert_close(row, ((pred - target) ** 2).flatten(1).mean(1))
    again = denoising_losses(model, x0, _ctx(b=3), scheduler, [10, 90], torch.Generator().manual_seed(5))
    assert torch.equal(losses, again)  # one seed, one number: comparable across validations
    with pytest.raises(ValueError, match=r"timesteps must be a non-empty list in 0 .. 99 .*got \[10, 100\]"):
        denoising_losses(model, x0, _ctx(b=3), scheduler, [10, 100])


def test_min_snr_weights_downweight_low_noise_steps():
    from diffusers.training_utils import compute_snr

    scheduler = make_scheduler("ddpm", num_train_timesteps=100)
    model = Recorder()
    x0 = torch.randn(2, 1, 4, 4)
    plain = diffusion_loss(model, x0, _ctx(), scheduler, generator=torch.Generator().manual_seed(3))
    weighted = diffusion_loss(
        model, x0, _ctx(), scheduler, min_snr_gamma=5.0, generator=torch.Generator().manual_seed(3)
    )
    t = model.calls[0][1]
    snr = compute_snr(scheduler, t)
    assert torch.all(torch.minimum(snr, torch.full_like(snr, 5.0)) / snr <= 1)
    assert weighted <= plain + 1e-6


def test_drop_conditions_replaces_rows_with_the_null_context():
    ctx, null = _ctx(b=64), _ctx(b=1, seed=9)
    dropped = drop_conditions(ctx, null, 0.5, torch.Generator().manual_seed(0))
    same = (dropped.tokens == ctx.tokens).all(dim=(1, 2))
    is_null = (dropped.tokens == null.tokens).all(dim=(1, 2))
    assert torch.all(same ^ is_null) and 15 < int(is_null.sum()) < 49
    assert drop_conditions(ctx, null, 0.0) is ctx


def test_guidance_scale_one_equals_the_conditional_prediction():
    scheduler = sampler_from(make_scheduler("ddpm", num_train_timesteps=100), "ddim")
    ctx, null = _ctx(), _ctx(b=1, s=2, seed=5)
    plain = sample(Recorder(), scheduler, ctx, (1, 4, 4), num_steps=4, generator=torch.Generator().manual_seed(0))
    model = Recorder()
    guided = sample(
        model,
        scheduler,
        ctx,
        (1, 4, 4),
        num_steps=4,
        guidance_scale=3.0,
        null_context=null,
        generator=torch.Generator().manual_seed(0),
    )
    assert not torch.allclose(plain, guided)
    # one batched call per step: conditional rows first, then the (padded) empty caption
    x, t, batch_ctx = model.calls[0]
    assert x.shape[0] == 4 and batch_ctx.tokens.shape == (4, 4, 3)
    assert batch_ctx.mask[2:, 2:].sum() == 0
    # with guidance 1.0 the null context is never used
    with_null = sample(
        Recorder(),
        scheduler,
        ctx,
        (1, 4, 4),
        num_steps=4,
        guidance_scale=1.0,
        null_context=null,
        generator=torch.Generator().manual_seed(0),
    )
    torch.testing.assert_close(with_null, plain)


def test_guidance_interval_guides_only_the_steps_inside_it():
    scheduler = sampler_from(make_scheduler("ddpm", num_train_timesteps=100), "ddim")
    ctx, null = _ctx(), _ctx(b=1, s=2, seed=5)

    def run(model, **kw):
        return sample(
            model,
            scheduler,
            ctx,
            (1, 4, 4),
            num_steps=4,
            guidance_scale=3.0,
            null_context=null,
            generator=torch.Generator().manual_seed(0),
            **kw,
        )

    everywhere, nowhere = run(Recorder()), run(Recorder(), guidance_interval=(200, 300))
    torch.testing.assert_close(run(Recorder(), guidance_interval=(0, 99)), everywhere)
    plain = sample(Recorder(), scheduler, ctx, (1, 4, 4), num_steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(nowhere, plain)
    model = Recorder()
    partly = run(model, guidance_interval=(0, 50))
    steps = [(int(t[0]), x.shape[0]) for x, t, _ in model.calls]
    assert [t for t, _ in steps] == [75, 50, 25, 0]
    assert [rows for _, rows in steps] == [2, 4, 4, 4], "outside the interval only the conditional rows run"
    assert not torch.allclose(partly, everywhere) and not torch.allclose(partly, plain)
    with pytest.raises(ValueError, match=r"guidance_interval must be \(low, high\).*got \(300, 200\)"):
        run(Recorder(), guidance_interval=(300, 200))


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++", "euler"])
def test_every_sampler_runs_with_callback_and_seed(name):
    train = make_scheduler("ddpm", num_train_timesteps=100, prediction_type="v_prediction")
    steps = []

    def run():
        return sample(
            Recorder(),
            sampler_from(train, name),
            _ctx(),
            (1, 4, 4),
            num_steps=5,
            guidance_scale=2.0,
            null_context=_ctx(b=1),
            generator=torch.Generator().manual_seed(1),
            callback=lambda i, t, x: steps.append(i),
        )

    a = run()
    assert steps == list(range(5)) and torch.isfinite(a).all()
    torch.testing.assert_close(run(), a)


def test_pad_context_and_errors():
    ctx = _ctx(s=3)
    padded = pad_context(ctx, 5)
    assert padded.tokens.shape == (2, 5, 3) and padded.mask[:, 3:].sum() == 0
    with pytest.raises(ValueError, match="down to 2"):
        pad_context(ctx, 2)
    with pytest.raises(ValueError, match="null_context"):
        sample(Recorder(), make_scheduler("ddim"), ctx, (1, 2, 2), guidance_scale=2.0)
    with pytest.raises(KeyError, match="valid names"):
        make_scheduler("heun2")


class Oracle(torch.nn.Module):
    """Knows the clean image: predicts the exact epsilon / v / x0 for any x_t (alpha-space schedulers)."""

    def __init__(self, x0, scheduler):
        super().__init__()
        self.x0, self.scheduler = x0, scheduler

    def forward(self, x, t, context):
        ab = self.scheduler.alphas_cumprod.to(x)[t.long()].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * self.x0) / (1 - ab).sqrt()
        kind = self.scheduler.config.prediction_type
        if kind == "epsilon":
            return eps
        if kind == "v_prediction":
            return ab.sqrt() * eps - (1 - ab).sqrt() * self.x0
        return self.x0.expand_as(x)


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm++"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_samplers_recover_the_image_an_oracle_denoiser_knows(name, prediction_type):
    """If the network were perfect, sampling must land on the clean image: checks the scheduler glue."""
    train = make_scheduler(
        "ddpm", num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type=prediction_type
    )
    x0 = torch.rand(1, 3, 4, 4) * 2 - 1
    scheduler = sampler_from(train, name)
    out = sample(
        Oracle(x0, scheduler), scheduler, _ctx(b=1), (3, 4, 4), num_steps=20, generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(out, x0, atol=0.05, rtol=0)


def test_composable_guidance_adds_one_term_per_component():
    scheduler = sampler_from(make_scheduler("ddpm", num_train_timesteps=100), "ddim")
    ctx, null = _ctx(), _ctx(b=1, s=4, seed=5)

    def run(scale, **kw):
        return sample(
            Recorder(),
            scheduler,
            ctx,
            (1, 4, 4),
            num_steps=4,
            guidance_scale=scale,
            null_context=null,
            generator=torch.Generator().manual_seed(0),
            **kw,
        )

    guided = run(3.0)
    other = _ctx(seed=9)
    parts = Context(tokens=torch.cat([other.tokens, ctx.tokens]), mask=torch.cat([other.mask, ctx.mask]))  # K=2, B=2
    # zero weights change nothing; a component equal to the prompt itself adds its weight to the scale
    torch.testing.assert_close(run(3.0, components=parts, component_weights=torch.zeros(2, 2)), guided)
    torch.testing.assert_close(
        run(3.0, components=parts, component_weights=torch.tensor([[0.0, 0.0], [2.0, 2.0]])), run(5.0)
    )
    model = Recorder()
    sample(
        model,
        scheduler,
        ctx,
        (1, 4, 4),
        num_steps=1,
        guidance_scale=3.0,
        null_context=null,
        components=parts,
        component_weights=torch.ones(2, 2),
    )
    assert model.calls[0][0].shape[0] == 2 * 2 + 2 * 2  # cond, uncond, then K*B component rows in one call
    with pytest.raises(ValueError, match="component_weights \\[K, B=2\\]"):
        run(3.0, components=parts, component_weights=torch.ones(2))
    with pytest.raises(ValueError, match="K\\*B = 6 rows"):
        run(3.0, components=parts, component_weights=torch.ones(3, 2))
