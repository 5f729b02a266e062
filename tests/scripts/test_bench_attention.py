"""Smoke run of scripts/bench_attention.py: it runs, checks equal outputs, and writes its JSON."""

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "bench_attention.py"


def test_bench_attention_quick_run_writes_results(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--repeats", "1", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    impls = {r["impl"] for r in data["results"]}
    assert impls == {"a", "b", "c", "d"}
    assert all(r["max_abs_diff_vs_a"] < 1e-4 for r in data["results"]), "all four must compute the same attention"
    assert len(data["targets"]) == 8
    big = [r for r in data["results"] if r["peak_fwd_mib"] is not None]
    assert big and all(r["peak_fwd_mib"] >= 0 for r in big)
