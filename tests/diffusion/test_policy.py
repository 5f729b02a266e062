"""Diffusion policies: normaliser, observation encoder, loss/sampling, attention over observations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmx.attnmap.losses import MaskKL
from mmx.diffusion import DiffusionPolicy, LinearNormalizer, make_scheduler
from mmx.encoders import ObservationEncoder
from mmx.models import UNet1D

# ----------------------------------------------------------------------------------- normaliser


def test_normalizer_maps_data_to_unit_range_and_back():
    data = np.stack([np.linspace(-3, 5, 50), np.linspace(10, 11, 50), np.full(50, 7.0)], 1).astype(np.float32)
    norm = LinearNormalizer().fit({"action": data})
    x = torch.from_numpy(data)
    y = norm.normalize("action", x)
    assert torch.allclose(y[:, :2].min(0).values, torch.tensor([-1.0, -1.0]))
    assert torch.allclose(y[:, :2].max(0).values, torch.tensor([1.0, 1.0]))
    assert torch.all(y[:, 2] == 0)  # a constant dimension maps to 0 ...
    assert torch.allclose(norm.unnormalize("action", y), x, atol=1e-5)  # ... and back to its constant


def test_normalizer_travels_in_the_state_dict():
    fitted = LinearNormalizer().fit({"action": np.random.rand(20, 3), "state": np.random.rand(20, 4) * 9})
    fresh = LinearNormalizer({"action": 3, "state": 4})
    fresh.load_state_dict(fitted.state_dict())
    x = torch.rand(5, 4)
    assert torch.equal(fresh.normalize("state", x), fitted.normalize("state", x))
    late = LinearNormalizer()  # fields it never saw become buffers on load
    late.load_state_dict(fitted.state_dict())
    assert late.keys == ["action", "state"]


def test_normalizer_errors_name_the_field():
    norm = LinearNormalizer().fit({"action": np.zeros((3, 2))})
    with pytest.raises(KeyError, match="'state'.*fitted: \\['action'\\]"):
        norm.normalize("state", torch.zeros(1, 2))
    with pytest.raises(ValueError, match="NaN"):
        LinearNormalizer().fit({"x": np.array([[np.nan, 1.0]])})


# ------------------------------------------------------------------------------ observation encoder


def _obs(b=3, steps=2, texts=None):
    obs = {"state": torch.randn(b, steps, 4), "image": torch.rand(b, steps, 3, 32, 32)}
    if texts is not None:
        obs["instruction"] = texts
    return obs


def test_observation_encoder_joins_sources_with_segments_and_word_spans():
    enc = ObservationEncoder(
        {
            "state": {"kind": "lowdim", "in_dim": 4},
            "image": {"kind": "rgb", "keypoints": 4},
            "instruction": {"kind": "text"},
        },
        dim=32,
        n_obs_steps=2,
    )
    texts = ["go to the blue square", "reach the red circle", "move"]
    ctx, segments = enc.encode(_obs(texts=texts))
    names = [(s.name, s.start, s.end, s.grid) for s in segments]
    assert names[:2] == [("state", 0, 2, (2,)), ("image", 2, 34, (2, 4, 4))]
    assert names[2][0] == "instruction" and names[2][1] == 34
    assert ctx.tokens.shape[:2] == ctx.mask.shape and ctx.tokens.shape[-1] == 32
    assert ctx.pooled.shape == (3, enc.pooled_dim) == (3, 2 * 4 + 2 * 4 * 2 + 384)
    # word spans point at the instruction's tokens inside the joined sequence
    spans = {w.word: (w.start, w.end) for w in ctx.words[0]}
    assert all(34 <= s < e <= segments[2].end for s, e in spans.values())
    assert ctx.mask[2].sum() < ctx.mask[0].sum()  # the one-word instruction is padded, and masked


def test_film_only_encoder_has_no_token_parameters():
    spec = {"state": {"kind": "lowdim", "in_dim": 4}}
    with_tokens = ObservationEncoder(spec, dim=16)
    film_only = ObservationEncoder(spec, dim=16, tokens=False)
    assert sum(p.numel() for p in with_tokens.parameters()) > 0
    assert list(film_only.parameters()) == []
    ctx = film_only(_obs())
    assert ctx.tokens.shape == (3, 0, 16) and torch.equal(ctx.pooled, _obs()["state"].flatten(1)) is False
    assert ctx.pooled.shape == (3, 8)


def test_observation_encoder_errors():
    enc = ObservationEncoder({"state": {"kind": "lowdim", "in_dim": 4}}, dim=16)
    with pytest.raises(KeyError, match="missing \\['state'\\]"):
        enc({"image": torch.zeros(1)})
    with pytest.raises(ValueError, match="\\[B, 2, 4\\]"):
        enc({"state": torch.zeros(2, 3, 4)})
    with pytest.raises(ValueError, match="kind 'depth' is not one of"):
        ObservationEncoder({"d": {"kind": "depth"}})
    with pytest.raises(ValueError, match="'state' \\(lowdim\\)"):
        ObservationEncoder({"state": {"kind": "lowdim", "in_dim": 4, "widht": 3}})


# -------------------------------------------------------------------------------------- policy


def _policy(conditioning="film", horizon=8, seed=0):
    torch.manual_seed(seed)
    attend = conditioning != "film"
    enc = ObservationEncoder({"state": {"kind": "lowdim", "in_dim": 2}}, dim=16, n_obs_steps=2, tokens=attend)
    unet = UNet1D(
        input_dim=2,
        global_cond_dim=enc.pooled_dim if conditioning != "cross_attention" else None,
        diffusion_step_embed_dim=16,
        down_dims=(16, 32),
        kernel_size=3,
        context_dim=16 if attend else None,
        heads=2,
        dim_head=8,
    )
    norm = LinearNormalizer({"action": 2, "state": 2})
    sched = make_scheduler("ddpm", num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    return DiffusionPolicy(
        enc, unet, norm, sched, horizon, 2, 4, 2, lowdim_keys=("state",), sampler="ddim", num_inference_steps=4
    )


def test_policy_checks_its_horizon_arguments():
    with pytest.raises(ValueError, match="n_action_steps=8"):
        DiffusionPolicy(None, None, None, None, horizon=8, n_obs_steps=2, n_action_steps=8, action_dim=2)
    with pytest.raises(ValueError, match="n_obs_steps=9"):
        DiffusionPolicy(None, None, None, None, horizon=8, n_obs_steps=9, n_action_steps=1, action_dim=2)


def test_predict_action_returns_the_chunk_from_the_current_step():
    policy = _policy().eval()
    out = policy.predict_action({"state": torch.randn(5, 2, 2)}, generator=torch.Generator().manual_seed(0))
    assert out["action_pred"].shape == (5, 8, 2)
    assert torch.equal(out["action"], out["action_pred"][:, 1:5])  # starts at n_obs_steps - 1
    again = policy.predict_action({"state": torch.randn(5, 2, 2)}, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(again["action_pred"], out["action_pred"])  # it reads the observation


@pytest.mark.parametrize("conditioning", ["film", "cross_attention"])
def test_tiny_policy_overfits_two_trajectories(conditioning):
    """Two observations, each with its own action chunk: the loss falls by 10x and samples land on the right chunk."""
    policy = _policy(conditioning, seed=1)
    t = torch.linspace(0, 1, 8)
    actions = torch.stack([torch.stack([t, t], -1), torch.stack([t, -t], -1)])  # (2, 8, 2): up vs down
    state = torch.tensor([[[0.0, 1.0]] * 2, [[0.0, -1.0]] * 2])  # (2, 2, 2)
    policy.normalizer.fit({"action": actions.reshape(-1, 2), "state": state.reshape(-1, 2)})
    batch = {"action": actions.repeat(32, 1, 1), "state": state.repeat(32, 1, 1)}
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(300):
        loss = policy(batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) / 10
    policy.eval()
    pred = policy.predict_action({"state": state}, generator=torch.Generator().manual_seed(1), num_inference_steps=16)
    assert torch.allclose(pred["action_pred"], actions, atol=0.25), (pred["action_pred"] - actions).abs().max()


def test_policy_attention_rows_are_distributions_over_observation_tokens():
    from mmx.attnmap import attend_policy

    policy = _policy("both").eval()
    out, att = attend_policy(policy, {"state": torch.randn(3, 2, 2)}, torch.Generator().manual_seed(0))
    assert att.weights.shape == (3, 8, 2)  # (B, horizon, S = 2 state tokens)
    assert torch.allclose(att.weights.sum(-1), torch.ones(3, 8), atol=1e-5)
    labels, groups = att.groups(0)
    assert labels == ["state t-1", "state t"] and torch.allclose(groups.sum(-1), torch.ones(8), atol=1e-5)
    with pytest.raises(ValueError, match="no cross-attention"):
        attend_policy(_policy("film"), {"state": torch.randn(1, 2, 2)})


def test_fusion_lets_observation_tokens_read_the_instruction_and_ignores_padding():
    spec = {"state": {"kind": "lowdim", "in_dim": 4}, "instruction": {"kind": "text"}}
    torch.manual_seed(0)
    plain, fused = ObservationEncoder(spec, dim=32), ObservationEncoder(spec, dim=32, fusion_layers=2)
    state = torch.randn(2, 2, 4)
    a = {"state": state, "instruction": ["go to the blue square", "reach the red circle"]}
    b = {"state": state, "instruction": ["go to the green circle", "reach the red circle and stay there"]}
    # without fusion the state tokens do not depend on the words; with it they do
    assert torch.equal(plain(a).tokens[0, :2], plain(b).tokens[0, :2])
    assert not torch.allclose(fused(a).tokens[0, :2], fused(b).tokens[0, :2])
    # a longer instruction in another sample only pads sample 0: its tokens are unchanged
    c = {"state": state, "instruction": ["go to the blue square", "x " * 20]}
    n = fused(a).tokens.shape[1]
    assert torch.allclose(fused(a).tokens[0], fused(c).tokens[0, :n], atol=1e-5)


def _image_policy(weight):
    torch.manual_seed(0)
    spec = {"state": {"kind": "lowdim", "in_dim": 2}, "image": {"kind": "rgb", "stage": "layer1", "keypoints": 4}}
    enc = ObservationEncoder(spec, dim=16, n_obs_steps=2)
    unet = UNet1D(
        input_dim=2, diffusion_step_embed_dim=16, down_dims=(16, 32), kernel_size=3, context_dim=16, heads=2, dim_head=8
    )
    sched = make_scheduler("ddpm", num_train_timesteps=50, beta_schedule="squaredcos_cap_v2", clip_sample=True)
    return DiffusionPolicy(
        enc,
        unet,
        LinearNormalizer({"action": 2, "state": 2}),
        sched,
        8,
        2,
        4,
        2,
        lowdim_keys=("state",),
        image_keys=("image",),
        num_inference_steps=4,
        attention_losses=[MaskKL(weight)],
    )


def _masked_batch(b=8):
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(b, 2, 32, 32, dtype=torch.bool)
    for i in range(b):  # an 8x8-pixel square somewhere on a 4-pixel grid: two by two 8x8-grid regions
        r, c = (torch.randint(0, 7, (2,), generator=g) * 4).tolist()
        masks[i, :, r : r + 8, c : c + 8] = True
    batch = {
        "state": torch.randn(b, 2, 2, generator=g),
        "image": torch.rand(b, 2, 3, 32, 32, generator=g),
        "action": torch.rand(b, 8, 2, generator=g) * 2 - 1,
        "target_mask": masks,
    }
    return batch, masks


def _mass_on_mask(policy, batch, masks):
    """Share of the chunk's attention over the last frame's 8x8 image regions that lies on the mask (recorder path)."""
    from mmx.attnmap import attend_policy

    obs = {k: v for k, v in batch.items() if k in ("state", "image")}
    _, att = attend_policy(policy.eval(), obs, torch.Generator().manual_seed(0))
    image = next(s for s in att.segments if s.name == "image")
    regions = att.weights[:, :, image.start + 64 : image.end].mean(1)  # (B, 64): the current frame
    on = torch.nn.functional.adaptive_avg_pool2d(masks[:, -1].float(), (8, 8)).flatten(1) > 0
    return ((regions * on).sum(-1) / regions.sum(-1)).mean().item()


def test_the_mask_kl_loss_moves_the_chunks_attention_onto_the_mask():
    """A few steps on the supervised loss put most of the action steps' image attention on the masked regions."""
    policy = _image_policy(1.0)
    batch, masks = _masked_batch()
    g = torch.Generator().manual_seed(0)
    plain = _image_policy(0.0)
    plain.load_state_dict(policy.state_dict())
    supervised = policy(batch, torch.Generator().manual_seed(1))
    assert supervised > plain(batch, torch.Generator().manual_seed(1)) + 0.5  # same noise: the KL term is added
    before = _mass_on_mask(policy, batch, masks)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    for _ in range(40):
        policy.train()
        loss = policy(batch, g)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = _mass_on_mask(policy, batch, masks)
    assert before < 0.2 and after > 0.5, (before, after)


def test_attention_loss_errors():
    policy = _image_policy(1.0)
    batch, _ = _masked_batch(2)
    with pytest.raises(KeyError, match="target_mask"):
        policy({k: v for k, v in batch.items() if k != "target_mask"})
    with pytest.raises(ValueError, match=r"\[B, To=2, H, W\]"):
        policy({**batch, "target_mask": batch["target_mask"][:, 0]})
    with pytest.raises(ValueError, match="weight must be a number >= 0"):
        MaskKL(-1.0)
    with pytest.raises(ValueError, match="attention_image_key"):
        DiffusionPolicy(None, None, None, None, 8, 2, 4, 2, image_keys=("a", "b"), attention_losses=[MaskKL(1.0)])
