"""What the benchmark scripts print about the machine they ran on, how they time calls, and their JSON.

The timing code lives in :mod:`mmx.bench.timing` (so ``mmx bench`` works from an installed wheel);
this module re-exports it for the scripts.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

from mmx.bench.timing import _sync, cpu_name, device_name, time_calls

__all__ = ["_sync", "cpu_name", "device_name", "measure_and_save", "save_json", "time_calls"]


def save_json(data: dict, path: str | None) -> None:
    """Write a script's results to ``path`` (nothing when None) and say so on stdout."""
    if path is None:
        return
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
    print(f"# wrote {path}")


def measure_and_save(measure: Callable[..., dict], config_class: type, args: argparse.Namespace) -> None:
    """Run ``measure(config, warmup, repeats, device)`` of :mod:`mmx.bench` on a script's options; write --json.

    Every option but --warmup, --repeats, --device and --json is a field of ``config_class``; a
    ValueError (outputs that should agree do not) ends the script with its message.
    """
    options: dict[str, Any] = {k: v for k, v in vars(args).items() if k not in ("warmup", "repeats", "device", "json")}
    try:
        result = measure(config_class(**options), args.warmup, args.repeats, torch.device(args.device), log=print)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    save_json(result, args.json)
