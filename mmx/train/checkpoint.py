"""Crash-safe checkpoints of the training loop: write, verify, choose, load, prune.

``step_N`` is written as ``step_N.tmp``: ``accelerator.save_state`` (model as safetensors; optimizer,
LR schedule and RNG states as pickles), then the trainer's own state (step counter, loss-noise
generator per process, EMA) as safetensors, then, last, a manifest ``mmx_checkpoint.json`` holding
the step and every file's relative path, size and sha256 (files are fsynced first). Only then is the
folder renamed to ``step_N``. A folder without a manifest, or whose files do not match it, is never
resumed: an explicit ``resume=path`` raises :class:`CheckpointError` naming the file,
``resume="latest"`` falls back to the previous good checkpoint with a warning. Resuming unpickles
nothing but plain tensors and numbers (``weights_only=True``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "CHECKPOINTS",
    "MANIFEST",
    "CheckpointError",
    "TrainerState",
    "latest_checkpoint",
    "load_checkpoint",
    "resume_path",
    "save_checkpoint",
    "verify_checkpoint",
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


class CheckpointError(ValueError):
    """A checkpoint folder that is incomplete, corrupt, or holds data unsafe to load; the message names the file."""


class TrainerState:
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
            raise CheckpointError(
                f"{path} holds {count} EMA tensors; the model has {len(ema.shadow_params)} parameters"
            )
        shadow = [f.get_tensor(f"shadow_params.{i}").to(device) for i in range(count)]
    for i, (saved, current) in enumerate(zip(shadow, ema.shadow_params)):
        if saved.shape != current.shape:
            raise CheckpointError(
                f"{path}: EMA tensor {i} has shape {tuple(saved.shape)}; "
                f"the model's parameter has {tuple(current.shape)}"
            )
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
            raise CheckpointError(
                f"{file} has {size} bytes; {MANIFEST} says {expected_size}: the file is truncated "
                "or was changed after the checkpoint was written"
            )
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


def resume_path(accelerator: Any, run_dir: Path, resume: str | Path) -> Path | None:
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


def load_checkpoint(accelerator: Any, path: Path, state: TrainerState, ema: Any) -> None:
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
        logger.warning(
            "%s is missing (the run had fewer processes?): process %d keeps its fresh random state", rng_file, rank
        )
    try:
        accelerator.load_state(str(path), load_kwargs={"weights_only": True})
    except pickle.UnpicklingError as err:
        culprit = _unsafe_pickle(path) or path
        raise CheckpointError(
            f"{culprit} holds objects other than tensors and numbers; refusing to unpickle it "
            f"(weights_only=True): {_first_line(err)}"
        ) from err
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
            raise CheckpointError(
                f"{path / EMA_FILE} is missing: the checkpoint was trained without EMA (resume with train.ema=false)"
            )
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


def save_checkpoint(accelerator: Any, run_dir: Path, state: TrainerState, ema: Any, limit: int | None) -> Path:
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


def _save_trainer_files(accelerator: Any, tmp: Path, state: TrainerState, ema: Any) -> None:
    """The step counter and noise generator of this process, and (main process) the EMA weights."""
    state.save(tmp / _state_file(accelerator.process_index))
    if ema is not None and accelerator.is_main_process:
        _save_ema(ema.state_dict(), tmp / EMA_FILE)


def _write_manifest(folder: Path, step: int) -> None:
    """Fsync every file in ``folder``, then write ``mmx_checkpoint.json`` (sizes and sha256 sums) atomically."""
    files = {}
    for file in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST):
        files[file.relative_to(folder).as_posix()] = {"size": file.stat().st_size, "sha256": _sha256(file, fsync=True)}
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "step": step,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
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
