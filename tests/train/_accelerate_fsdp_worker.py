"""Worker of tests/train/test_fsdp.py: ``mmx train`` under Accelerate's FSDP2, on gloo CPU processes.

    accelerate launch --config_file configs/accelerate/fsdp_4gpu.yaml --num_processes 2 \\
        tests/train/_accelerate_fsdp_worker.py UNITS train CONFIG KEY=VALUE... --out RUN

Accelerate turns a launch with FSDP into FSDP only for GPU process groups (its ``distributed_type``
becomes FSDP from MULTI_GPU, never from MULTI_CPU). Everything else it needs runs on CPUs: the
launcher's FSDP environment, ``fully_shard`` over a CPU device mesh, ``save_state`` / ``load_state``
of a sharded model. So this worker lets Accelerate build its state as usual, checks that it is the
CPU process group, and then makes it the FSDP state that a GPU launch would have made: the plugin
read from the same environment, ``distributed_type`` FSDP. The trainer then runs as on GPUs.

Process 0 writes the class names of the modules ``fully_shard`` made into units (JSON).
"""

from __future__ import annotations

import json
import sys

import accelerate
from accelerate.state import PartialState
from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin


class FsdpOnCpu(accelerate.Accelerator):
    units_path = ""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        assert self.state.distributed_type == DistributedType.MULTI_CPU, self.state.distributed_type
        self.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
        self.state.distributed_type = PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    def prepare(self, *args, **kwargs):
        from torch.distributed.fsdp import FSDPModule

        prepared = super().prepare(*args, **kwargs)
        if self.is_main_process:
            units = sorted({type(m).__name__ for p in prepared for m in getattr(p, "modules", list)()
                            if isinstance(m, FSDPModule)})  # fmt: skip
            with open(self.units_path, "w") as f:
                json.dump(units, f)
        return prepared


def main(units: str, argv: list[str]) -> None:
    from mmx.cli import main as mmx_main

    FsdpOnCpu.units_path = units
    accelerate.Accelerator = FsdpOnCpu  # the trainer imports it from accelerate when it trains
    sys.argv = ["mmx", *argv]
    mmx_main()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
