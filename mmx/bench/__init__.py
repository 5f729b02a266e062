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
  full attention maps (run by name only: ``all`` leaves it out)

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

import torch

from mmx.bench.report import BenchReport, Figure, Log, SuiteResult, log_info, machine_meta, quiet, tables
from mmx.bench.timing import pick_device
from mmx.registry import Registry, UnknownNameError

__all__ = ["ALL", "ORDER", "SUITES", "BenchReport", "Figure", "SuiteResult", "resolve", "run_suites", "tables"]

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
    "trace": ("trace", "suite"),  # minutes of a 860M-parameter UNet on the CPU: run by name, not by `all`
}
ORDER = tuple(name for name in _WHERE if name != "trace")
"""The suites in the order ``all`` runs them."""


def _lazy(module: str, function: str) -> Callable[..., SuiteResult]:
    """A suite whose module is imported only when it runs (each pulls in diffusers, models, ...)."""

    def run(device: torch.device, quick: bool = False, log: Log = log_info, out: Path | None = None) -> SuiteResult:
        suite = getattr(importlib.import_module(f"mmx.bench.{module}"), function)
        extra = {"out": out} if "out" in inspect.signature(suite).parameters else {}
        return suite(device, quick=quick, log=log, **extra)

    run.__name__ = f"{module}.{function}"
    run.__doc__ = f"Run :func:`mmx.bench.{module}.{function}`."
    return run


for _name, (_module, _function) in _WHERE.items():
    SUITES.register(_name)(_lazy(_module, _function))


def resolve(names: str | Sequence[str]) -> list[str]:
    """Suite names to run: ``"all"`` means every suite (in :data:`ORDER`).

    Raises:
        UnknownNameError: (a KeyError) an unknown name; the message lists the valid ones.
    """
    names = [names] if isinstance(names, str) else list(names)
    if ALL in names:
        return list(ORDER)
    unknown = [name for name in names if name not in _WHERE]
    if unknown:
        raise UnknownNameError(f"unknown benchmark suite {unknown[0]!r}; valid names: {', '.join(_WHERE)}, {ALL}")
    return list(dict.fromkeys(names))


def run_suites(
    names: str | Sequence[str] = ALL,
    device: str | torch.device | None = None,
    quick: bool = False,
    out: str | Path | None = None,
    log: Log = quiet,
    command: str | None = None,
    keep_going: bool = True,
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
            result = runner(device, quick=quick, log=log, out=Path(out) if out is not None else None)
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
