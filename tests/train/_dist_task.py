"""A tiny deterministic task for the distributed trainer tests; run as a script, under torchrun or alone.

``tests/train/test_trainer_distributed.py`` starts it as
``torchrun --nproc_per_node 2 _dist_task.py OUT RUN --batch-size B`` and as
``python _dist_task.py OUT RUN... --batch-size 2B`` (one process, twice the batch) and compares what
the runs leave behind. Every run ``NAME`` trains :class:`RegressionTask` with :func:`mmx.train.train`
into ``OUT/NAME/`` and each process writes ``OUT/NAME.rank<R>.json`` (outside the run folder), holding:

* ``distributed_type`` / ``num_processes``: what Accelerate made of the launch;
* ``seen``: the sample indices of every batch this process trained on, one list per optimiser step;
* ``writes``: every change this process made under ``OUT/NAME``: files opened for writing, folders made,
  renames and removals through Python (an audit hook), and the files handed to the two writers that
  bypass Python's ``open``, ``torch.save`` and safetensors (:class:`WriteLog`).

Under torchrun a launch trains one run: ``train`` ends with ``accelerator.end_training()``, which
destroys the process group, and a second ``train`` in the same process cannot form a new one.

The loss is a plain mean squared error over the batch: it draws nothing from the noise generator the
trainer hands it, so one process with batch 2b and two with batch b compute the same mean gradient
(up to float rounding) and must end with the same parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: The runs this script knows: TrainConfig overrides on top of :func:`base_config`.
RUNS: dict[str, dict[str, Any]] = {
    # parameters depend only on data order and gradients; EMA on
    "constant": {"lr_schedule": "constant", "warmup_steps": 0},
    # also on how the LR schedule is stepped (warmup then cosine decay); EMA off, it costs a diffusers import
    "cosine": {"lr_schedule": "cosine", "warmup_steps": 3, "ema": False},
    # one step, nothing optional: what Accelerate makes of a bare launch, and who writes the checkpoint
    "smoke": {"lr_schedule": "constant", "warmup_steps": 0, "ema": False, "tensorboard": False, "max_steps": 1},
}


def launcher_rank() -> int:
    """This process's global rank as the launcher (torchrun) set it, whatever Accelerate made of it."""
    return int(os.environ.get("RANK", "0"))


class WriteLog:
    """Every change this process makes below ``root``.

    Python-level changes come from :func:`sys.addaudithook`: ``[event, path relative to root]`` for files
    opened with a writing flag (``open``), ``os.mkdir``, ``os.rename`` / ``os.replace`` (the destination),
    ``os.remove``, ``os.rmdir`` and ``shutil.rmtree``. Two writers open their files in native code, out
    of the audit hook's sight: ``torch.save`` given a path (C++ zip writer; Accelerate's optimizer,
    scheduler and RNG pickles) and safetensors (Rust; models, EMA, mmx's step state). Both are wrapped
    where callers look them up at call time (``torch.save``, ``safetensors.torch.serialize_file``, which
    ``save_file`` calls) and logged as ``torch.save`` / ``safetensors``. Audit hooks cannot be removed:
    one log per process, pointed at each run folder in turn by :meth:`watch`.
    """

    _WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def __init__(self) -> None:
        import safetensors.torch

        self.root: str | None = None
        self.entries: list[list[str]] = []
        sys.addaudithook(self._hook)
        native = safetensors.torch.serialize_file

        def serialize_file(tensors: Any, filename: Any, *args: Any, **kwargs: Any) -> Any:
            self._record("safetensors", filename)
            return native(tensors, filename, *args, **kwargs)

        safetensors.torch.serialize_file = serialize_file
        torch_save = torch.save

        def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
            if isinstance(f, (str, os.PathLike)):
                self._record("torch.save", f)
            return torch_save(obj, f, *args, **kwargs)

        torch.save = save

    def watch(self, root: Path) -> None:
        self.root, self.entries = os.path.abspath(root), []

    def _relative(self, path: Any) -> str | None:
        if self.root is None or isinstance(path, int):  # an already open descriptor
            return None
        try:
            path = os.path.abspath(os.fsdecode(path))
        except TypeError:
            return None
        if path == self.root or path.startswith(self.root + os.sep):
            return os.path.relpath(path, self.root)
        return None

    def _hook(self, event: str, args: tuple) -> None:
        if event == "open":
            path, _, flags = args
            if flags is None or not flags & self._WRITE_FLAGS:
                return
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree"):
            path = args[0]
        elif event == "os.rename":
            path = args[1]
        else:
            return
        self._record(event, path)

    def _record(self, event: str, path: Any) -> None:
        relative = self._relative(path)
        if relative is not None:
            self.entries.append([event, relative])


class _Rows(torch.utils.data.Dataset):
    """``(index, x, y)`` rows: the index lets the task record which samples each step saw."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        return i, self.x[i], self.y[i]


class RegressionTask:
    """A two-layer MLP fitted to a fixed noisy regression target; implements mmx's ``Task`` protocol.

    ``validate`` and ``save_model`` tag what they write with the launcher rank of the process that
    wrote it (``samples/step_N.rank<R>.json``, ``model/written_by_rank<R>``), so a test can tell
    whether anything but the main process ran them.
    """

    def __init__(self, samples: int = 24, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(samples, 4, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(4, 2, generator=g)) + 0.1 * torch.randn(samples, 2, generator=g)
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))
        self.seen: list[list[int]] = []

    def train_dataset(self) -> torch.utils.data.Dataset:
        return _Rows(self.x, self.y)

    def collate(self, items: list[tuple[int, torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        return {
            "index": torch.tensor([i for i, _, _ in items]),
            "x": torch.stack([x for _, x, _ in items]),
            "y": torch.stack([y for _, _, y in items]),
        }

    def loss(self, model: nn.Module, batch: dict[str, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        self.seen.append(batch["index"].tolist())
        return F.mse_loss(model(batch["x"]), batch["y"])

    def validate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]:
        out_dir.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            mse = F.mse_loss(model(self.x), self.y).item()
        rank = launcher_rank()
        (out_dir / f"step_{step:07d}.rank{rank}.json").write_text(json.dumps({"step": step, "rank": rank}))
        return {"mse": mse}

    def save_model(self, model: nn.Module, out_dir: Path) -> None:
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        weights = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        save_file(weights, str(out_dir / "model.safetensors"))
        (out_dir / f"written_by_rank{launcher_rank()}").write_text("")


def base_config(batch_size: int) -> Any:
    """Eight steps, each logged, with EMA, two checkpoints and two validations: quick on two CPU cores.

    24 samples and a global batch of 8 make 3 steps per epoch, so the 8 steps cross two epoch
    boundaries (the sampler's reshuffle is part of what must match).
    """
    from mmx.train import TrainConfig

    return TrainConfig(
        max_steps=8,
        batch_size=batch_size,
        lr=1e-2,
        max_grad_norm=1.0,
        ema=True,
        ema_decay=0.9,
        checkpoint_every=4,
        checkpoints_total_limit=2,
        validate_every=4,
        log_every=1,
        seed=0,
        progress=False,
        tensorboard=True,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder for the run folders and the per-process traces")
    parser.add_argument("runs", nargs="+", choices=sorted(RUNS), help="the runs to train, one after the other")
    parser.add_argument("--batch-size", type=int, required=True, help="per process")
    args = parser.parse_args(argv)

    from dataclasses import replace

    from accelerate import PartialState

    from mmx.train import train

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and len(args.runs) > 1:
        # train() ends with accelerator.end_training(), which destroys the process group for good
        parser.error("one run per launch when distributed: a process can set up its process group once")
    rank = launcher_rank()
    log = WriteLog()
    for name in args.runs:
        run_dir = args.out / name
        cfg = replace(base_config(args.batch_size), **RUNS[name])
        task = RegressionTask()
        log.watch(run_dir)
        train(task, cfg, run_dir)  # not before: PartialState() here would fix the distributed setup too early
        state = PartialState()
        trace = {
            "rank": rank,
            "distributed_type": state.distributed_type.value,
            "num_processes": state.num_processes,
            "process_index": state.process_index,
            "seen": task.seen,
            "writes": log.entries,
        }
        (args.out / f"{name}.rank{rank}.json").write_text(json.dumps(trace))


if __name__ == "__main__":
    main()
