"""Training: one Accelerate loop for every recipe's Task, crash-safe checkpoints, run folders; it owns the I/O."""

from mmx.train.checkpoint import CheckpointError, latest_checkpoint, verify_checkpoint
from mmx.train.trainer import NonFiniteLossError, Task, TrainConfig, TrainResult, TrainSetupError, train

__all__ = [
    "CheckpointError",
    "NonFiniteLossError",
    "Task",
    "TrainConfig",
    "TrainResult",
    "TrainSetupError",
    "latest_checkpoint",
    "train",
    "verify_checkpoint",
]
