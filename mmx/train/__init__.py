"""Training: one Accelerate loop for every model, recipes, run folders. This layer owns the I/O."""

from mmx.train.trainer import (
    CheckpointError,
    NonFiniteLossError,
    Task,
    TrainConfig,
    TrainResult,
    latest_checkpoint,
    train,
    upgrade_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "Task",
    "TrainConfig",
    "TrainResult",
    "latest_checkpoint",
    "train",
    "upgrade_checkpoint",
    "verify_checkpoint",
]
