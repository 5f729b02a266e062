"""scripts/checkpoint_to_run.py: a checkpoint's EMA (or raw) weights become a run folder equal to the finished run."""

import os
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).parents[2]
SCRIPT = str(ROOT / "scripts" / "checkpoint_to_run.py")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


def test_last_checkpoint_gives_the_finished_model(tmp_path):
    from typer.testing import CliRunner

    from mmx.cli import app
    from mmx.recipes import load_run

    run = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "train",
            str(ROOT / "configs" / "shapes_t2i_tiny.yaml"),
            "train.max_steps=2",
            "train.checkpoint_every=2",
            "--out",
            str(run),
        ],
    )
    assert result.exit_code == 0, result.output
    proc = _run(run / "checkpoints" / "step_0000002", "--out", tmp_path / "at2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    finished = load_run(run).model
    converted = load_run(tmp_path / "at2").model
    for (name, a), (_, b) in zip(finished.unet.state_dict().items(), converted.unet.state_dict().items()):
        assert torch.equal(a, b), name
    again = _run(run / "checkpoints" / "step_0000002", "--out", tmp_path / "at2")
    assert again.returncode != 0 and "exists" in again.stderr
    missing = _run(tmp_path / "nothing", "--out", tmp_path / "x")
    assert missing.returncode != 0 and "mmx_ema.safetensors not found" in missing.stderr
    raw = _run(run / "checkpoints" / "step_0000002", "--out", tmp_path / "raw", "--weights", "raw")
    assert raw.returncode == 0, raw.stderr[-2000:]
    from safetensors.torch import load_file

    optimised = load_file(str(run / "checkpoints" / "step_0000002" / "model.safetensors"))
    converted = load_run(tmp_path / "raw").model
    state = converted.unet.state_dict()
    assert all(torch.equal(state[name], value) for name, value in optimised.items())
    assert any(not torch.equal(state[name], value) for name, value in finished.unet.state_dict().items())  # not the EMA
