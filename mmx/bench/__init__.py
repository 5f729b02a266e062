"""Benchmarks of mmx against its alternatives, each measured in the same run (``mmx bench``).

Suites (registered in :data:`SUITES`, in the order ``all`` runs them):

* ``attention``: CrossAttention against diffusers' ``Attention``, the tutorial attention and bare SDPA
* ``unet2d``: a UNet2D training step against diffusers' ``UNet2DConditionModel``
* ``sample``: sampling (DDIM, guidance) with UNet2D against ``UNet2DConditionModel``
* ``recorder``: sampling with the attention recorder on against off, and its memory
* ``unet1d``: UNet1D against the upstream ConditionalUnet1D rebuild (:mod:`mmx.bench.upstream_unet1d`)
* ``decoding``: decoding with key/value caches against re-running the prefix
* ``options``: a training step with each speed option (gradient checkpointing, channels-last, torch.compile,
  bf16 autocast, TF32 on CUDA) against plain fp32, UNet2D and UNet1D
* ``scaling``: training-step time and peak memory against resolution, context length and horizon
* ``trace``: tracing diffusers pipelines (``mmx.attnmap.trace``) against no tracing and against keeping
  full attention maps
* ``training``: bf16 training of the shapes recipe: samples/s, MFU, SDPA backends, host syncs, time to
  90% held-out accuracy (:mod:`mmx.bench.gpu`)
* ``latency``: a policy's action chunk eager, compiled and under CUDA graphs
* ``fsdp``: the trainer under Accelerate's FSDP2 saves, resumes and saves again (CUDA only)

The last four run by name only (``all`` leaves them out); ``gpu`` runs all of them after ``all``, on CUDA.

>>> from mmx.bench import run_suites
>>> report = run_suites(["unet1d"], quick=True)  # doctest: +SKIP
>>> [f.ratio for f in report.suites["unet1d"].figures]  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import inspect
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mmx.bench.report import BenchReport, Figure, Log, SuiteResult, log_info, machine_meta, quiet, tables
from mmx.bench.timing import pick_device
from mmx.registry import Registry, UnknownNameError

__all__ = [
    "ALL",
    "GPU",
    "GPU_ORDER",
    "ORDER",
    "SUITES",
    "BenchReport",
    "Figure",
    "SuiteResult",
    "resolve",
    "run_suites",
    "tables",
]

SUITES: Registry[SuiteResult] = Registry("benchmark suite")
ALL = "all"
_WHERE = {  # suite name -> (module of mmx.bench, function), in the order `all` runs them
    "attention": ("attention", "suite"),
    "unet2d": ("unet2d", "suite"),
    "sample": ("unet2d", "sample_suite"),
    "recorder": ("recorder", "suite"),
    "unet1d": ("unet1d", "suite"),
    "decoding": ("decoding", "suite"),
    "options": ("options", "suite"),
    "scaling": ("scaling", "suite"),
    "trace": ("trace", "suite"),
    "training": ("gpu", "training_suite"),
    "latency": ("gpu", "latency_suite"),
    "fsdp": ("gpu", "fsdp_suite"),
}
BY_NAME_ONLY = ("trace", "training", "latency", "fsdp")  # minutes on a CPU: `all` leaves them out
ORDER = tuple(name for name in _WHERE if name not in BY_NAME_ONLY)
"""The suites in the order ``all`` runs them."""
GPU = "gpu"
GPU_ORDER = (*ORDER, "training", "latency", "fsdp")
"""What ``gpu`` runs (on CUDA only): every suite of ``all``, then bf16 training, policy latency, FSDP2."""


def _lazy(module: str, function: str) -> Callable[..., SuiteResult]:
    """A suite whose module is imported only when it runs (each pulls in diffusers, models, ...)."""

    def run(device: torch.device, quick: bool = False, log: Log = log_info, **options: Any) -> SuiteResult:
        suite = getattr(importlib.import_module(f"mmx.bench.{module}"), function)
        accepted = inspect.signature(suite).parameters
        extra = {k: v for k, v in options.items() if k in accepted}
        return suite(device, quick=quick, log=log, **extra)

    run.__name__ = f"{module}.{function}"
    run.__doc__ = f"Run :func:`mmx.bench.{module}.{function}`."
    return run


for _name, (_module, _function) in _WHERE.items():
    SUITES.register(_name)(_lazy(_module, _function))


def resolve(names: str | Sequence[str]) -> list[str]:
    """Suite names to run: ``"all"`` means every suite of :data:`ORDER`, ``"gpu"`` those of :data:`GPU_ORDER`.

    Raises:
        UnknownNameError: (a KeyError) an unknown name; the message lists the valid ones.
    """
    names = [names] if isinstance(names, str) else list(names)
    if ALL in names:
        return list(ORDER)
    if GPU in names:
        return list(GPU_ORDER)
    unknown = [name for name in names if name not in _WHERE]
    if unknown:
        raise UnknownNameError(
            f"unknown benchmark suite {unknown[0]!r}; valid names: {', '.join(_WHERE)}, {ALL}, {GPU}"
        )
    return list(dict.fromkeys(names))


def run_suites(
    names: str | Sequence[str] = ALL,
    device: str | torch.device | None = None,
    quick: bool = False,
    out: str | Path | None = None,
    log: Log = quiet,
    command: str | None = None,
    keep_going: bool = True,
    peak_tflops: float | None = None,
) -> BenchReport:
    """Run the named suites (``"all"``: every one) and collect their figures.

    Args:
        names: suite names or ``"all"``.
        device: ``"cpu"``, ``"cuda"`` or a torch.device (default: CUDA when available).
        quick: tiny sizes and single repeats: a smoke run of seconds, not figures to quote.
        out: folder for files the suites write (the scaling PNGs); default the current folder.
        log: where progress lines go.
        command: recorded in the report's meta data (default: this process's command line).
        keep_going: a failing suite is recorded in ``report.errors`` and the others still run;
            False re-raises its error.
        peak_tflops: the device's dense bf16 peak for MFU (``training``), instead of the table's.
    """
    chosen = resolve(names)
    if not isinstance(device, torch.device):
        device = pick_device(device)
    report = BenchReport(meta=machine_meta(device, quick, command))
    report.meta["load_average_before"] = _load_average()
    for name in chosen:
        runner = SUITES.get(name)
        log(f"## {name}")
        start = time.perf_counter()
        try:
            result = runner(device, quick=quick, log=log, out=Path(out) if out is not None else None, peak=peak_tflops)
        except Exception as err:  # noqa: BLE001 - one broken suite must not cost the others' figures
            if not keep_going:
                raise
            report.errors[name] = f"{type(err).__name__}: {err}"
            log(f"{name} failed: {report.errors[name]}")
            continue
        result.seconds = time.perf_counter() - start
        report.suites[name] = result
    report.meta["seconds"] = sum(s.seconds for s in report.suites.values())
    report.meta["load_average_after"] = _load_average()
    return report


def _load_average() -> list[float] | None:
    """The machine's 1, 5 and 15 minute load averages (other work on the machine skews timings), if known."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None
