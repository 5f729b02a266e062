"""Turn one checkpoint of a text-to-image run into a run folder that `mmx eval` / `mmx sample` read.

The checkpoint's EMA weights (``mmx_ema.safetensors``, the weights a finished run saves) go into
``OUT/model/unet``; the run's ``config.yaml`` is copied. Use it to score a run at an earlier step,
e.g. the last checkpoint inside a time budget:

    python scripts/checkpoint_to_run.py runs/t2i_v14/checkpoints/step_0002000 --out runs/t2i_v14_step2000
    mmx eval runs/t2i_v14_step2000
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="RUN/checkpoints/step_N")
    parser.add_argument("--out", type=Path, required=True, help="new run folder (must not exist)")
    args = parser.parse_args()
    from safetensors import safe_open

    from mmx.models import UNet2D

    run = args.checkpoint.resolve().parents[1]
    ema_file = args.checkpoint / "mmx_ema.safetensors"
    for needed in (ema_file, run / "config.yaml", run / "model" / "unet"):
        if not needed.exists():
            sys.exit(f"error: {needed} not found: expected a checkpoint folder inside a finished text-to-image run")
    if args.out.exists():
        sys.exit(f"error: {args.out} exists; choose a new folder")
    unet = UNet2D.from_pretrained(run / "model" / "unet")  # the architecture; its weights are replaced below
    params = list(unet.parameters())
    with safe_open(str(ema_file), "pt") as f:
        count = int((f.metadata() or {}).get("count", -1))
        if count != len(params):
            sys.exit(f"error: {ema_file} holds {count} EMA tensors; the model has {len(params)} parameters")
        for i, p in enumerate(params):
            saved = f.get_tensor(f"shadow_params.{i}")
            if saved.shape != p.shape:
                sys.exit(f"error: EMA tensor {i} has shape {tuple(saved.shape)}; the model's parameter has {tuple(p.shape)}")
            p.data.copy_(saved)
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(run / "config.yaml", tmp / "config.yaml")
    unet.save_pretrained(tmp / "model" / "unet")
    tmp.rename(args.out)
    print(f"wrote {args.out} (EMA weights of {args.checkpoint.name})")


if __name__ == "__main__":
    main()
