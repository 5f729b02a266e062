"""Training: one Accelerate loop for every model, recipes, run folders. This layer owns the I/O."""

from mmx.train.trainer import Task, TrainConfig, TrainResult, latest_checkpoint, train

__all__ = ["Task", "TrainConfig", "TrainResult", "latest_checkpoint", "train"]
