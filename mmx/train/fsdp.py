"""The whole model on the main process when FSDP has sharded it, for validation and saving.

Under FSDP2 each process holds a shard of every parameter (``DTensor``), so the main process cannot
validate or save ``accelerator.unwrap_model(model)`` alone. :class:`FullModel` keeps an unsharded
replica on the main process (a CPU copy of the model, made before Accelerate shards it). Each
time it is needed, every process joins in gathering the full state dict
(:func:`full_state_dict`: ``torch.distributed.checkpoint``'s ``get_model_state_dict`` with
``full_state_dict=True, cpu_offload=True``, which lands on the main process only), and the
replica loads it. Without FSDP the unwrapped model is used as it is. Checkpoints need none of
this: ``accelerator.save_state`` / ``load_state`` write and read FSDP's state themselves.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

__all__ = ["FullModel", "full_state_dict", "is_fsdp", "wrap_policy_hint"]


def is_fsdp(accelerator: Any) -> bool:
    """Whether Accelerate shards the model (``distributed_type`` FSDP)."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def wrap_policy_hint(err: Exception, model: nn.Module) -> str | None:
    """What to change when Accelerate's FSDP prepare failed with ``err`` because of the auto wrap policy.

    SIZE_BASED_WRAP picks any module over the size, ``nn.ModuleList`` included, and ``fully_shard``
    refuses containers without a forward; TRANSFORMER_BASED_WRAP wraps the model's
    ``_no_split_modules`` (every mmx model names its blocks there). None: ``err`` is something else.
    """
    if "do not implement forward" not in str(err):
        return None
    blocks = list(getattr(model, "_no_split_modules", None) or [])
    return (
        f"FSDP could not shard {type(model).__name__}: its auto wrap policy chose a container (nn.ModuleList), "
        f"which fully_shard refuses; set fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP (it wraps the model's "
        f"blocks, {blocks}), as configs/accelerate/fsdp_4gpu.yaml does"
    )


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of an FSDP2 model on CPU, on rank 0 (empty elsewhere); every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


class FullModel:
    """``get()``: the model with every parameter, on the main process (None on the others).

    Args:
        model: the model before ``accelerator.prepare`` (FSDP: copied to a CPU replica now).
        sharded: whether the prepared model is sharded (FSDP); if not, ``get`` unwraps it.
        main: whether this is the main process (only it keeps a replica).
    """

    def __init__(self, model: nn.Module, sharded: bool, main: bool) -> None:
        self.sharded = sharded
        self.replica = copy.deepcopy(model).cpu() if sharded and main else None

    def get(self, accelerator: Any, prepared: nn.Module) -> nn.Module | None:
        """The whole model (collective under FSDP: call it on every process)."""
        if not self.sharded:
            return accelerator.unwrap_model(prepared) if accelerator.is_main_process else None
        state = full_state_dict(accelerator.unwrap_model(prepared))
        if self.replica is None:
            return None
        self.replica.load_state_dict(state)
        return self.replica.to(accelerator.device)

    def release(self) -> None:
        """Move the replica back to the CPU (it is only needed on the device for validation)."""
        if self.replica is not None:
            self.replica.cpu()
