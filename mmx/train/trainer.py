"""One Accelerate training loop for every mmx model.

The loop owns the I/O: checkpoints (crash safe, see :mod:`mmx.train.checkpoint`), exact resume,
tensorboard logs, the progress bar and validation outputs. What is trained and how its loss is
computed comes from a :class:`Task`. Runs unchanged on one CPU, one GPU, or under
``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from mmx.train.checkpoint import (  # noqa: F401  (re-exported: the trainer's public checkpoint API)
    CheckpointError,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    resume_path,
    save_checkpoint,
    verify_checkpoint,
)
from mmx.train.fsdp import FullModel, is_fsdp, wrap_policy_hint

__all__ = [
    "TrainConfig",
    "Task",
    "train",
    "latest_checkpoint",
    "verify_checkpoint",
    "TrainResult",
    "CheckpointError",
    "NonFiniteLossError",
    "TrainSetupError",
]

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Optimisation, precision, speed options, EMA, checkpointing and logging of a run.

    Speed options (``mmx bench options`` measures each against plain fp32 training):

    * ``gradient_checkpointing``: the model's residual and attention blocks are recomputed in the
      backward pass instead of keeping their activations (less memory, more compute); every
      submodule that supports it (diffusers' ModelMixin, e.g. UNet2D and UNet1D) is switched on.
    * ``channels_last``: parameters and 4-D image batches in channels-last memory format, for models
      with 2-D convolutions (nothing changes for the others).
    * ``compile``: the training forward runs through ``torch.compile`` (the first steps pay the
      compilation); validation, EMA and the saved weights use the model itself.
    * ``allow_tf32``: TF32 matmuls and convolutions on CUDA (process-wide; no effect elsewhere).
    * bf16 autocast is ``mixed_precision: bf16``.
    """

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
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    allow_tf32: bool = True
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


class NonFiniteLossError(RuntimeError):
    """The loss was NaN or infinite for ``max_nonfinite_steps`` steps in a row."""


class TrainSetupError(ValueError):
    """The run cannot start: a training option or the data set is unusable (the message says which)."""


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
    for key in (
        "max_steps",
        "batch_size",
        "grad_accum",
        "checkpoint_every",
        "validate_every",
        "log_every",
        "max_nonfinite_steps",
    ):
        if getattr(cfg, key) < 1:
            raise ValueError(f"train.{key} = {getattr(cfg, key)!r}; expected an integer >= 1")
    if cfg.checkpoints_total_limit is not None and cfg.checkpoints_total_limit < 1:
        raise ValueError(
            f"train.checkpoints_total_limit = {cfg.checkpoints_total_limit!r}; expected null (keep all) "
            "or an integer >= 1"
        )
    for key in ("gradient_checkpointing", "channels_last", "compile", "allow_tf32"):
        if not isinstance(getattr(cfg, key), bool):
            raise ValueError(f"train.{key} = {getattr(cfg, key)!r}; expected true or false")


def _speed_options(model: nn.Module, cfg: TrainConfig, device: torch.device) -> None:
    """Apply ``cfg``'s TF32, gradient checkpointing and channels-last options to ``model`` (before ``prepare``).

    Raises:
        ValueError: gradient checkpointing was asked for and no submodule of the model supports it.
    """
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
        torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    if cfg.gradient_checkpointing:
        supported = [
            m
            for m in model.modules()
            if getattr(m, "_supports_gradient_checkpointing", False) and hasattr(m, "enable_gradient_checkpointing")
        ]
        if not supported:
            raise ValueError(
                f"train.gradient_checkpointing = true, but {type(model).__name__} has no submodule that "
                "supports it (diffusers ModelMixin models with _supports_gradient_checkpointing, e.g. "
                "mmx's UNet2D and UNet1D)"
            )
        for module in supported:
            module.enable_gradient_checkpointing()
        logger.info("gradient checkpointing on in %s", ", ".join(sorted({type(m).__name__ for m in supported})))
    if cfg.channels_last:
        if _has_conv2d(model):
            model.to(memory_format=torch.channels_last)
        else:
            logger.info("train.channels_last: %s has no 2-D convolution; nothing to change", type(model).__name__)


def _has_conv2d(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def _channels_last(batch: Any) -> Any:
    """``batch`` with every floating 4-D tensor (images, masks) in channels-last format; other values as they are."""
    if isinstance(batch, torch.Tensor):
        if batch.ndim == 4 and batch.is_floating_point():
            return batch.contiguous(memory_format=torch.channels_last)
        return batch
    if isinstance(batch, dict):
        return {k: _channels_last(v) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)) and not hasattr(batch, "_fields"):  # namedtuples are left as they are
        return type(batch)(_channels_last(v) for v in batch)
    return batch


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

    The trainer seeds its data order, noise and dropout from ``cfg.seed``; the initial weights of
    ``task.model`` follow the same seed because each of mmx's tasks calls
    ``accelerate.utils.set_seed(cfg.train.seed)`` before it builds its model (a Task of one's own
    should do the same).

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
    from accelerate.state import AcceleratorState, is_initialized

    try:
        _check_config(cfg)
    except ValueError as err:
        raise TrainSetupError(str(err)) from err
    # Accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another
    # mixed precision. When this run creates that state, it releases it on the way out, so the next
    # train() in the same process (a notebook, `mmx bench training`) can pick its own. The process
    # group (PartialState) stays; a state made by the caller's own Accelerator is left alone.
    owns_state = not is_initialized()
    try:
        return _train(task, cfg, Path(run_dir), resume, on_step, hparams)
    finally:
        if owns_state:
            AcceleratorState._reset_state()


def _train(
    task: Task,
    cfg: TrainConfig,
    run_dir: Path,
    resume: str | Path | None,
    on_step: Callable[[int, torch.Tensor], None] | None,
    hparams: dict[str, Any] | None,
) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

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
    state = TrainerState(generator)

    model = task.model
    try:
        dataset = task.train_dataset()
    except (ValueError, TypeError, KeyError) as err:  # the data spec of the config: name it, no traceback
        raise TrainSetupError(f"cannot build the training data: {err}") from err
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        shuffle=True,
        drop_last=True,
        collate_fn=task.collate,
        num_workers=cfg.num_workers,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
    if len(loader) == 0:
        raise TrainSetupError(f"the data set has {len(dataset)} samples, fewer than one batch of {cfg.batch_size}")
    try:
        _speed_options(model, cfg, accelerator.device)
    except ValueError as err:
        raise TrainSetupError(str(err)) from err
    sharded = is_fsdp(accelerator)
    if sharded and cfg.ema:
        raise TrainSetupError(
            "train.ema keeps a copy of every parameter, but FSDP shards the parameters across the processes: "
            "set train.ema=false, or train with DDP or DeepSpeed ZeRO-2 (configs/accelerate/)"
        )
    full = FullModel(model, sharded, accelerator.is_main_process)  # validation and saving see every parameter
    images_channels_last = cfg.channels_last and _has_conv2d(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.adam_betas, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    try:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    except ValueError as err:
        if sharded and (hint := wrap_policy_hint(err, model)):
            raise TrainSetupError(hint) from err
        raise
    params = [p for p in model.parameters() if p.requires_grad]  # FSDP has replaced them by sharded ones
    # Only the training forward is compiled; checkpoints, EMA, validation and the saved weights keep using
    # `model`, so no state_dict key gains torch.compile's `_orig_mod.` prefix.
    forward_model = torch.compile(model) if cfg.compile else model

    ema = None
    if cfg.ema:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(
            accelerator.unwrap_model(model).parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=cfg.ema_power
        )
        ema.to(accelerator.device)

    last_checkpoint: Path | None = None  # the newest checkpoint written (or resumed) before any non-finite streak
    if resume:
        last_checkpoint = resume_path(accelerator, run_dir, resume)
        if last_checkpoint is not None:
            load_checkpoint(accelerator, last_checkpoint, state, ema)
            logger.info("resumed from %s at step %d", last_checkpoint, state.step)
    if accelerator.is_main_process and cfg.tensorboard:
        accelerator.init_trackers("mmx", config=hparams or {})

    batches_per_epoch = len(loader)
    consumed = state.step * cfg.grad_accum
    epoch, skip = divmod(consumed, batches_per_epoch)
    progress = tqdm(
        total=cfg.max_steps,
        initial=state.step,
        desc="train",
        dynamic_ncols=True,
        disable=not (cfg.progress and accelerator.is_local_main_process),
    )
    scaler = accelerator.scaler  # fp16: the GradScaler skips steps whose gradients overflow
    running = torch.zeros(2, device=accelerator.device)  # sum of finite losses, their count (since the last log)
    bad = torch.zeros((), dtype=torch.bool, device=accelerator.device)  # a non-finite loss in this step's batches
    streak, overflow_steps = 0, 0
    last_loss, metrics = float("nan"), {}
    saved = False
    clock = _Clock()
    while state.step < cfg.max_steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            if images_channels_last:
                batch = _channels_last(batch)
            with accelerator.accumulate(model):
                loss = task.loss(forward_model, batch, generator)
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
                logger.warning(
                    "step %d: non-finite loss or gradient (loss %s); step skipped (%d in a row, %d in all)",
                    state.step,
                    f"{loss.item():.4g}",
                    streak,
                    state.nonfinite_steps,
                )
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
                progress.set_postfix(
                    loss=f"{last_loss:.4f}",
                    lr=f"{lr:.2e}",
                    **({"skipped": state.nonfinite_steps} if state.nonfinite_steps else {}),
                )
                logs = {"train/lr": lr, "train/nonfinite_steps": state.nonfinite_steps}
                if count:  # no loss to log when every step of the interval was skipped
                    logs["train/loss"] = last_loss
                if scaler is not None:
                    logs["train/overflow_steps"] = overflow_steps
                accelerator.log(logs, step=state.step)
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps:
                if streak and state.step < cfg.max_steps:  # keep the retention limit from pushing out the good ones
                    logger.warning(
                        "step %d: checkpoint postponed: the last %d steps had a non-finite loss", state.step, streak
                    )
                else:
                    last_checkpoint = save_checkpoint(accelerator, run_dir, state, ema, cfg.checkpoints_total_limit)
            if state.step == cfg.max_steps:  # before the last validation: an error there cannot cost the model
                _save_model(accelerator, task, full, model, ema, run_dir)
                saved = True
            if state.step % cfg.validate_every == 0 or state.step == cfg.max_steps:
                with clock.paused():
                    metrics = (
                        _validate(accelerator, task, full, model, ema, state.step, run_dir, clock.seconds) or metrics
                    )
            if state.step >= cfg.max_steps:
                break
        epoch, skip = epoch + 1, 0
    progress.close()

    if not saved:  # resumed at the last step: nothing trained, the weights are the checkpoint's
        _save_model(accelerator, task, full, model, ema, run_dir)
    accelerator.end_training()
    return TrainResult(step=state.step, loss=last_loss, metrics=metrics)


def _save_model(accelerator: Any, task: Task, full: FullModel, model: nn.Module, ema: Any, run_dir: Path) -> None:
    """The task saves the final (EMA) weights into ``run_dir/model`` on the main process."""
    accelerator.wait_for_everyone()
    whole = full.get(accelerator, model)  # every process joins in gathering FSDP's shards
    if whole is not None:
        with _ema_weights(ema, whole):
            task.save_model(whole, run_dir / "model")
    full.release()
    accelerator.wait_for_everyone()


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
            "accelerate.PartialState() before training, create it with cpu=multi_process_cpu_launch()"
        )


def _on_any_process(accelerator: Any, flag: torch.Tensor) -> bool:
    """Whether ``flag`` is set on any process: one host synchronisation (plus an all-reduce when distributed)."""
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag.float(), "sum")
    return bool(flag)


def _nonfinite_message(cfg: TrainConfig, step: int, streak: int, loss: torch.Tensor, checkpoint: Path | None) -> str:
    where = (
        f"The last good checkpoint is {checkpoint}; resume from it with --resume {checkpoint} once the cause "
        "is fixed (e.g. a lower train.lr, or the data)"
        if checkpoint is not None
        else "No checkpoint was written before the loss went bad"
    )
    return (
        f"training stopped at step {step}: the loss (or its gradient) was not finite for {streak} steps in a row "
        f"(steps {step - streak + 1}-{step}, last loss {loss.item():.4g}; train.max_nonfinite_steps = "
        f"{cfg.max_nonfinite_steps}). {where}."
    )


class _Clock:
    """Wall-clock seconds of training, with validation time left out."""

    def __init__(self) -> None:
        self.start, self.excluded = time.perf_counter(), 0.0

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start - self.excluded

    def paused(self) -> _Clock:
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
    accelerator: Any,
    task: Task,
    full: FullModel,
    model: nn.Module,
    ema: Any,
    step: int,
    run_dir: Path,
    train_seconds: float,
) -> dict[str, float]:
    """Run the task's validation with EMA weights on the main process; log its metrics.

    Each validation also appends ``{"step", "train_seconds", **metrics}`` to ``run_dir/metrics.jsonl``.
    """
    metrics: dict[str, float] = {}
    accelerator.wait_for_everyone()
    whole = full.get(accelerator, model)  # every process joins in gathering FSDP's shards
    if whole is not None:
        was_training = whole.training
        whole.eval()
        with _ema_weights(ema, whole):
            metrics = task.validate(whole, step, run_dir / "samples") or {}
        whole.train(was_training)
        if metrics:
            accelerator.log({f"val/{k}": v for k, v in metrics.items()}, step=step)
            logger.info("step %d: %s", step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
            with open(run_dir / "metrics.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "train_seconds": round(train_seconds, 1), **metrics}) + "\n")
    full.release()
    accelerator.wait_for_everyone()
    return metrics
