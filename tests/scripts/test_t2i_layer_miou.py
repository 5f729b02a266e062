"""scripts/t2i_layer_miou.py on the shipped demo model: one row per layer plus one per max_downsample."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]


def test_layer_miou_of_the_demo_model(tmp_path):
    out = tmp_path / "layers.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "t2i_layer_miou.py"), str(ROOT / "mmx" / "assets" / "shapes_t2i"),
         "--num", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    layers = [r for r in rows if r["grid"]]
    assert len(layers) == 7 and {r["grid"] for r in layers} == {"8x8", "4x4"}  # the recipe: 2x2 patches, 32x32
    assert [r["layers"] for r in rows if not r["grid"]] == ["max_downsample=4 (3 layers)", "max_downsample=8 (7 layers)"]
    assert all(0.0 <= r["miou"] <= 1.0 for r in rows)
