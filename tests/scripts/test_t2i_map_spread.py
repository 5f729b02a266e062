"""scripts/t2i_map_spread.py on the shipped demo model: a table row and JSON figures per word kind."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_map_spread_of_the_demo_model(tmp_path):
    out = tmp_path / "spread.json"
    run = str(ROOT / "mmx" / "assets" / "shapes_t2i")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "t2i_map_spread.py"), run, "--num", "4",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    kinds = json.loads(out.read_text())[run]
    assert set(kinds) == {"colour", "shape"}
    for row in kinds.values():
        assert set(row) == {"iou@0.3", "iou@0.4", "iou@0.5", "iou@0.6", "area_over_mask", "inside_over_outside",
                            "pointing"}
        assert all(0.0 <= row[k] <= 1.0 for k in row if k.startswith("iou") or k == "pointing")
        assert row["area_over_mask"] > 0 and row["inside_over_outside"] > 1  # the demo model's words find their objects
    assert f"| {run} | colour |" in proc.stdout
