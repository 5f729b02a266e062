"""Worker of tests/train/test_fsdp.py: FSDP2 (fully_shard) on gloo CPU processes; mmx's FullModel gathers it.

    python -m torch.distributed.run --nproc_per_node 2 tests/train/_fsdp_worker.py OUT

Rank 0 also trains an unsharded copy of the same model on the same batches (the whole batch, which
is what the two shards' averaged gradients amount to) and writes both to OUT as safetensors.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist


def main(out: Path) -> None:
    from safetensors.torch import save_file
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from mmx.models import UNet1D
    from mmx.train.fsdp import FullModel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = UNet1D(input_dim=2, down_dims=(16, 32), diffusion_step_embed_dim=16, kernel_size=3, n_groups=4)
    reference = copy.deepcopy(model)
    full = FullModel(model, sharded=True, main=rank == 0)
    mesh = init_device_mesh("cpu", (world,))
    for block in [m for m in model.modules() if type(m).__name__ == "ResBlock1D"]:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(4 * world, 8, 2, generator=generator)
        t = torch.randint(0, 100, (4 * world,), generator=generator)
        mine = slice(4 * rank, 4 * rank + 4)
        model(x[mine], t[mine]).pow(2).mean().backward()  # FSDP averages the shards' gradients
        optimizer.step()
        optimizer.zero_grad()
        if rank == 0:
            reference(x, t).pow(2).mean().backward()
            ref_optimizer.step()
            ref_optimizer.zero_grad()
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, is_main_process=rank == 0, device=torch.device("cpu"))
    whole = full.get(accelerator, model)
    sharded = {name: type(p).__name__ for name, p in model.named_parameters()}
    if rank == 0:
        assert whole is full.replica and set(sharded.values()) == {"DTensor"}, sharded
        save_file({k: v.contiguous() for k, v in whole.state_dict().items()}, str(out / "gathered.safetensors"))
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(out / "reference.safetensors"))
        whole.save_pretrained(str(out / "saved"))
    else:
        assert whole is None and full.replica is None
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
