"""Glue between networks and diffusers schedulers: training loss and sampling. No files, no data sets."""

from mmx.diffusion.loss import PREDICTION_TYPES, denoising_losses, diffusion_loss, drop_conditions
from mmx.diffusion.policy import DiffusionPolicy, LinearNormalizer
from mmx.diffusion.sampling import StepCallback, pad_context, sample
from mmx.diffusion.schedulers import SCHEDULERS, make_scheduler, sampler_from
from mmx.diffusion.text_to_image import TextToImage

__all__ = [
    "DiffusionPolicy",
    "LinearNormalizer",
    "PREDICTION_TYPES",
    "SCHEDULERS",
    "StepCallback",
    "TextToImage",
    "denoising_losses",
    "diffusion_loss",
    "drop_conditions",
    "make_scheduler",
    "pad_context",
    "sample",
    "sampler_from",
]
