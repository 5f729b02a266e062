"""The contract every model registered in MODELS keeps: its output shape, the same output for the same
seed, a save/load round trip that changes nothing, and padding that changes nothing.

A model registered without a case here fails ``test_every_registered_model_has_a_case``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from mmx import Context
from mmx.models import MODELS


@dataclass
class Case:
    """How to build a tiny model of one registered name and feed it: ``inputs(g)`` gives the positional
    arguments, ``pad(args)`` the same arguments with every padding position (mask False) changed, and
    ``real(args)`` (when the padding is in the model's own sequence) which outputs must not change."""

    kwargs: dict[str, Any]
    inputs: Callable[[torch.Generator], tuple]
    pad: Callable[[tuple], tuple]
    shape: tuple[int, ...]
    real: Callable[[tuple], torch.Tensor] | None = None


def _tokens(g: torch.Generator, b: int = 2, s: int = 5, d: int = 12, pooled: int | None = None) -> Context:
    mask = torch.ones(b, s, dtype=torch.bool)
    mask[0, 3:] = False  # sample 0 has two padding tokens
    return Context(
        tokens=torch.randn(b, s, d, generator=g),
        mask=mask,
        pooled=None if pooled is None else torch.randn(b, pooled, generator=g),
    )


def _pad_context(args: tuple, at: int = 2) -> tuple:
    """``args`` with the padding tokens of the Context at position ``at`` set to huge values."""
    ctx = args[at]
    tokens = torch.where(ctx.mask[..., None], ctx.tokens, torch.full_like(ctx.tokens, 1e3))
    return (*args[:at], Context(tokens=tokens, mask=ctx.mask, pooled=ctx.pooled), *args[at + 1 :])


def _ids(g: torch.Generator, b: int = 2, t: int = 4, vocab: int = 20) -> torch.Tensor:
    return torch.randint(3, vocab, (b, t), generator=g)


def _pad_ids(args: tuple, at: int, mask_at: int) -> tuple:
    """``args`` with the ids at padding positions (``args[mask_at]`` False) replaced by other ids."""
    ids, mask = args[at], args[mask_at]
    changed = torch.where(mask, ids, (ids + 7) % 17 + 3)
    return (*args[:at], changed, *args[at + 1 :])


def _id_mask() -> torch.Tensor:
    mask = torch.ones(2, 4, dtype=torch.bool)
    mask[1, 2:] = False
    return mask


UNET2D = dict(channels=(16, 32), layers_per_block=1, attention_levels=(False, True), context_dim=12, norm_groups=8)
CASES: dict[str, Case] = {
    "unet2d": Case(
        dict(UNET2D, attention={"heads": 2, "dim_head": 8}),
        lambda g: (torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 500]), _tokens(g)),
        _pad_context,
        (2, 3, 8, 8),
    ),
    "diffusers_unet2d": Case(
        dict(UNET2D, attention={"heads": 2}, sample_size=8),
        lambda g: (torch.randn(2, 3, 8, 8, generator=g), torch.tensor([10, 500]), _tokens(g)),
        _pad_context,
        (2, 3, 8, 8),
    ),
    "unet1d": Case(
        dict(
            input_dim=2,
            global_cond_dim=6,
            diffusion_step_embed_dim=16,
            down_dims=(16, 32),
            kernel_size=3,
            context_dim=12,
            heads=2,
            dim_head=8,
        ),
        lambda g: (torch.randn(2, 8, 2, generator=g), torch.tensor([3, 40]), _tokens(g, pooled=6)),
        _pad_context,
        (2, 8, 2),
    ),
    "grounding": Case(
        dict(context_dim=12, heads=2, dim_head=8, depth=1, input_size=32),
        lambda g: (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, _tokens(g)),
        lambda args: _pad_context(args, at=1),
        (2, 1, 32, 32),
    ),
    "seq2seq": Case(
        dict(
            src_vocab_size=20, tgt_vocab_size=20, d_model=16, heads=2, encoder_layers=1, decoder_layers=1, dropout=0.0
        ),
        lambda g: (_ids(g, t=4), _ids(g, t=3), _id_mask()),
        lambda args: _pad_ids(args, at=0, mask_at=2),
        (2, 3, 20),
    ),
    "captioner": Case(
        dict(vocab_size=20, d_model=16, heads=2, decoder_layers=1, dropout=0.0, input_size=32),
        lambda g: (torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, _ids(g, t=4), _id_mask()),
        lambda args: _pad_ids(args, at=1, mask_at=2),
        (2, 4, 20),
        real=lambda args: args[2],
    ),
}


def _build(name: str, seed: int = 0) -> torch.nn.Module:
    """A tiny model, its zero-initialised layers (residual outputs start at zero) filled too, so every output
    depends on every input."""
    torch.manual_seed(seed)
    model = MODELS.build(name, **CASES[name].kwargs)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1 and not p.abs().any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def test_every_registered_model_has_a_case():
    assert sorted(CASES) == sorted(MODELS.names())


@pytest.mark.parametrize("name", sorted(CASES))
def test_output_shape_and_the_same_output_for_the_same_seed(name):
    case = CASES[name]
    args = case.inputs(torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = _build(name)(*args)
        assert tuple(out.shape) == case.shape and torch.isfinite(out).all()
        assert torch.equal(_build(name)(*args), out), "one seed, one model"
        assert not torch.equal(_build(name, seed=5)(*args), out), "another seed, another model"


@pytest.mark.parametrize("name", sorted(CASES))
def test_save_and_load_give_the_same_outputs(name, tmp_path):
    model = _build(name)
    args = CASES[name].inputs(torch.Generator().manual_seed(0))
    model.save_pretrained(str(tmp_path / name))
    loaded = type(model).from_pretrained(str(tmp_path / name)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(*args), model(*args), atol=0, rtol=0)


@pytest.mark.parametrize("name", sorted(CASES))
def test_padding_changes_nothing(name):
    case = CASES[name]
    model = _build(name)
    args = case.inputs(torch.Generator().manual_seed(0))
    padded = case.pad(args)
    assert any(not (isinstance(a, torch.Tensor) and torch.equal(a, b)) for a, b in zip(args, padded)), (
        "pad changes args"
    )
    with torch.no_grad():
        out, again = model(*args), model(*padded)
    if case.real is not None:  # padded positions of the model's own sequence: the real ones must not change
        out, again = out[case.real(args)], again[case.real(args)]
    torch.testing.assert_close(again, out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_blocks_fsdp_keeps_whole_are_in_the_model(name):
    """``_no_split_modules`` names the blocks Accelerate's FSDP (TRANSFORMER_BASED_WRAP) shards one by one:
    a name the model does not hold would leave that block unwrapped, and the whole model one FSDP unit."""
    model = _build(name)
    held = {type(m).__name__ for m in model.modules()}
    assert model._no_split_modules and set(model._no_split_modules) <= held, (model._no_split_modules, held)
