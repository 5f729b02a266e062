"""Smoke run of scripts/eval_t2i_sampling.py on the shipped demo model with two captions."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_eval_t2i_sampling_scores_every_setting(tmp_path):
    out = tmp_path / "settings.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "eval_t2i_sampling.py"), str(ROOT / "mmx" / "assets" / "shapes_t2i"),
         "--num", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["num_prompts"] == 2 and len(data["results"]) == 5
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in data["results"])
