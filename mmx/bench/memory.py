"""Peak memory of a block of code, on the GPU or the CPU, and which method measured it.

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, above the memory
  allocated before the block (tensors only; the caching allocator's slack is not counted).
* CPU on Linux: the process's peak resident set (``VmHWM`` in /proc/self/status), reset by writing
  ``5`` to /proc/self/clear_refs, above the resident set before the block. Free heap is handed back
  first (glibc ``malloc_trim``), so memory freed by an earlier call does not hide this block's peak.
* CPU elsewhere, with psutil: the resident set sampled every millisecond by a thread (a short peak
  between two samples can be missed). ``tracemalloc`` is no use: it does not see torch's allocations.
* Otherwise: not measured (``None``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import importlib.util
import threading
from types import TracebackType

import torch

__all__ = ["PeakMemory", "memory_method", "short_method"]

CUDA = "torch.cuda.max_memory_allocated after reset_peak_memory_stats (tensor memory above the level before)"
VMHWM = "peak RSS growth: Linux VmHWM reset via /proc/self/clear_refs, after glibc malloc_trim"
PSUTIL = "peak RSS growth: psutil RSS sampled every 1 ms"
NONE = "n/a (no CUDA, no /proc/self/clear_refs, no psutil)"
_SHORT = {
    CUDA: "torch.cuda.max_memory_allocated",
    VMHWM: "peak RSS growth (Linux VmHWM)",
    PSUTIL: "peak RSS growth (psutil, sampled)",
    NONE: "n/a",
}


def _status_kib(field: str) -> int:
    """A ``kB`` field of /proc/self/status, such as ``VmRSS:`` or ``VmHWM:``."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current VmRSS


@functools.cache
def _libc_trim():
    """glibc's ``malloc_trim``, or None where there is no glibc."""
    name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(name), "malloc_trim", None) if name else None
    except OSError:
        return None


@functools.cache
def _cpu_method() -> str:
    try:
        _reset_hwm()
        _status_kib("VmHWM:")
        return VMHWM
    except (OSError, RuntimeError):
        pass
    return PSUTIL if importlib.util.find_spec("psutil") is not None else NONE


def memory_method(device: torch.device) -> str:
    """How :class:`PeakMemory` measures on ``device`` (a sentence for reports)."""
    return CUDA if device.type == "cuda" else _cpu_method()


def short_method(device: torch.device) -> str:
    """:func:`memory_method` in a few words (plot labels)."""
    return _SHORT[memory_method(device)]


class PeakMemory:
    """``with PeakMemory(device) as peak: ...``; then ``peak.mib`` is the block's peak growth in MiB.

    ``peak.mib`` is None where no method is available (see :func:`memory_method`).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = memory_method(device)
        self.mib: float | None = None
        self._base = 0
        self._peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> PeakMemory:
        gc.collect()
        if self.method == CUDA:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        elif self.method == VMHWM:
            trim = _libc_trim()
            if trim is not None:
                trim(0)
            _reset_hwm()
            self._base = _status_kib("VmRSS:") * 1024
        elif self.method == PSUTIL:
            import psutil

            process = psutil.Process()
            self._base = self._peak = process.memory_info().rss

            def poll() -> None:
                while not self._stop.wait(0.001):
                    self._peak = max(self._peak, process.memory_info().rss)

            self._thread = threading.Thread(target=poll, daemon=True)
            self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.method == CUDA:
            torch.cuda.synchronize(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
        elif self.method == VMHWM:
            peak = _status_kib("VmHWM:") * 1024
        elif self.method == PSUTIL:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            import psutil

            peak = max(self._peak, psutil.Process().memory_info().rss)
        else:
            return
        self.mib = max(peak - self._base, 0) / 2**20
