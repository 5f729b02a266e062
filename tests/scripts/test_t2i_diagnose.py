"""scripts/t2i_diagnose.py on the shipped demo model: every report is filled and consistent."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
sys.path.insert(0, str(ROOT / "scripts"))


def test_object_kinds_follow_the_held_out_pairs():
    from t2i_diagnose import object_kind

    from mmx.eval import Claim

    cs, sp = (("blue", "circle"),), (("circle", "top"),)
    assert object_kind(Claim("blue", "circle", "left"), cs, sp) == "held-out colour-shape"
    assert object_kind(Claim("red", "circle", "top"), cs, sp) == "held-out shape-position"
    assert object_kind(Claim("red", "circle", "left"), cs, sp) == "seen"


def test_guidance_intervals_are_parsed_or_named_in_the_error():
    import pytest
    from t2i_diagnose import parse_interval

    assert parse_interval("all") is None and parse_interval("0-250") == (0.0, 250.0)
    with pytest.raises(SystemExit, match="LOW-HIGH timesteps, e.g. 0-250; got 'late'"):
        parse_interval("late")


def test_diagnose_the_demo_model(tmp_path):
    out = tmp_path / "diagnose.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "t2i_diagnose.py"), str(ROOT / "mmx" / "assets" / "shapes_t2i"),
         "--num", "3", "--scales", "1,3", "--intervals", "all,0-250", "--data-seed", "2", "--per-pair", "1",
         "--json", str(out)],
        capture_output=True, text=True, timeout=600, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads(out.read_text())
    heldout, train = data["splits"]["heldout"], data["splits"]["train"]
    assert [r["guidance"] for r in heldout] == [1.0, 3.0, 1.0, 3.0] and len(train) == 1
    assert [r["interval"] for r in heldout] == [None, None, [0.0, 250.0], [0.0, 250.0]] and data["data"]["seed"] == 2
    for row in heldout + train:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["attention_miou"] <= 1.0
        right, total = zip(*(map(int, v.split("/")) for v in row["objects_right"].values()))
        assert sum(total) >= 3 and all(r <= t for r, t in zip(right, total))
    assert "held-out colour-shape" in heldout[0]["objects_right"] or "held-out shape-position" in heldout[0]["objects_right"]
    assert "held-out colour-shape" not in train[0]["objects_right"]
    assert len(data["pairs"]) == 12 and all(sum(read.values()) == 1 for read in data["pairs"].values())
    assert "blue circle" in proc.stdout
