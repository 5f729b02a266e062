"""The policy recipe: a diffusion policy trained on demonstrations, validated by rollouts.

Data are a Diffusion Policy replay buffer: a zarr store (``data.path``, e.g. one of its published
data sets) or scripted demonstrations of a built-in simulator (``data.env``). A run folder holds
``config.yaml`` (complete: observation widths and the action width are filled in from the data),
``model/policy.safetensors`` (EMA weights incl. the fitted normaliser), ``checkpoints/``,
``logs/``, ``samples/`` (rollout pictures) and ``metrics.jsonl``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmx.config import save_config
from mmx.recipes.policy.config import PolicyConfig

__all__ = ["PolicyTask", "build_policy", "load_buffer", "save_policy", "WEIGHTS"]

logger = logging.getLogger(__name__)

WEIGHTS = "policy.safetensors"
CONDITIONING = ("film", "cross_attention", "both")


def _data_keys(cfg: PolicyConfig) -> list[str]:
    """The observation keys, then the attention masks when they supervise training."""
    return [*cfg.obs, cfg.attention_mask_key] if _attention_losses(cfg) else list(cfg.obs)


def _attention_losses(cfg: PolicyConfig) -> list:
    """The config's attention losses with a weight above 0 (a policy can feed ``mask_kl``)."""
    from mmx.attnmap.losses import build_attention_losses

    return [term for term in build_attention_losses(cfg.attention_losses, ("mask_kl",), "policy") if term.weight > 0]


def _pad_after(cfg: PolicyConfig) -> int:
    """The training windows' ``pad_after``, checked: ``cfg.pad_after`` or Diffusion Policy's ``n_action_steps - 1``."""
    pad_after = cfg.n_action_steps - 1 if cfg.pad_after is None else cfg.pad_after
    if not 0 <= pad_after <= cfg.horizon - cfg.n_obs_steps:
        raise ValueError(
            f"pad_after must be in [0, horizon - n_obs_steps = {cfg.horizon - cfg.n_obs_steps}] (or None: "
            f"n_action_steps - 1); got {cfg.pad_after}"
        )
    return pad_after


def load_buffer(cfg: PolicyConfig):
    """The replay buffer of a config: the zarr store at ``data.path`` or freshly collected demonstrations."""
    from mmx.data.envs import collect_demos
    from mmx.data.trajectory import ReplayBuffer

    d = cfg.data
    if d.path is not None:
        return ReplayBuffer.load(d.path, keys=[*_data_keys(cfg), d.action_key])
    if d.env is None:
        raise ValueError(
            "data.path and data.env are both empty: give a zarr replay buffer or a simulator to demonstrate"
        )
    logger.info("collecting %d scripted demonstrations of %r (seed %d)", d.episodes, d.env, d.seed)
    return ReplayBuffer.from_episodes(collect_demos(d.env, d.episodes, seed=d.seed))


def _complete(cfg: PolicyConfig, buffer: Any) -> None:
    """Fill in what the data decide: low-dim input widths and the action width."""
    d = cfg.data
    if d.action_key not in buffer.keys():
        raise KeyError(f"the data have no action key {d.action_key!r}; keys: {sorted(buffer.keys())}")
    action = buffer.data[d.action_key]
    if action.ndim != 2:
        raise ValueError(f"data[{d.action_key!r}] must be [steps, action_dim]; got shape {action.shape}")
    cfg.action_dim = int(action.shape[1])
    if _attention_losses(cfg) and cfg.attention_mask_key not in buffer.keys():
        raise KeyError(
            f"attention_losses need masks under attention_mask_key {cfg.attention_mask_key!r}, which the "
            f"data lack; keys: {sorted(buffer.keys())}"
        )
    for key, spec in cfg.obs.items():
        if key not in buffer.keys():
            raise KeyError(f"observation key {key!r} is not in the data; keys: {sorted(buffer.keys())}")
        if spec.get("kind") == "lowdim":
            values = buffer.data[key]
            if values.ndim != 2:
                raise ValueError(f"low-dim observation {key!r} must be [steps, dim]; got shape {values.shape}")
            spec["in_dim"] = int(values.shape[1])


def build_policy(cfg: PolicyConfig, buffer: Any | None = None):
    """The DiffusionPolicy of a (complete) config; with ``buffer`` the normaliser is fitted on it."""
    from mmx.diffusion import make_scheduler
    from mmx.diffusion.policy import DiffusionPolicy, LinearNormalizer
    from mmx.encoders.observation import ObservationEncoder
    from mmx.models import UNet1D

    m = cfg.model
    if m.conditioning not in CONDITIONING:
        raise ValueError(f"model.conditioning must be one of {CONDITIONING}; got {m.conditioning!r}")
    if buffer is not None:
        _complete(cfg, buffer)
    if cfg.action_dim is None:
        raise ValueError("action_dim is unknown: build the policy from data, or from a saved run's config.yaml")
    film = m.conditioning in ("film", "both")
    attend = m.conditioning in ("cross_attention", "both")
    _pad_after(cfg)  # a bad value fails here, before any data are loaded into a dataset
    losses = _attention_losses(cfg)
    if losses and not attend:
        raise ValueError(
            f"attention_losses {cfg.attention_losses} supervise cross-attention, which "
            f"model.conditioning={m.conditioning!r} does not have; use cross_attention or both"
        )
    encoder = ObservationEncoder(
        cfg.obs,
        dim=m.dim,
        n_obs_steps=cfg.n_obs_steps,
        tokens=attend,
        fusion_layers=m.fusion_layers,
        fusion_heads=m.heads,
    )
    unet = UNet1D(
        input_dim=cfg.action_dim,
        global_cond_dim=encoder.pooled_dim if film else None,
        diffusion_step_embed_dim=m.diffusion_step_embed_dim,
        down_dims=tuple(m.down_dims),
        kernel_size=m.kernel_size,
        n_groups=m.n_groups,
        cond_predict_scale=m.cond_predict_scale,
        context_dim=m.dim if attend else None,
        heads=m.heads,
        dim_head=m.dim_head,
        attn_ff_mult=m.attn_ff_mult,
    )
    unet.check_horizon(cfg.horizon)
    lowdim = tuple(k for k, s in cfg.obs.items() if s.get("kind") == "lowdim")
    images = tuple(k for k, s in cfg.obs.items() if s.get("kind") == "rgb")
    normalizer = LinearNormalizer({"action": cfg.action_dim, **{k: cfg.obs[k]["in_dim"] for k in lowdim}})
    if buffer is not None:
        normalizer.fit({"action": buffer.data[cfg.data.action_key], **{k: buffer.data[k] for k in lowdim}})
    d = cfg.diffusion
    scheduler = make_scheduler(
        "ddpm",
        num_train_timesteps=d.num_train_timesteps,
        beta_schedule=d.beta_schedule,
        prediction_type=d.prediction_type,
        clip_sample=True,
    )
    return DiffusionPolicy(
        encoder,
        unet,
        normalizer,
        scheduler,
        cfg.horizon,
        cfg.n_obs_steps,
        cfg.n_action_steps,
        cfg.action_dim,
        lowdim,
        images,
        d.sampler,
        d.sample_steps,
        losses,
        cfg.attention_mask_key,
        cfg.attention_image_key,
    )


class _Sequences(torch.utils.data.Dataset):
    """Training items: an action chunk of ``horizon`` steps and the first ``n_obs_steps`` observations."""

    def __init__(self, cfg: PolicyConfig, buffer: Any) -> None:
        from mmx.data.trajectory import TrajectoryDataset

        self.action_key = cfg.data.action_key
        obs = _data_keys(cfg)
        self.data = TrajectoryDataset(
            buffer,
            cfg.horizon,
            pad_before=cfg.n_obs_steps - 1,
            pad_after=_pad_after(cfg),
            keys=[*obs, self.action_key],
            key_first_k={k: cfg.n_obs_steps for k in obs},
        )

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.data[index]
        item["action"] = item.pop(self.action_key)
        return item


def collate_sequences(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Numeric keys -> tensors ``[B, T, ...]``; text keys -> one string per item (its latest instruction)."""
    from mmx.data.trajectory import collate_trajectories

    batch = collate_trajectories(items)
    for key, value in batch.items():
        if isinstance(value, np.ndarray):
            batch[key] = [str(row[-1]) for row in value]
    return batch


class PolicyTask:
    """The trainer's view of a policy run (see :class:`mmx.train.trainer.Task`)."""

    def __init__(self, cfg: PolicyConfig, run_dir: str | Path) -> None:
        from accelerate.utils import set_seed

        set_seed(cfg.train.seed)  # first: the model built below starts from weights that follow train.seed
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.buffer = load_buffer(cfg)
        self.model = build_policy(cfg, self.buffer)
        logger.info(
            "policy: %d episodes, %d steps; %s conditioning, %.2fM trainable parameters",
            self.buffer.n_episodes,
            self.buffer.n_steps,
            cfg.model.conditioning,
            sum(p.numel() for p in self.model.parameters() if p.requires_grad) / 1e6,
        )

    def train_dataset(self) -> torch.utils.data.Dataset:
        return _Sequences(self.cfg, self.buffer)

    def collate(self, items: list[Any]) -> Any:
        return collate_sequences(items)

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        return model(batch, generator)

    def validate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        from mmx.eval.rollout import evaluate_policy
        from mmx.train.visual import save_rollouts

        e = self.cfg.eval
        if e.val_episodes < 1 or self.cfg.data.env is None:  # no simulator (e.g. a published data set): no rollouts
            return {}
        result = evaluate_policy(model, self.cfg.data.env, e.val_episodes, e.seed, e.batch_size, render=e.render)
        save_rollouts(result, out_dir / f"step_{step:07d}.png", title=f"step {step}: {self.cfg.data.env} rollouts")
        return result.summary()

    def save_model(self, model: nn.Module, out_dir: Path) -> None:
        save_policy(model, out_dir)
        save_config(self.cfg, self.run_dir / "config.yaml")


def save_policy(policy: nn.Module, out_dir: str | Path) -> Path:
    """Write the policy's state_dict as ``out_dir/policy.safetensors`` (temporary file, then rename)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / WEIGHTS
    tmp = path.with_suffix(".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in policy.state_dict().items()}
    save_file(state, str(tmp), metadata={"format": "pt", "mmx": "policy"})
    os.replace(tmp, path)
    return path
