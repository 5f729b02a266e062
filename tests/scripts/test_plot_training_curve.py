"""scripts/plot_training_curve.py: a table per run, the first step at the target, one PNG with a line per run."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def _run(tmp_path: Path, name: str, accuracies: list[float]) -> Path:
    run = tmp_path / name
    run.mkdir()
    rows = [
        {"step": 100 * (i + 1), "train_seconds": 60.0 * (i + 1), "caption_accuracy": a}
        for i, a in enumerate(accuracies)
    ]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_two_runs_one_picture(tmp_path):
    a, b = _run(tmp_path, "seed0", [0.3, 0.95]), _run(tmp_path, "seed1", [0.2, 0.5])
    out = tmp_path / "curve.png"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plot_training_curve.py"), str(a), str(b), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| 200 | 2.0 | 95.0% |" in proc.stdout and "first >= 90%: step 200 after 2.0 min" in proc.stdout
    assert "first >= 90%: not reached" in proc.stdout  # seed1
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_run_without_metrics_is_named(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "plot_training_curve.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and f"{tmp_path / 'metrics.jsonl'} not found" in proc.stderr
