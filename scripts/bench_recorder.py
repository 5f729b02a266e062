"""Sampling time with the attention recorder on versus off, and the memory it holds.

The memory figure compares the recorder's running sums with what keeping every
(step, layer, head) map of the conditional rows would take on the same run.

    python scripts/bench_recorder.py --run mmx/assets/shapes_t2i --json benchmarks/recorder-cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time

import torch

from mmx.attnmap import AttentionRecorder
from mmx.train.text_to_image import heldout_prompts, load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="mmx/assets/shapes_t2i")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    cfg, pipeline = load_run(args.run)
    prompts = heldout_prompts(cfg)[: args.prompts]
    _, height, width = cfg.image_size
    d = cfg.diffusion

    def run(record: bool):
        generator = torch.Generator().manual_seed(0)
        if not record:
            start = time.perf_counter()
            out = pipeline.generate(prompts, args.steps, d.guidance_scale, d.sampler, generator)
            return time.perf_counter() - start, out, None
        with AttentionRecorder(pipeline.unet, (height, width)) as recorder:
            start = time.perf_counter()
            out = pipeline.generate(prompts, args.steps, d.guidance_scale, d.sampler, generator, callback=recorder.callback)
            return time.perf_counter() - start, out, recorder

    run(False)  # warm-up (also fills the caption cache)
    off, on = [], []
    for _ in range(args.repeats):
        t, plain, _ = run(False)
        off.append(t)
        t, recorded, recorder = run(True)
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
        every += args.steps * b * h * s * _queries(pipeline, name, height, width) * 4
    print(f"sampling {len(prompts)} prompts x {args.steps} steps: recorder off {statistics.median(off):.2f} s, "
          f"on {statistics.median(on):.2f} s, ratio {ratio:.3f} (target <= 1.15); outputs identical: {identical}")
    print(f"memory: recorder holds {held / 2**20:.3f} MiB; every (step, layer, head) map would be {every / 2**20:.1f} MiB "
          f"({every / held:.0f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": dt.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
                       "torch": torch.__version__, "prompts": len(prompts), "steps": args.steps,
                       "seconds_off": off, "seconds_on": on, "ratio": ratio, "identical_outputs": identical,
                       "recorder_bytes": held, "every_map_bytes": every, "layers": len(heads)}, f, indent=2)


def _queries(pipeline, name: str, height: int, width: int) -> int:
    """L of one layer, read off a one-step probe of that layer's query count."""
    seen = {}
    module = pipeline.unet.get_submodule(name)
    remove = module.add_hook(lambda m, q, k, mask: seen.setdefault("L", q.shape[2]))
    ctx = pipeline.encode(["a red circle"])
    with torch.no_grad():
        pipeline.unet(torch.zeros(1, 3, height, width), torch.tensor([1]), ctx)
    remove()
    return seen["L"]


if __name__ == "__main__":
    main()
