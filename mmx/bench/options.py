"""Speed options of a training step, each against plain fp32 training measured in the same run.

The options are those of :class:`mmx.train.TrainConfig`: gradient checkpointing (step time and peak
memory), channels-last memory format, ``torch.compile`` (the one-off compilation and the steady step),
bf16 autocast (``mixed_precision: bf16``) and TF32 (CUDA only). A step is forward, diffusion loss,
backward and AdamW, as in :func:`mmx.bench.unet2d.train_step`.

* UNet2D: the shapes recipe's model (``configs/shapes_t2i.yaml``: channels (64, 96, 128), one block
  per level, cross-attention at the two lower levels, 2x2 patches) on 32x32 images, batch 64, a text
  context of 12 tokens (9 real) of width 384 (MiniLM's).
* UNet1D: the ``configs/policy_targets.yaml`` model (down_dims (64, 128, 256), cross-attention in every
  block) on action chunks of 16 steps, batch 64, a context of 136 observation tokens of width 128
  (2 observation steps of 64 image regions and a state token, and 6 instruction words).

Each option runs on its own copy of the baseline model (same weights, own AdamW); the variants take
turns (:func:`mmx.bench.timing.time_calls`), so load on the machine hits them alike. Peak memory is
measured around one more step of each (:class:`mmx.bench.memory.PeakMemory`, which names its method).
The first step of the compiled copy compiles its forward and backward: its wall time less a steady
step is the compile time, cold (inductor's on-disk cache points at a new, empty folder for the run;
a later process compiling the same graphs with its cache kept pays less). On CUDA every variant but
the TF32 one runs with TF32 off; on the CPU TF32 does not exist, and the report says so instead of
giving a figure.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmx import Context
from mmx.bench.memory import PeakMemory, memory_method
from mmx.bench.report import Figure, Log, SuiteResult, log_info, plain
from mmx.bench.timing import time_calls
from mmx.bench.unet2d import CONTEXT_DIM, TOKENS, ddpm_schedule, make_inputs

__all__ = ["UNET1D", "UNET2D", "Variant", "measure_variants", "suite", "unet1d_variants", "unet2d_variants"]

UNET2D = dict(
    channels=(64, 96, 128),
    layers_per_block=1,
    attention_levels=(False, True, True),
    attention={"heads": 4, "dim_head": 32},
    patch_size=2,
)
UNET2D_BATCH, UNET2D_SIZE = 64, 32
UNET1D = dict(
    input_dim=2,
    diffusion_step_embed_dim=64,
    down_dims=(64, 128, 256),
    kernel_size=5,
    n_groups=8,
    cond_predict_scale=True,
    context_dim=128,
    heads=4,
    dim_head=32,
)
UNET1D_BATCH, HORIZON, OBS_TOKENS = 64, 16, 136

BASELINE = "fp32"
CHECKPOINTING, CHANNELS_LAST, COMPILE, BF16, TF32 = (
    "gradient checkpointing",
    "channels_last",
    "torch.compile",
    "bf16 autocast",
    "TF32",
)


@dataclass
class Variant:
    """One way of running the training step: the model AdamW updates, what the loss calls, its input, precision."""

    model: nn.Module
    call: Callable[..., torch.Tensor]  # the model, or its torch.compile wrapper
    x0: torch.Tensor
    bf16: bool = False
    tf32: bool = False


def _set_tf32(device: torch.device, enabled: bool) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = enabled
        torch.backends.cudnn.allow_tf32 = enabled


@contextlib.contextmanager
def _cold_compile_cache() -> Iterator[None]:
    """Inductor's and Triton's on-disk caches in a new, empty folder, removed afterwards (so compiles are cold)."""
    saved = {key: os.environ.get(key) for key in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    folder = tempfile.mkdtemp(prefix="mmx_bench_inductor_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    os.environ["TRITON_CACHE_DIR"] = os.path.join(folder, "triton")
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(folder, ignore_errors=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _train_step(variant: Variant, ctx: Context, scheduler: Any, device: torch.device) -> Callable[[], None]:
    """A zero-argument optimiser step of the variant (bf16: autocast around the forward and the loss)."""
    from mmx.diffusion import diffusion_loss

    opt = torch.optim.AdamW(variant.model.parameters(), 1e-4)

    def step() -> None:
        _set_tf32(device, variant.tf32)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=variant.bf16):
            loss = diffusion_loss(variant.call, variant.x0, ctx, scheduler)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _options(
    model: nn.Module, x0: torch.Tensor, device: torch.device, compile_backend: str, channels_last: bool
) -> dict[str, Variant]:
    """The baseline and one copy of ``model`` per option (channels-last only where asked: 2-D models)."""
    model.train()

    def twin() -> nn.Module:
        return copy.deepcopy(model)

    variants = {BASELINE: Variant(model, model, x0)}
    checkpointed = twin()
    checkpointed.enable_gradient_checkpointing()
    variants[CHECKPOINTING] = Variant(checkpointed, checkpointed, x0)
    if channels_last:
        cl = twin().to(memory_format=torch.channels_last)
        variants[CHANNELS_LAST] = Variant(cl, cl, x0.contiguous(memory_format=torch.channels_last))
    compiled = twin()
    variants[COMPILE] = Variant(compiled, torch.compile(compiled, backend=compile_backend), x0)
    bf16 = twin()
    variants[BF16] = Variant(bf16, bf16, x0, bf16=True)
    if device.type == "cuda":
        tf32 = twin()
        variants[TF32] = Variant(tf32, tf32, x0, tf32=True)
    return variants


def unet2d_variants(
    device: torch.device,
    arch: dict | None = None,
    batch: int = UNET2D_BATCH,
    size: int = UNET2D_SIZE,
    compile_backend: str = "inductor",
) -> tuple[dict[str, Variant], Context]:
    """The UNet2D variants (shapes recipe model unless ``arch``) and their text context."""
    from mmx.models import UNet2D

    torch.manual_seed(0)
    x0, ctx = make_inputs(batch, size, device)
    model = UNet2D(context_dim=CONTEXT_DIM, **(arch or UNET2D)).to(device)
    return _options(model, x0, device, compile_backend, channels_last=True), ctx


def unet1d_variants(
    device: torch.device,
    arch: dict | None = None,
    batch: int = UNET1D_BATCH,
    horizon: int = HORIZON,
    tokens: int = OBS_TOKENS,
    compile_backend: str = "inductor",
) -> tuple[dict[str, Variant], Context]:
    """The UNet1D variants (policy_targets recipe model unless ``arch``; no channels-last: no 2-D convolution)."""
    from mmx.models import UNet1D

    arch = dict(arch or UNET1D)
    torch.manual_seed(0)
    model = UNet1D(**arch).to(device)
    x0 = torch.randn(batch, horizon, arch["input_dim"], device=device)
    ctx = Context(
        tokens=torch.randn(batch, tokens, arch["context_dim"], device=device),
        mask=torch.ones(batch, tokens, dtype=torch.bool, device=device),
    )
    return _options(model, x0, device, compile_backend, channels_last=False), ctx


def measure_variants(
    variants: dict[str, Variant],
    ctx: Context,
    device: torch.device,
    warmup: int,
    repeats: int,
    what: str,
    log: Log = log_info,
) -> tuple[dict[str, dict[str, float | None]], list[str]]:
    """Per variant ``{"step_ms", "first_step_ms", "peak_mib"}`` (median step; the first step on its own), and notes.

    A variant whose first step fails (torch.compile without a working compiler) is dropped with a note.
    """
    scheduler = ddpm_schedule()
    steps = {name: _train_step(v, ctx, scheduler, device) for name, v in variants.items()}
    first, notes = {}, []
    for name in list(steps):  # the compiled copy compiles its forward and backward here
        start = time.perf_counter()
        try:
            steps[name]()
            _sync(device)
        except Exception as err:  # noqa: BLE001 - the other options' figures still count
            if name != COMPILE:
                raise
            notes.append(f"{what}: {name} failed, no figure: {type(err).__name__}: {str(err).splitlines()[0]}")
            log(notes[-1])
            del steps[name]
            continue
        first[name] = time.perf_counter() - start
        log(f"{what} {name}: first step {first[name]:.2f} s")
    seconds = time_calls(steps, warmup, repeats, device)
    rows: dict[str, dict[str, float | None]] = {}
    for name, step in steps.items():
        with PeakMemory(device) as peak:
            step()
        rows[name] = {"step_ms": seconds[name] * 1e3, "first_step_ms": first[name] * 1e3, "peak_mib": peak.mib}
        log(
            f"{what} {name}: step {seconds[name] * 1e3:.1f} ms, peak "
            + ("n/a" if peak.mib is None else f"{peak.mib:.1f} MiB")
        )
    return rows, notes


def _figures(what: str, rows: dict[str, dict[str, float | None]]) -> list[Figure]:
    """Each option's step time (and checkpointing's peak memory, compile's one-off cost) against fp32's."""
    base = rows[BASELINE]
    against = f"{BASELINE} step"
    figures = []
    for name in (CHECKPOINTING, CHANNELS_LAST, COMPILE, BF16, TF32):
        if name not in rows:
            continue
        row = rows[name]
        label = f"{what}: {name} step" + (" (steady)" if name == COMPILE else "")
        figures.append(Figure(label, row["step_ms"], against, base["step_ms"], "ms"))
        if name == CHECKPOINTING and row["peak_mib"] and base["peak_mib"]:
            figures.append(
                Figure(f"{what}: {name} peak memory", row["peak_mib"], f"{BASELINE} peak", base["peak_mib"], "MiB")
            )
        if name == COMPILE:
            compile_ms = max(row["first_step_ms"] - row["step_ms"], 0.0)
            figures.append(
                Figure(
                    f"{what}: {name} compile time, once (ratio: in fp32 steps)",
                    compile_ms,
                    against,
                    base["step_ms"],
                    "ms",
                )
            )
    return figures


def _break_even(rows: dict[str, dict[str, float | None]]) -> float | None:
    """Steps after which torch.compile has paid for its compilation (None: it does not pay, or was not measured)."""
    if COMPILE not in rows:
        return None
    saved = rows[BASELINE]["step_ms"] - rows[COMPILE]["step_ms"]
    compile_ms = rows[COMPILE]["first_step_ms"] - rows[COMPILE]["step_ms"]
    return compile_ms / saved if saved > 0 else None


def suite(device: torch.device, quick: bool = False, log: Log = log_info) -> SuiteResult:
    """``mmx bench options``: each speed option's training step against fp32, UNet2D and UNet1D."""
    if quick:
        backend, warmup, repeats = "eager", 1, 1
        arch2 = dict(
            channels=(16, 32),
            layers_per_block=1,
            attention_levels=(False, True),
            attention={"heads": 2, "dim_head": 8},
            patch_size=2,
        )
        arch1 = dict(UNET1D, diffusion_step_embed_dim=16, down_dims=(16, 32), context_dim=8, heads=2, dim_head=8)
        sizes = dict(batch2=2, size=16, batch1=2, horizon=8, tokens=3)
    else:
        backend, warmup, repeats = "inductor", 1, 5
        arch2, arch1 = UNET2D, UNET1D
        sizes = dict(batch2=UNET2D_BATCH, size=UNET2D_SIZE, batch1=UNET1D_BATCH, horizon=HORIZON, tokens=OBS_TOKENS)
    tf32_before = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        with _cold_compile_cache():
            v2, ctx2 = unet2d_variants(device, arch2, sizes["batch2"], sizes["size"], backend)
            rows2, notes = measure_variants(v2, ctx2, device, warmup, repeats, "UNet2D", log)
            del v2, ctx2
            v1, ctx1 = unet1d_variants(device, arch1, sizes["batch1"], sizes["horizon"], sizes["tokens"], backend)
            rows1, notes1 = measure_variants(v1, ctx1, device, warmup, repeats, "UNet1D", log)
            del v1, ctx1
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32_before
    notes += notes1
    label2 = f"UNet2D B={sizes['batch2']}, {sizes['size']}px"
    label1 = f"UNet1D B={sizes['batch1']}, T={sizes['horizon']}"
    figures = _figures(label2, rows2) + _figures(label1, rows1)
    tf32 = (
        "measured: every other variant with TF32 off"
        if device.type == "cuda"
        else "not applicable on the CPU (TF32 is a CUDA matmul / convolution mode): no figure"
    )
    even = {name: _break_even(rows) for name, rows in (("unet2d", rows2), ("unet1d", rows1))}
    compiled = f"torch.compile backend {backend!r}" + (
        " (no code generation: --quick checks the path, not the speed)" if quick else ", cold compile"
    )
    paid = ", ".join(f"{name} {'never' if n is None else f'after {n:.0f} steps'}" for name, n in even.items())
    notes = [
        f"median of {repeats} after {warmup} warm-up, variants alternating, each on its own copy of the model; "
        f"bf16: autocast around forward and loss, fp32 weights; TF32: {tf32}; peak memory: "
        f"{memory_method(device)}",
        f"{compiled}; the compile time is paid back: {paid}",
        *notes,
    ]
    details = {
        "unet2d": {
            "arch": plain(arch2),
            "batch": sizes["batch2"],
            "size": sizes["size"],
            "context_tokens": TOKENS,
            "variants": rows2,
            "compile_break_even_steps": even["unet2d"],
        },
        "unet1d": {
            "arch": plain(arch1),
            "batch": sizes["batch1"],
            "horizon": sizes["horizon"],
            "context_tokens": sizes["tokens"],
            "variants": rows1,
            "compile_break_even_steps": even["unet1d"],
        },
        "warmup": warmup,
        "repeats": repeats,
        "compile_backend": backend,
        "tf32": tf32,
        "peak_memory_method": memory_method(device),
    }
    return SuiteResult("options", "training speed options against fp32", figures, details=details, notes=notes)
