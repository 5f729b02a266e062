"""One Accelerate training loop for every mmx model.

The loop owns the I/O: checkpoints (``accelerator.save_state``, written to a temporary folder and
renamed), exact resume, tensorboard logs, the progress bar and validation outputs. What is trained
and how its loss is computed comes from a :class:`Task`. Runs unchanged on one CPU, one GPU, or
under ``accelerate launch`` / ``torchrun``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Protocol

import torch
from torch import nn

__all__ = ["TrainConfig", "Task", "train", "latest_checkpoint", "TrainResult"]

logger = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"


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


class _State:
    """Step counter and the loss-noise generator, saved with every checkpoint for exact resume."""

    def __init__(self, generator: torch.Generator) -> None:
        self.step = 0
        self.generator = generator

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.generator.set_state(state["generator"])


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest complete checkpoint folder of a run (``checkpoints/step_XXXXXXX``), or None."""
    folder = Path(run_dir) / CHECKPOINTS
    if not folder.is_dir():
        return None
    done = sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
    return done[-1] if done else None


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


def train(
    task: Task,
    cfg: TrainConfig,
    run_dir: str | Path,
    resume: str | Path | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    hparams: dict[str, Any] | None = None,
) -> TrainResult:
    """Train ``task.model`` for ``cfg.max_steps`` optimiser steps; returns the final step and loss.

    Args:
        task: the model family's loss, data, validation and saving.
        cfg: the training options.
        run_dir: the run folder (checkpoints/, logs/, samples/, model/).
        resume: ``"latest"``, a checkpoint folder, or None to start fresh.
        on_step: called as ``on_step(step, loss)`` after every optimiser step (loss stays a tensor:
            no host synchronisation unless the callback asks for it).
        hparams: flat values recorded in tensorboard's hparams.
    """
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
    from tqdm.auto import tqdm

    run_dir = Path(run_dir)
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.grad_accum,
        log_with="tensorboard" if cfg.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
    )
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
        accelerator.register_for_checkpointing(ema)
    accelerator.register_for_checkpointing(state)

    if resume:
        path = latest_checkpoint(run_dir) if str(resume) == "latest" else Path(resume)
        if path is None:
            logger.warning("--resume latest: no checkpoint under %s; starting from step 0", run_dir / CHECKPOINTS)
        else:
            if not path.is_dir():
                raise FileNotFoundError(f"checkpoint folder not found: {path}")
            accelerator.load_state(str(path))
            logger.info("resumed from %s at step %d", path, state.step)
    if accelerator.is_main_process and cfg.tensorboard:
        accelerator.init_trackers("mmx", config=hparams or {})

    batches_per_epoch = len(loader)
    consumed = state.step * cfg.grad_accum
    epoch, skip = divmod(consumed, batches_per_epoch)
    progress = tqdm(total=cfg.max_steps, initial=state.step, disable=not (cfg.progress and accelerator.is_local_main_process),
                    desc="train", dynamic_ncols=True)
    running = torch.zeros((), device=accelerator.device)
    last_loss, metrics = float("nan"), {}
    clock = _Clock()
    while state.step < cfg.max_steps:
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip) if skip else loader
        for batch in batches:
            with accelerator.accumulate(model):
                loss = task.loss(model, batch, generator)
                accelerator.backward(loss)
                if accelerator.sync_gradients and cfg.max_grad_norm is not None:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue
            state.step += 1
            if ema is not None:
                ema.step(accelerator.unwrap_model(model).parameters())
            loss = loss.detach()
            running += loss
            if on_step is not None:
                on_step(state.step, loss)
            progress.update(1)
            if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
                n = cfg.log_every if state.step % cfg.log_every == 0 else state.step % cfg.log_every
                last_loss = accelerator.reduce(running, "mean").item() / n  # one host sync per log interval
                running.zero_()
                lr = scheduler.get_last_lr()[0]
                progress.set_postfix(loss=f"{last_loss:.4f}", lr=f"{lr:.2e}")
                accelerator.log({"train/loss": last_loss, "train/lr": lr}, step=state.step)
            if state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps:
                _save_checkpoint(accelerator, run_dir, state.step, cfg.checkpoints_total_limit)
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


def _save_checkpoint(accelerator: Any, run_dir: Path, step: int, limit: int | None) -> None:
    """``save_state`` into ``step_N.tmp``, then rename: a checkpoint folder is complete or absent."""
    folder = run_dir / CHECKPOINTS
    final = folder / f"step_{step:07d}"
    tmp = folder / f"step_{step:07d}.tmp"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        if limit is not None:
            done = sorted(p for p in folder.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
            for old in done[:-limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
