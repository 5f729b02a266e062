"""What a training step asks of the hardware: model FLOPs, MFU, which SDPA kernel ran, host syncs.

* :func:`count_flops`: FLOPs of a call, counted by ``torch.utils.flop_counter.FlopCounterMode``
  (matmuls, convolutions, SDPA forward and backward; element-wise work is not counted, as in the
  usual model-FLOPs convention). torch has no formula for the CPU flash-attention kernel; mmx
  counts it like the CUDA ones (:data:`CPU_SDPA_FORMULAS`).
* :func:`peak_tflops` and :func:`mfu`: model FLOPs utilisation against the card's dense bf16
  tensor-core peak, from :data:`PEAK_BF16_TFLOPS` by device name or a value given.
* :func:`sdpa_backends`: which kernel each ``scaled_dot_product_attention`` call ran (flash,
  cuDNN, memory-efficient, math), read from the aten op it dispatched to, per shape and dtype.
* :func:`host_syncs`: the host synchronisations a call makes on CUDA
  (``torch.cuda.set_sync_debug_mode("warn")``), by the line of code that made them.
"""

from __future__ import annotations

import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "CPU_SDPA_FORMULAS",
    "PEAK_BF16_TFLOPS",
    "SdpaCall",
    "count_flops",
    "host_syncs",
    "mfu",
    "peak_tflops",
    "sdpa_backends",
    "sync_sites",
]

PEAK_BF16_TFLOPS: dict[str, float] = {
    # dense bf16 tensor-core peak (no sparsity), from the vendors' data sheets; matched as a substring
    # of torch.cuda.get_device_name(), the first match wins (so the specific names come first)
    "H200": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.4,  # SXM5 ("NVIDIA H100 80GB HBM3")
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.1,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
    "RTX 4090": 165.2,
    "RTX 3090": 71.0,
}
"""Dense bf16 peak TFLOP/s by device name (a substring); ``--peak-tflops`` overrides it."""


def peak_tflops(device_name: str, override: float | None = None) -> tuple[float | None, str]:
    """``(peak TFLOP/s, where it came from)``; None for a device not in the table and no override."""
    if override is not None:
        if not override > 0:
            raise ValueError(f"peak TFLOP/s must be positive; got {override}")
        return float(override), "given"
    for name, value in PEAK_BF16_TFLOPS.items():
        if name in device_name:
            return value, f"table ({name})"
    return None, f"unknown device {device_name!r}: pass --peak-tflops"


def mfu(flops_per_step: float, seconds_per_step: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved FLOP/s over the peak (TFLOP/s); None without a peak."""
    if peak is None:
        return None
    if seconds_per_step <= 0:
        raise ValueError(f"seconds per step must be positive; got {seconds_per_step}")
    return flops_per_step / seconds_per_step / (peak * 1e12)


def _sdpa_forward(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _sdpa_backward(grad: Any, query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    from torch.utils.flop_counter import sdpa_backward_flop_count

    return sdpa_backward_flop_count(grad, query_shape, key_shape, value_shape)


CPU_SDPA_FORMULAS = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_forward,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _sdpa_backward,
}
"""FlopCounterMode formulas for the CPU flash-attention kernel, the same as torch's for the CUDA ones."""


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs of one call of ``fn`` (run it with its backward inside to count a training step)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA_FORMULAS) as counter:
        fn()
    return int(counter.get_total_flops())


_KERNELS = {  # the aten op scaled_dot_product_attention dispatched to -> the backend's name
    "_scaled_dot_product_flash_attention": "flash",
    "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "_scaled_dot_product_cudnn_attention": "cuDNN",
    "_scaled_dot_product_efficient_attention": "memory-efficient",
    "_scaled_dot_product_fused_attention_overrideable": "fused (device-specific)",
}


@dataclass(frozen=True)
class SdpaCall:
    """One kind of ``scaled_dot_product_attention`` call: its shapes and dtype, the backend, how many calls."""

    query: tuple[int, ...]  # [B, H, L, D]
    key: tuple[int, ...]  # [B, H, S, D]
    dtype: str
    backend: str
    calls: int


def sdpa_backends(fn: Callable[[], Any]) -> list[SdpaCall]:
    """Which kernel each ``scaled_dot_product_attention`` call inside ``fn`` ran, grouped by shape and dtype.

    A function mode sees each call with its inputs (under autocast, the dtype the kernel got); a
    dispatch mode inside it sees the aten op it went to. No fused op means the math fallback, which
    runs as plain matmuls and softmax.
    """
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    found: Counter[tuple[tuple[int, ...], tuple[int, ...], str, str]] = Counter()

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    class Calls(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            kwargs = kwargs or {}
            if func is not torch.nn.functional.scaled_dot_product_attention:
                return func(*args, **kwargs)
            with Ops() as ops:
                out = func(*args, **kwargs)
            fused = next((_KERNELS[n] for n in ops.names if n in _KERNELS), None)
            backend = fused or next((f"other: {n}" for n in ops.names if "attention" in n), "math")
            q, k = args[0], args[1]
            dtype = str(torch.get_autocast_dtype(q.device.type)) if torch.is_autocast_enabled(q.device.type) else ""
            found[(tuple(q.shape), tuple(k.shape), (dtype or str(q.dtype)).replace("torch.", ""), backend)] += 1
            return out

    with Calls():
        fn()
    return [SdpaCall(q, k, dtype, backend, n) for (q, k, dtype, backend), n in found.items()]


def host_syncs(fn: Callable[[], Any], device: torch.device) -> tuple[dict[str, int] | None, str | None]:
    """Host synchronisations made by ``fn`` on CUDA, by the line of code behind each (mmx's, else the caller's).

    Returns ``(counts, problem)``: on a CPU there is nothing to synchronise with, so ``(None, why)``.
    """
    if device.type != "cuda":
        fn()
        return None, "not applicable off CUDA (torch.cuda.set_sync_debug_mode needs a GPU)"
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        return sync_sites(fn), None
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def sync_sites(fn: Callable[[], Any]) -> dict[str, int]:
    """Count the "synchronizing CUDA operation" warnings ``fn`` raises, by the line of code behind each;
    other warnings go on as usual."""
    sites: Counter[str] = Counter()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        original = warnings.showwarning

        def show(message: Any, category: Any, filename: str, lineno: int, *args: Any) -> None:
            if "synchroniz" in str(message):
                sites[_site(traceback.extract_stack()[:-1])] += 1
            else:
                original(message, category, filename, lineno, *args)

        warnings.showwarning = show  # catch_warnings puts the original back
        fn()
    return dict(sites)


def _site(stack: traceback.StackSummary) -> str:
    """``path:line`` of the innermost frame in mmx (else the innermost outside the warnings module)."""
    frames = [f for f in stack if f.filename != __file__ and not f.filename.endswith("/warnings.py")]
    mine = [f for f in frames if "/mmx/" in f.filename]
    frame = (mine or frames or list(stack))[-1]
    name = frame.filename.rsplit("/mmx/", 1)[-1] if "/mmx/" in frame.filename else frame.filename
    return f"{name}:{frame.lineno}"
