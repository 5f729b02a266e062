"""Smoke run of scripts/bench_unet1d.py on a tiny config: it runs, checks equal outputs, and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "bench_unet1d.py"


def test_bench_unet1d_tiny_run_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--batch",
            "4",
            "--horizon",
            "8",
            "--down-dims",
            "16",
            "32",
            "--dsed",
            "16",
            "--global-cond-dim",
            "6",
            "--context-dim",
            "8",
            "--tokens",
            "3",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--json",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert [r["model"] for r in data["results"]] == ["upstream", "mmx", "mmx + cross-attn"]
    assert data["max_abs_diff"] < 1e-4 and data["max_abs_diff_xattn"] < 1e-4
    assert data["results"][0]["params_m"] == data["results"][1]["params_m"] < data["results"][2]["params_m"]
    assert all(r["fwd_bwd_ms"] > 0 and r["fwd_ms"] > 0 for r in data["results"])
