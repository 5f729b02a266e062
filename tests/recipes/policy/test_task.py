"""The policy recipe: demonstrations or a zarr replay buffer -> trained run folder -> rebuilt policy."""

from __future__ import annotations

import pytest
import torch

from mmx.config import load_config
from mmx.recipes import load_run
from mmx.recipes.policy import PolicyConfig, PolicyTask
from mmx.train import train


def _tiny(**overrides) -> PolicyConfig:
    cfg = load_config("configs/policy_reach_tiny.yaml", PolicyConfig)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def test_run_folder_rebuilds_the_trained_policy(tmp_path):
    cfg = _tiny()
    cfg.train.ema = False  # the saved weights are then the trained ones, comparable with task.model
    task = PolicyTask(cfg, tmp_path)
    assert cfg.action_dim == 2 and cfg.obs["state"]["in_dim"] == 4  # filled in from the demonstrations
    result = train(task, cfg.train, tmp_path)
    assert result.step == cfg.train.max_steps
    assert (tmp_path / "samples" / f"step_{cfg.train.max_steps:07d}.png").is_file()  # rollout panels
    loaded = load_run(tmp_path)
    loaded_cfg, policy = loaded.config, loaded.model
    assert loaded_cfg.obs["state"]["in_dim"] == 4
    obs = {"state": torch.rand(3, 2, 4)}
    task.model.eval()
    want = task.model.predict_action(obs, generator=torch.Generator().manual_seed(0))["action_pred"]
    got = policy.predict_action(obs, generator=torch.Generator().manual_seed(0))["action_pred"]
    assert torch.allclose(got, want, atol=1e-6)  # weights and the fitted normaliser were saved
    assert torch.equal(policy.normalizer.action_max, task.model.normalizer.action_max)


def test_trains_from_a_diffusion_policy_zarr_store(tmp_path):
    from mmx.data import ReplayBuffer, collect_demos

    store = tmp_path / "demos.zarr"
    ReplayBuffer.from_episodes(collect_demos("reach", 6, seed=3)).save(store)
    cfg = _tiny()
    cfg.data.path, cfg.data.env = str(store), None  # a published data set: no simulator, so no rollouts
    cfg.train.max_steps = 4
    task = PolicyTask(cfg, tmp_path / "run")
    assert task.buffer.n_episodes == 6
    result = train(task, cfg.train, tmp_path / "run")
    assert result.step == 4 and result.metrics == {}
    assert load_run(tmp_path / "run").config.data.path == str(store)


def test_data_errors_name_the_key(tmp_path):
    cfg = _tiny()
    cfg.obs = {"joints": {"kind": "lowdim"}}
    with pytest.raises(KeyError, match="'joints' is not in the data"):
        PolicyTask(cfg, tmp_path)
    cfg = _tiny()
    cfg.horizon = 6  # two levels halve the horizon once: 6 is fine; three levels would not be
    cfg.model.down_dims = (16, 32, 64)
    with pytest.raises(ValueError, match="T=6.*nearest valid horizons: 4 or 8"):
        PolicyTask(cfg, tmp_path)


def test_attention_losses_config(tmp_path):
    cfg = _tiny(attention_losses=[{"name": "mask_kl", "weight": 1.0}])  # reach demonstrations record no target masks
    with pytest.raises(KeyError, match="attention_mask_key 'target_mask'"):
        PolicyTask(cfg, tmp_path)
    cfg = load_config("configs/policy_targets_tiny.yaml", PolicyConfig)
    cfg.attention_losses, cfg.model.conditioning = [{"name": "mask_kl", "weight": 1.0}], "film"
    with pytest.raises(ValueError, match="conditioning='film'"):
        PolicyTask(cfg, tmp_path)
    cfg.model.conditioning = "both"
    cfg.train.max_steps, cfg.eval.val_episodes = 2, 0
    task = PolicyTask(cfg, tmp_path / "run")
    item = task.train_dataset()[0]
    assert item["target_mask"].shape == (cfg.n_obs_steps, 32, 32)  # the masks of the observation frames
    assert train(task, cfg.train, tmp_path / "run").step == 2
    cfg.attention_losses = [{"name": "coverage", "weight": 1.0}]  # a loss a policy cannot feed
    with pytest.raises(ValueError, match="the policy recipe takes mask_kl; got .*coverage"):
        PolicyTask(cfg, tmp_path)


def test_pad_after_lets_windows_start_at_every_step(tmp_path):
    from mmx.recipes.policy.task import _Sequences

    cfg = _tiny()
    task = PolicyTask(cfg, tmp_path)
    default = len(_Sequences(cfg, task.buffer))  # Diffusion Policy: pad_after = n_action_steps - 1
    cfg.pad_after = cfg.horizon - cfg.n_obs_steps
    every = _Sequences(cfg, task.buffer)
    steps = task.buffer.n_steps
    assert len(every) == steps and default < steps  # one window whose current observation is each step
    last = every[len(every) - 1]  # the window whose current observation is an episode's last step
    assert (last["action"][cfg.n_obs_steps - 1 :] == last["action"][-1]).all()  # the last action, repeated
    cfg.pad_after = cfg.horizon
    with pytest.raises(ValueError, match=r"pad_after must be in \[0, horizon - n_obs_steps = 6\]"):
        PolicyTask(cfg, tmp_path / "bad")
