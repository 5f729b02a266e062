"""diffusers noise schedulers by name: the training scheduler and samplers built from its config."""

from __future__ import annotations

from typing import Any

from mmx.registry import Registry

__all__ = ["SCHEDULERS", "make_scheduler", "sampler_from"]

SCHEDULERS: Registry = Registry("scheduler")


def _lazy(class_name: str, **defaults: Any):
    def factory(**config: Any):
        import diffusers

        cls = getattr(diffusers, class_name)
        return cls.from_config({**config, **defaults})

    factory.__name__ = class_name
    return factory


SCHEDULERS.register("ddpm")(_lazy("DDPMScheduler"))
SCHEDULERS.register("ddim")(_lazy("DDIMScheduler"))
SCHEDULERS.register("dpm++", aliases=("dpmsolver++",))(
    _lazy("DPMSolverMultistepScheduler", algorithm_type="dpmsolver++")
)
SCHEDULERS.register("euler")(_lazy("EulerDiscreteScheduler"))


def make_scheduler(name: str = "ddpm", **config: Any):
    """A diffusers scheduler by registry name with diffusers config keys (e.g. ``num_train_timesteps``)."""
    return SCHEDULERS.get(name)(**config)


def sampler_from(train_scheduler: Any, name: str):
    """A sampling scheduler of kind ``name`` sharing the training scheduler's noise schedule and prediction type."""
    return SCHEDULERS.get(name)(**dict(train_scheduler.config))
