"""What the benchmark scripts print about the machine they ran on, and how they time calls."""

from __future__ import annotations

import platform
import statistics
import time

import torch


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """The GPU's name, or the CPU model and the number of torch threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu: {cpu_name()}, {torch.get_num_threads()} threads"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_calls(calls: dict, warmup: int, repeats: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each zero-argument callable; the callables alternate, in rotating order."""
    names = list(calls)
    for _ in range(warmup):
        for name in names:
            calls[name]()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(repeats):
        order = names[i % len(names):] + names[: i % len(names)]
        for name in order:
            start = time.perf_counter()
            calls[name]()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}
