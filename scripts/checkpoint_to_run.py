"""Turn one checkpoint of a text-to-image run into a run folder that `mmx eval` / `mmx sample` read.

The checkpoint's EMA weights (``mmx_ema.safetensors``, the weights a finished run saves) go into
``OUT/model/unet``; the run's ``config.yaml`` is copied. ``--weights raw`` takes the optimised
weights (``model.safetensors``) instead, to see what the EMA adds. Use it to score a run at an
earlier step, e.g. the last checkpoint inside a time budget:

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
    parser.add_argument(
        "--weights",
        choices=("ema", "raw"),
        default="ema",
        help="the EMA weights (default, what a finished run saves) or the raw optimised ones",
    )
    args = parser.parse_args()
    from mmx.models import UNet2D

    run = args.checkpoint.resolve().parents[1]
    source = args.checkpoint / ("mmx_ema.safetensors" if args.weights == "ema" else "model.safetensors")
    for needed in (source, run / "config.yaml", run / "model" / "unet"):
        if not needed.exists():
            sys.exit(f"error: {needed} not found: expected a checkpoint folder inside a finished text-to-image run")
    if args.out.exists():
        sys.exit(f"error: {args.out} exists; choose a new folder")
    unet = UNet2D.from_pretrained(run / "model" / "unet")  # the architecture; its weights are replaced below
    if args.weights == "ema":
        _load_ema(unet, source)
    else:
        from safetensors.torch import load_file

        missing, unexpected = unet.load_state_dict(load_file(str(source)), strict=False)
        if missing or unexpected:
            sys.exit(f"error: {source} does not fit the run's UNet: missing {missing[:3]}, unexpected {unexpected[:3]}")
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shutil.copy(run / "config.yaml", tmp / "config.yaml")
    unet.save_pretrained(tmp / "model" / "unet")
    tmp.rename(args.out)
    print(f"wrote {args.out} ({args.weights} weights of {args.checkpoint.name})")


def _load_ema(unet, ema_file: Path) -> None:
    """Copy the EMA shadow parameters of ``ema_file`` into ``unet``, in parameter order."""
    from safetensors import safe_open

    params = list(unet.parameters())
    with safe_open(str(ema_file), "pt") as f:
        count = int((f.metadata() or {}).get("count", -1))
        if count != len(params):
            sys.exit(f"error: {ema_file} holds {count} EMA tensors; the model has {len(params)} parameters")
        for i, p in enumerate(params):
            saved = f.get_tensor(f"shadow_params.{i}")
            if saved.shape != p.shape:
                sys.exit(
                    f"error: EMA tensor {i} has shape {tuple(saved.shape)}; the model's parameter has {tuple(p.shape)}"
                )
            p.data.copy_(saved)


if __name__ == "__main__":
    main()
