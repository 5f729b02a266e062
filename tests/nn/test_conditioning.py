"""FiLM, timestep embeddings and residual blocks."""

import pytest
import torch

from mmx import FiLM, ResBlock1D, ResBlock2D, SinusoidalEmbedding, timestep_embedding


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize("dim", [32, 33])
def test_timestep_embedding_matches_diffusers(flip, dim):
    from diffusers.models.embeddings import get_timestep_embedding

    t = torch.tensor([0, 1, 17, 999])
    want = get_timestep_embedding(t, dim, flip_sin_to_cos=flip, downscale_freq_shift=1)
    torch.testing.assert_close(timestep_embedding(t, dim, flip_sin_to_cos=flip), want)
    assert SinusoidalEmbedding(dim, flip_sin_to_cos=flip)(t).shape == (4, dim)


def test_film_from_a_vector_scales_and_shifts_every_position():
    torch.manual_seed(0)
    film = FiLM(6, 4)
    x = torch.randn(2, 4, 3, 5)
    cond = torch.randn(2, 6)
    params = film[1](torch.nn.functional.mish(cond))
    scale, shift = params[:, :4, None, None], params[:, 4:, None, None]
    torch.testing.assert_close(film(x, cond), x * scale + shift)


def test_film_per_time_step_and_shift_only():
    torch.manual_seed(0)
    film = FiLM(6, 4, predict_scale=False, activation=False)
    x = torch.randn(2, 4, 7)
    cond = torch.randn(2, 7, 6)
    out = film(x, cond)
    want = x + film[1](cond).transpose(1, 2)
    torch.testing.assert_close(out, want)
    with pytest.raises(ValueError, match="T = cond's 7 steps"):
        film(torch.randn(2, 4, 8), cond)
    with pytest.raises(ValueError, match="cond_dim=6"):
        film(x, torch.randn(2, 5))


def test_film_with_scale_offset_and_zero_weights_is_identity():
    film = FiLM(6, 4, scale_offset=1.0)
    torch.nn.init.zeros_(film[1].weight)
    torch.nn.init.zeros_(film[1].bias)
    x = torch.randn(2, 4, 9)
    torch.testing.assert_close(film(x, torch.randn(2, 6)), x)


def test_resblock1d_has_diffusion_policy_keys_and_shapes(dp_reference_keys):
    """The first down block of the published ConditionalUnet1D (input_dim=2, down_dims[0]=32, cond 42)."""
    rows = [line.split("\t") for line in dp_reference_keys.read_text().splitlines() if not line.startswith("#")]
    prefix = "down_modules.0.0."
    want = {k[len(prefix) :]: eval(shape) for k, shape in rows if k.startswith(prefix)}
    block = ResBlock1D(2, 32, cond_dim=42, kernel_size=5, n_groups=8, cond_predict_scale=True)
    got = {k: tuple(v.shape) for k, v in block.state_dict().items()}
    assert got == want


def test_resblock1d_forward_and_conditioning_matter():
    torch.manual_seed(0)
    block = ResBlock1D(3, 16, cond_dim=10, kernel_size=5, cond_predict_scale=True)
    x = torch.randn(4, 3, 12)
    out = block(x, torch.randn(4, 10))
    assert out.shape == (4, 16, 12)
    assert not torch.allclose(out, block(x, torch.randn(4, 10)))
    assert block(x, torch.randn(4, 12, 10)).shape == (4, 16, 12)  # one condition per step
    with pytest.raises(ValueError, match=r"C=3"):
        block(torch.randn(4, 2, 12), torch.randn(4, 10))


@pytest.mark.parametrize("film", ["shift", "scale_shift"])
def test_resblock2d_starts_as_its_skip_path_and_uses_the_embedding(film):
    torch.manual_seed(0)
    block = ResBlock2D(16, 32, emb_dim=8, film=film)
    x = torch.randn(2, 16, 6, 10)
    emb = torch.randn(2, 8)
    torch.testing.assert_close(block(x, emb), block.skip(x))
    torch.nn.init.normal_(block.conv2.weight, std=0.1)
    out = block(x, emb)
    assert out.shape == (2, 32, 6, 10)
    assert not torch.allclose(out, block(x, torch.randn(2, 8)))


def test_resblock2d_errors():
    block = ResBlock2D(16, emb_dim=8)
    with pytest.raises(ValueError, match="emb exactly"):
        block(torch.randn(1, 16, 4, 4))
    with pytest.raises(ValueError, match=r"C=16"):
        block(torch.randn(1, 8, 4, 4), torch.randn(1, 8))
    with pytest.raises(ValueError, match="film must be"):
        ResBlock2D(16, film="scale")
