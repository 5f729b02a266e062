"""The policy recipe's config: demonstrations, observations, horizons, the UNet1D, noise schedule, rollouts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from mmx.train.trainer import TrainConfig

__all__ = ["PolicyConfig", "PolicyDataConfig", "PolicyDiffusionConfig", "PolicyEvalConfig", "PolicyModelConfig"]


@dataclass
class PolicyDataConfig:
    """Where the demonstrations come from."""

    env: str | None = "reach"  # the simulator: scripted demonstrations (when path is None) and rollouts; None: none
    path: str | None = None  # a zarr replay buffer in Diffusion Policy's layout (directory or .zarr.zip)
    episodes: int = 200  # scripted demonstrations to collect when path is None
    seed: int = 0
    action_key: str = "action"


@dataclass
class PolicyModelConfig:
    """Observation encoder and UNet1D sizes; ``conditioning`` picks FiLM, cross-attention or both."""

    conditioning: Literal["film", "cross_attention", "both"] = "film"
    dim: int = 128  # observation token width (cross-attention keys/values)
    fusion_layers: int = 0  # self-attention blocks over the observation tokens (regions read the words)
    diffusion_step_embed_dim: int = 128
    down_dims: tuple[int, ...] = (64, 128, 256)
    kernel_size: int = 5
    n_groups: int = 8
    cond_predict_scale: bool = True
    heads: int = 4
    dim_head: int = 32
    attn_ff_mult: int = 2


@dataclass
class PolicyDiffusionConfig:
    """Noise schedule for training and the few-step sampler (Diffusion Policy: 100 steps, squared cosine)."""

    num_train_timesteps: int = 100
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "v_prediction", "sample"] = "epsilon"
    sampler: str = "ddim"
    sample_steps: int = 16


@dataclass
class PolicyEvalConfig:
    """Rollouts for validation (during training) and for ``mmx eval``."""

    val_episodes: int = 20
    episodes: int = 100
    seed: int = 100_000
    batch_size: int = 64
    render: int = 8


@dataclass
class PolicyConfig:
    """Everything a policy run needs. ``obs`` maps observation keys to sources (see ObservationEncoder)."""

    task: Literal["policy"] = "policy"
    data: PolicyDataConfig = field(default_factory=PolicyDataConfig)
    obs: dict = field(default_factory=lambda: {"state": {"kind": "lowdim"}})
    action_dim: int | None = None  # filled in from the data
    horizon: int = 16
    n_obs_steps: int = 2
    n_action_steps: int = 8
    # Steps a training window may reach past an episode's end (its last action repeated). None: Diffusion
    # Policy's n_action_steps - 1. With episodes not much longer than the horizon that leaves the late
    # observations (the agent near its goal) out of training; horizon - n_obs_steps lets a window
    # start at every step.
    pad_after: int | None = None
    model: PolicyModelConfig = field(default_factory=PolicyModelConfig)
    diffusion: PolicyDiffusionConfig = field(default_factory=PolicyDiffusionConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(lr=1e-4, weight_decay=1e-6, warmup_steps=100))
    eval: PolicyEvalConfig = field(default_factory=PolicyEvalConfig)
    # Training-only losses on where the action chunk looks (mmx.attnmap.losses: mask_kl, as
    # {name: mask_kl, weight: 1.0}), the data key of the [T, H, W] masks they compare it with (the
    # targets simulator records "target_mask") and the image observation those are drawn on.
    attention_losses: list[dict] = field(default_factory=list)
    attention_mask_key: str = "target_mask"
    attention_image_key: str | None = None
