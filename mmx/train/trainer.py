"""One Accelerate training loop for every mmx model.

The loop owns the I/O: checkpoints, exact resume, tensorboard logs, the progress bar and validation
outputs. What is trained and how its loss is computed comes from a :class:`Task`. Runs unchanged on
one CPU, one GPU, or under ``accelerate launch`` / ``torchrun``.

Checkpoints are crash safe. ``step_N`` is written as ``step_N.tmp``: ``accelerator.save_state``
(model as safetensors; optimizer, LR schedule and RNG states as pickles), then the trainer's own
state (step counter, loss-noise generator, EMA) as safetensors, then, last, a manifest
``mmx_checkpoint.json`` holding the step and every file's relative path, size and sha256 (files are
fsynced first). Only then is the folder renamed to ``step_N``. A folder without a manifest, or whose
files do not match it, is never resumed: an explicit ``resume=path`` raises :class:`CheckpointError`
naming the file, ``resume="latest"`` falls back to the previous good checkpoint with a warning.
Resuming unpickles nothing but plain tensors and numbers (``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import torch
from torch import nn

__all__ = [
    "TrainConfig", "Task", "train", "latest_checkpoint", "verify_checkpoint", "upgrade_checkpoint", "TrainResult",
    "CheckpointError", "NonFiniteLossError",
]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MANIFEST = "mmx_checkpoint.json"
EMA_FILE = "mmx_ema.safetensors"
MANIFEST_FORMAT = "mmx-checkpoint"
MANIFEST_VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


def _state_file(rank: int) -> str:
    return f"mmx_state_{rank}.safetensors"


@dataclass
class TrainConfig:
    """Optimisation, precision, EMA, checkpointing and logging of a run."""

    max_steps: int = 1000
    batch_size: int = 64
    lr: float = 3e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    lr_schedule: Literal["cosine", "constant", "linear"] = "cosine"
    warmup_steps: int = 100
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    ema: bool = True
    ema_decay: float = 0.9999
    ema_power: float = 0.75
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 2
    validate_every: int = 500
    log_every: int = 20
    seed: int = 0
    num_workers: int = 0
    progress: bool = True
    tensorboard: bool = True
    max_nonfinite_steps: int = 10  # stop after this many steps in a row with a non-finite loss


class Task(Protocol):
    """What the trainer needs from a model family (text-to-image, policy, seq2seq, ...)."""

    model: nn.Module

    def train_dataset(self) -> torch.utils.data.Dataset: ...

    def collate(self, items: list[Any]) -> Any: ...

    def loss(self, model: nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor: ...

    def validate(self, model: nn.Module, step: int, out_dir: Path) -> dict[str, float]: ...

    def save_model(self, model: nn.Module, out_dir: Path) -> None: ...


@dataclass
class TrainResult:
    """Where the run ended: the final step, its last logged loss, the latest validation metrics."""

    step: int
    loss: float
    metrics: dict[str, float] = field(default_factory=dict)


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, corrupt, or holds data unsafe to load; the message names the file."""


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite for ``max_nonfinite_steps`` steps in a row."""


class _State:
    """Step counter, non-finite step count and the loss-noise generator: the trainer's part of a checkpoint."""

    def __init__(self, generator: torch.Generator) -> None:
        self.step = 0
        self.nonfinite_steps = 0
        self.generator = generator

    def save(self, path: Path) -> None:
        """One safetensors file per process (each process draws its own noise)."""
        from safetensors.torch import save_file

        meta = {"step": str(self.step), "nonfinite_steps": str(self.nonfinite_steps)}
        save_file({"generator": self.generator.get_state()}, str(path), metadata=meta)

    def load(self, path: Path) -> None:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            generator = f.get_tensor("generator")
        self.step = int(meta["step"])
        self.nonfinite_steps = int(meta.get("nonfinite_steps", 0))
        self.generator.set_state(generator)


def _save_ema(ema_state: dict[str, Any], path: Path) -> None:
    """An EMA ``state_dict``: shadow weights as safetensors, scalar settings (decay, step, ...) as JSON metadata."""
    from safetensors.torch import save_file

    settings = dict(ema_state)
    shadow = settings.pop("shadow_params")
    tensors = {f"shadow_params.{i}": p.detach().to("cpu").contiguous() for i, p in enumerate(shadow)}
    save_file(tensors, str(path), metadata={"mmx_ema": json.dumps(settings), "count": str(len(shadow))})


def _load_ema(ema: Any, path: Path, device: torch.device) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        count = int(meta.get("count", -1))
        if count != len(ema.shadow_params):
            raise CheckpointError(f"{path} holds {count} EMA tensors; the model has {len(ema.shadow_params)} "
                                  "parameters")
        shadow = [f.get_tensor(f"shadow_params.{i}").to(device) for i in range(count)]
    for i, (saved, current) in enumerate(zip(shadow, ema.shadow_params)):
        if saved.shape != current.shape:
            raise CheckpointError(f"{path}: EMA tensor {i} has shape {tuple(saved.shape)}; "
                                  f"the model's parameter has {tuple(current.shape)}")
    ema.load_state_dict({**json.loads(meta["mmx_ema"]), "shadow_params": shadow})


def _sha256(path: Path, fsync: bool = False) -> str:
    """The file's sha256 (read in 1 MiB chunks); ``fsync`` also flushes it to the disk."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync_dir(folder: Path) -> None:
    """Make a rename or a new file in ``folder`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _step_of(folder: Path) -> int | None:
    """``N`` of a ``step_N`` folder name; None for anything else (``step_N.tmp``, ``step_N.trash``, ...)."""
    match = _STEP_DIR.match(folder.name)
    return int(match.group(1)) if match else None


def _step_folders(run_dir: str | Path) -> list[Path]:
    """The run's ``checkpoints/step_N`` folders, newest first (complete or not)."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _step_of(p) is not None]
    return sorted(found, key=lambda p: _step_of(p), reverse=True)  # type: ignore[arg-type, return-value]


def verify_checkpoint(path: str | Path, hashes: bool = True) -> dict[str, Any]:
    """Check a checkpoint folder against its manifest; return the manifest.

    Every file the manifest lists must exist with the listed size and (when ``hashes``) sha256, and
    the manifest's step must match the folder name. Raises :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        if any(path.glob("custom_checkpoint_*.pkl")):
            raise CheckpointError(
                f"{path} was written by an older mmx (custom_checkpoint_*.pkl, no {MANIFEST}); its pickles are not "
                f"loaded automatically. Convert it once with: python -c \"from mmx.train.trainer import "
                f"upgrade_checkpoint; upgrade_checkpoint('{path}')\"")
        raise CheckpointError(f"{manifest_path} is missing: the checkpoint was not completely written")
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ValueError(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT!r}")
        step = int(manifest["step"])
        files = {name: (int(info["size"]), str(info["sha256"])) for name, info in manifest["files"].items()}
        if any(Path(name).is_absolute() or ".." in Path(name).parts for name in files):
            raise ValueError("a file path points outside the folder")
    except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{manifest_path} is not a valid mmx checkpoint manifest ({err})") from err
    if _step_of(path) is not None and _step_of(path) != step:
        raise CheckpointError(f"{manifest_path} says step {step}, but the folder is {path.name}")
    for name, (expected_size, expected_sha256) in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is missing (listed in {MANIFEST})")
        size = file.stat().st_size
        if size != expected_size:
            raise CheckpointError(f"{file} has {size} bytes; {MANIFEST} says {expected_size}: the file is truncated "
                                  "or was changed after the checkpoint was written")
        if hashes and _sha256(file) != expected_sha256:
            raise CheckpointError(f"{file} is corrupt: its sha256 differs from the one in {MANIFEST}")
    return manifest


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (``checkpoints/step_XXXXXXX``), or None.

    Complete means: its manifest exists and every file it lists has the listed size (a quick check
    without reading the files; resuming also compares the sha256 sums).
    """
    for path in _step_folders(run_dir):
        try:
            verify_checkpoint(path, hashes=False)
        except CheckpointError:
            continue
        return path
    return None


def upgrade_checkpoint(path: str | Path) -> Path:
    """Convert a checkpoint written by mmx before manifests existed, in place, so it can be resumed.

    Its ``custom_checkpoint_*.pkl`` files (EMA and step state) are unpickled with ``weights_only=True``
    (plain tensors and numbers only), rewritten as safetensors, removed, and a manifest is added.
    Only process 0's noise generator existed in the old format.
    """
    from safetensors.torch import save_file

    path = Path(path)
    old = sorted(path.glob("custom_checkpoint_*.pkl"))
    if (path / MANIFEST).exists() or not old:
        raise CheckpointError(f"{path} is not a checkpoint of the older format (custom_checkpoint_*.pkl, "
                              f"no {MANIFEST})")
    step = None
    for file in old:
        try:
            content = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{file} holds objects other than tensors and numbers; refusing to unpickle "
                                  "it") from err
        if isinstance(content, dict) and "shadow_params" in content:
            _save_ema(content, path / EMA_FILE)
        elif isinstance(content, dict) and {"step", "generator"} <= set(content):
            step = int(content["step"])
            save_file({"generator": content["generator"].contiguous()}, str(path / _state_file(0)),
                      metadata={"step": str(step), "nonfinite_steps": "0"})
        else:
            raise CheckpointError(f"{file} is neither an EMA state nor a step state")
    if step is None:
        raise CheckpointError(f"{path} has no step state among {[f.name for f in old]}")
    for file in old:
        file.unlink()
    _write_manifest(path, step)
    return path


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
        if cfg.lr_schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _check_config(cfg: TrainConfig) -> None:
    """Values the loop cannot work with, named with what was expected."""
    for key in ("max_steps", "batch_size", "grad_accum", "checkpoint_every", "validate_every", "log_every",
                "max_nonfinite_steps"):
        if getattr(cfg, key) < 1:
            raise ValueError(f"train.{key} = {getattr(cfg, key)!r}; expected an integer >= 1")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ValueError(f"train.checkpoints_total_limit = {cfg.checkpoints_total_limit!r}; expected null (keep all) "
                         "or an integer >= 1")


def train(
    task: Task,
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: str | Path | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    hparams: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``task.model`` for ``cfg.max_steps`` optimiser steps; returns the final step and loss.

    A step whose loss (or clipped gradient norm) is not finite is skipped: no optimiser, LR schedule
    or EMA update, gradients zeroed; it still counts as a step and consumes its batch. The skips are
    logged as ``train/nonfinite_steps``; ``cfg.max_nonfinite_steps`` of them in a row raise
    :class:`NonFiniteLossError`. Deciding costs one host synchronisation per optimiser step (a bool;
    under fp16 the GradScaler, which skips overflowing steps itself, already synchronises there).

    Args:
        task: the model family's loss, data, validation and saving.
        cfg: the training options.
        run_dir: the run folder (checkpoints/, logs/, samples/, model/).
        resume: ``"latest"`` (the newest good checkpoint; a bad one is skipped with a warning, and
            with none the run starts at step 0), a checkpoint folder (errors name what is wrong with
            it), or None to start fresh.
        on_step: called as ``on_step(step, loss)`` after every optimiser step, skipped ones included
            (loss stays a tensor: no host synchronisation unless the callback asks for it).
        hparams: flat values recorded in tensorboard's hparams.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    _check_config(cfg)
    run_dir = Path(run_dir)
    accelerator = Accelerator(
        cpu=multi_process_cpu_launch(),
        step_scheduler_with_optimizer=False,  # stepped below, once per optimiser step, whatever the process count
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard" if cfg.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
    _check_process_count(accelerator)
    set_seed(cfg.seed)
    generator = torch.Generator(device=accelerator.device).manual_seed(cfg.seed + accelerator.process_index)
    state = _State(generator)

    model = task.model
    dataset = task.train_dataset()
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.batch_size, shuffle=True, drop_last=True, collate_fn=task.collate,
        num_workers=cfg.num_workers, generator=torch.Generator().manual_seed(cfg.seed),
    )
    if len(loader) == 0:
        raise ValueError(f"the data set has {len(dataset)} samples, fewer than one batch of {cfg.batch_size}")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    ema = None
    if cfg.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(accelerator.unwrap_model(model).parameters(), decay=cfg.ema_decay, use_ema_warmup=True,
                       power=cfg.ema_power)
        ema.to(accelerator.device)

    last_checkpoint: Path | None = None  # the newest checkpoint written (or resumed) before any non-finite streak
    if resume:
        last_checkpoint = _resume_path(accelerator, run_dir, resume)
        if last_checkpoint is not None:
            _load_checkpoint(accelerator, last_checkpoint, state, ema)
            logger.info("resumed from %s at step %d", last_checkpoint, state.step)
    if accelerator.is_main_process and cfg.tensorboard:
        accelerator.init_trackers("mmx", config=hparams or {})

    batches_per_epoch = len(loader)
    consumed = state.step * cfg.grad_accum
    epoch, skip = divmod(consumed, batches_per_epoch)
    progress = tqdm(total=cfg.max_steps, initial=state.step, desc="train", dynamic_ncols=True,
                    disable=not (cfg.progress and accelerator.is_local_main_process))
    scaler = accelerator.scaler  # fp16: the GradScaler skips steps whose gradients overflow
    running = torch.zeros(2, device=accelerator.device)  # sum of finite losses, their count (since the last log)
    bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # a non-finite loss in this step's batches
    streak, overflow_steps = 0, 0
    last_loss, metrics = float("nan"), {}
    clock = _Clock()
    while state.step < cfg.max_steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            with accelerator.accumulate(model):
                loss = task.loss(model, batch, generator)
                finite = torch.isfinite(loss.detach())
                bad |= ~finite
                running += torch.stack([torch.where(finite, loss.detach().float(), 0.0), finite.float()])
                accelerator.backward(loss)
                skip_step = False
                if accelerator.sync_gradients:
                    if cfg.max_grad_norm is not None:
                        norm = accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                        if scaler is None and isinstance(norm, torch.Tensor):
                            bad |= ~torch.isfinite(norm)
                    if scaler is None:
                        skip_step = _on_any_process(accelerator, bad)  # the one host synchronisation per step
                if not skip_step:
                    optimizer.step()
                    if accelerator.sync_gradients and not accelerator.optimizer_step_was_skipped:
                        scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            if scaler is None:
                skipped = nonfinite = skip_step
            else:  # the scaler has synchronised already; ask about the loss only when it skipped
                skipped = accelerator.optimizer_step_was_skipped
                nonfinite = skipped and _on_any_process(accelerator, bad)
                overflow_steps += skipped and not nonfinite
            bad.zero_()
            if nonfinite:
                streak += 1
                state.nonfinite_steps += 1
                logger.warning("step %d: non-finite loss or gradient (loss %s); step skipped (%d in a row, %d in all)",
                               state.step, f"{loss.item():.4g}", streak, state.nonfinite_steps)
                if streak >= cfg.max_nonfinite_steps:
                    progress.close()
                    accelerator.log({"train/nonfinite_steps": state.nonfinite_steps}, step=state.step)
                    accelerator.end_training()
                    raise NonFiniteLossError(_nonfinite_message(cfg, state.step, streak, loss, last_checkpoint))
            elif not skipped:
                streak = 0
            if ema is not None and not skipped:
                ema.step(accelerator.unwrap_model(model).parameters())
            if on_step is not None:
                on_step(state.step, loss.detach())
            progress.update(1)
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                total, count = accelerator.reduce(running, "sum").tolist()  # one host sync per log interval
                running.zero_()
                last_loss = total / count if count else float("nan")
                lr = scheduler.get_last_lr()[0]
                progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}",
                                     **({"skipped": state.nonfinite_steps} if state.nonfinite_steps else {}))
                logs = {"train/lr": lr, "train/nonfinite_steps": state.nonfinite_steps}
                if count:  # no loss to log when every step of the interval was skipped
                    logs["train/loss"] = last_loss
                if scaler is not None:
                    logs["train/overflow_steps"] = overflow_steps
                accelerator.log(logs, step=state.step)
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps:
                if streak and state.step < cfg.max_steps:  # keep the retention limit from pushing out the good ones
                    logger.warning("step %d: checkpoint postponed: the last %d steps had a non-finite loss",
                                   state.step, streak)
                else:
                    last_checkpoint = _save_checkpoint(accelerator, run_dir, state, ema, cfg.checkpoints_total_limit)
            if state.step % cfg.validate_every == 0 or state.step == cfg.max_steps:
                with clock.paused():
                    metrics = _validate(accelerator, task, model, ema, state.step, run_dir, clock.seconds) or metrics
            if state.step >= cfg.max_steps:
                break
        epoch, skip = epoch + 1, 0
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        with _ema_weights(ema, unwrapped):
            task.save_model(unwrapped, run_dir / "model")
    accelerator.end_training()
    return TrainResult(step=state.step, loss=last_loss, metrics=metrics)


def _launched_processes() -> int:
    """How many processes the launcher started (torchrun / accelerate launch: WORLD_SIZE; mpirun: its own variable)."""
    from accelerate.utils import get_int_from_env

    return get_int_from_env(["WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"], 1)


def multi_process_cpu_launch() -> bool:
    """Whether this process is one of several launched (torchrun, accelerate launch) on a machine without a GPU.

    Accelerate only forms a CPU process group (MULTI_CPU, gloo) when told ``cpu=True``; left alone, each
    torchrun process on such a machine trains by itself, and every one of them writes the run folder.
    """
    has_gpu = torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())
    return _launched_processes() > 1 and not has_gpu


def _check_process_count(accelerator: Any) -> None:
    """Refuse to train when the launcher started N processes but Accelerate sees one (each would train alone)."""
    launched = _launched_processes()
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"the launcher started {launched} processes (WORLD_SIZE) but Accelerate sees "
            f"{accelerator.num_processes} ({accelerator.distributed_type}): each process would train alone and write "
            "the same run folder. On a machine without a GPU set ACCELERATE_USE_CPU=1; if something created "
            "accelerate.PartialState() before training, create it with cpu=multi_process_cpu_launch()")


def _on_any_process(accelerator: Any, flag: torch.Tensor) -> bool:
    """Whether ``flag`` is set on any process: one host synchronisation (plus an all-reduce when distributed)."""
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag.float(), "sum")
    return bool(flag)


def _nonfinite_message(cfg: TrainConfig, step: int, streak: int, loss: torch.Tensor, checkpoint: Path | None) -> str:
    where = (f"The last good checkpoint is {checkpoint}; resume from it with --resume {checkpoint} once the cause "
             "is fixed (e.g. a lower train.lr, or the data)" if checkpoint is not None
             else "No checkpoint was written before the loss went bad")
    return (f"training stopped at step {step}: the loss (or its gradient) was not finite for {streak} steps in a row "
            f"(steps {step - streak + 1}-{step}, last loss {loss.item():.4g}; train.max_nonfinite_steps = "
            f"{cfg.max_nonfinite_steps}). {where}.")


def _resume_path(accelerator: Any, run_dir: Path, resume: str | Path) -> Path | None:
    """The checkpoint to resume from, chosen (and fully verified) on the main process, shared with the others."""
    from accelerate.utils import broadcast_object_list

    choice: list[Any] = [None, None]  # path, or an error to raise on every process
    if accelerator.is_main_process:
        try:
            chosen = _choose_checkpoint(run_dir, resume)
            choice[0] = None if chosen is None else str(chosen)
        except (CheckpointError, FileNotFoundError) as err:
            choice[1] = err
    if accelerator.num_processes > 1:
        broadcast_object_list(choice)
    if choice[1] is not None:
        raise choice[1]
    return Path(choice[0]) if choice[0] is not None else None


def _choose_checkpoint(run_dir: Path, resume: str | Path) -> Path | None:
    """``resume="latest"``: the newest checkpoint that passes :func:`verify_checkpoint`; else the named folder."""
    if str(resume) != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {path}")
        verify_checkpoint(path)
        return path
    for path in _step_folders(run_dir):
        try:
            verify_checkpoint(path)
        except CheckpointError as err:
            logger.warning("--resume latest: skipping %s: %s", path, err)
            continue
        return path
    logger.warning("--resume latest: no complete checkpoint under %s; starting from step 0", run_dir / CHECKPOINTS)
    return None


def _load_checkpoint(accelerator: Any, path: Path, state: _State, ema: Any) -> None:
    """Restore everything a checkpoint holds, unpickling only plain tensors and numbers.

    accelerate loads the model from safetensors and the optimizer, LR schedule, GradScaler and RNG
    states with ``torch.load(weights_only=True)``; the trainer's own state and EMA are safetensors.
    accelerate skips RNG states it cannot load with only an info message, so they are checked first.
    """
    from accelerate.utils import load as accelerate_load

    rank = accelerator.process_index
    rng_file = path / f"random_states_{rank}.pkl"
    if rng_file.is_file():
        try:
            accelerate_load(rng_file, map_location="cpu", weights_only=True)
        except Exception as err:
            raise CheckpointError(f"{rng_file} cannot be loaded with weights_only=True: {_first_line(err)}") from err
    else:
        logger.warning("%s is missing (the run had fewer processes?): process %d keeps its fresh random state",
                       rng_file, rank)
    try:
        accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as err:
        culprit = _unsafe_pickle(path) or path
        raise CheckpointError(f"{culprit} holds objects other than tensors and numbers; refusing to unpickle it "
                              f"(weights_only=True): {_first_line(err)}") from err
    except Exception as err:
        raise CheckpointError(f"could not load checkpoint {path}: {type(err).__name__}: {_first_line(err)}") from err

    state_file = path / _state_file(rank)
    if not state_file.is_file() and rank > 0:
        logger.warning("%s is missing (the run had fewer processes?): using process 0's noise generator", state_file)
        state_file = path / _state_file(0)
    if not state_file.is_file():
        raise CheckpointError(f"{state_file} is missing: the checkpoint has no step counter")
    state.load(state_file)
    if ema is not None:
        if not (path / EMA_FILE).is_file():
            raise CheckpointError(f"{path / EMA_FILE} is missing: the checkpoint was trained without EMA "
                                  "(resume with train.ema=false)")
        _load_ema(ema, path / EMA_FILE, accelerator.device)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _unsafe_pickle(path: Path) -> Path | None:
    """The first pickle file in ``path`` that ``weights_only=True`` refuses (only called after a refusal)."""
    from accelerate.utils import load as accelerate_load

    for file in sorted(path.iterdir()):
        if file.suffix in (".bin", ".pkl", ".pt", ".pth"):
            try:
                accelerate_load(file, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError:
                return file
            except Exception:
                continue
    return None


class _Clock:
    """Wall-clock seconds of training, with validation time left out."""

    def __init__(self) -> None:
        self.start, self.excluded = time.perf_counter(), 0.0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def paused(self) -> "_Clock":
        return self

    def __enter__(self) -> None:
        self._paused_at = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        self.excluded += time.perf_counter() - self._paused_at


class _ema_weights:
    """Context manager: the model holds its EMA weights inside, its training weights after."""

    def __init__(self, ema: Any, model: nn.Module) -> None:
        self.ema, self.params = ema, list(model.parameters())

    def __enter__(self) -> None:
        if self.ema is not None:
            self.ema.store(self.params)
            self.ema.copy_to(self.params)

    def __exit__(self, *exc: Any) -> None:
        if self.ema is not None:
            self.ema.restore(self.params)


def _validate(
    accelerator: Any, task: Task, model: nn.Module, ema: Any, step: int, run_dir: Path, train_seconds: float
) -> dict[str, float]:
    """Run the task's validation with EMA weights on the main process; log its metrics.

    Each validation also appends ``{"step", "train_seconds", **metrics}`` to ``run_dir/metrics.jsonl``.
    """
    metrics: dict[str, float] = {}
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        unwrapped = accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        with _ema_weights(ema, unwrapped):
            metrics = task.validate(unwrapped, step, run_dir / "samples") or {}
        unwrapped.train(was_training)
        if metrics:
            accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
            logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "train_seconds": round(train_seconds, 1), **metrics}) + "\n")
    accelerator.wait_for_everyone()
    return metrics


def _save_checkpoint(accelerator: Any, run_dir: Path, state: _State, ema: Any, limit: int | None) -> Path:
    """Write ``checkpoints/step_N`` crash-safely; returns its path.

    Order: ``step_N.tmp`` <- save_state, trainer state (one file per process), EMA; manifest last
    (after fsyncing every file); rename to ``step_N``; then the retention limit removes the oldest
    complete checkpoints (never the new one: it keeps the newest ``limit >= 1``).
    """
    folder = run_dir / CHECKPOINTS
    final = folder / f"step_{state.step:07d}"
    tmp = folder / f"step_{state.step:07d}.tmp"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in [*folder.glob("step_*.tmp"), *folder.glob("step_*.trash")]:  # left by a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    _save_trainer_files(accelerator, tmp, state, ema)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _write_manifest(tmp, state.step)
        _publish(tmp, final)
        if limit is not None:
            _prune_checkpoints(folder, limit)
    accelerator.wait_for_everyone()
    return final


def _save_trainer_files(accelerator: Any, tmp: Path, state: _State, ema: Any) -> None:
    """The step counter and noise generator of this process, and (main process) the EMA weights."""
    state.save(tmp / _state_file(accelerator.process_index))
    if ema is not None and accelerator.is_main_process:
        _save_ema(ema.state_dict(), tmp / EMA_FILE)


def _write_manifest(folder: Path, step: int) -> None:
    """Fsync every file in ``folder``, then write ``mmx_checkpoint.json`` (sizes and sha256 sums) atomically."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[file.relative_to(folder).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256(file, fsync=True)}
    manifest = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "step": step,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": files}
    partial = folder / (MANIFEST + ".partial")
    with open(partial, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(partial, folder / MANIFEST)
    _fsync_dir(folder)


def _publish(tmp: Path, final: Path) -> None:
    """Rename the finished ``step_N.tmp`` to ``step_N`` (an older ``step_N`` is moved aside first, then removed)."""
    trash = final.with_name(final.name + ".trash")
    if final.exists():
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
    tmp.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(trash, ignore_errors=True)


def _prune_checkpoints(folder: Path, limit: int) -> None:
    """Keep the newest ``limit`` complete checkpoints; folders that fail the check are left alone.

    Each old folder is renamed to ``step_N.trash`` before it is deleted, so a run killed halfway
    leaves no half-deleted ``step_N``.
    """
    complete = []
    for path in _step_folders(folder.parent):
        try:
            verify_checkpoint(path, hashes=False)
        except CheckpointError:
            continue
        complete.append(path)
    for old in complete[limit:]:  # newest first
        trash = old.with_name(old.name + ".trash")
        old.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)
