"""Smoke run of scripts/bench_decoding.py on tiny models: it checks identical outputs and writes its JSON."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "scripts" / "bench_decoding.py"


def test_bench_decoding_tiny_run_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--batch",
            "2",
            "--tokens",
            "5",
            "--beam",
            "2",
            "--d-model",
            "16",
            "--heads",
            "2",
            "--layers",
            "1",
            "--image-size",
            "32",
            "--warmup",
            "0",
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
    rows = json.loads(out.read_text())["results"]
    assert [(r["model"], r["search"]) for r in rows] == [
        ("translation", "greedy"),
        ("translation", "beam 2"),
        ("captioning", "greedy"),
        ("captioning", "beam 2"),
    ]
    assert all(r["identical"] and r["cached_ms"] > 0 and r["speedup"] > 0 for r in rows)
    assert rows[0]["tokens_generated"] == 5
