"""scripts/t2i_by_pair.py: per-pair accuracy and the captions clear of channel gaps, from an eval folder."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).parents[2]
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "t2i_by_pair.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env=ENV)


def test_by_pair_splits_the_verdicts_and_counts_captions_clear_of_channel_gaps(tmp_path):
    run = tmp_path / "run"
    (run / "ev").mkdir(parents=True)
    config = yaml.safe_load((ROOT / "mmx" / "assets" / "shapes_t2i" / "config.yaml").read_text())
    config["eval"]["data"]["heldout_colour_shape"] = [["red", "triangle"], ["blue", "circle"]]  # B: a channel gap
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    prompts = ["a blue circle on the left", "a red triangle on the left and a green square at the top",
               "there is a red circle at the top"]
    (run / "ev" / "eval.json").write_text(json.dumps({"prompts": prompts, "correct": [False, True, True]}))
    proc = _run(run / "ev")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "blue circle 0/1" in proc.stdout and "red triangle 1/1" in proc.stdout
    assert "circle at the top 1/1" in proc.stdout and "square at the bottom 0/0" in proc.stdout
    assert "2/2 (100.0%) without a channel-gap pair [blue circle (B)]" in proc.stdout


def test_by_pair_names_a_missing_eval_json(tmp_path):
    proc = _run(tmp_path / "nowhere")
    assert proc.returncode != 0 and "nowhere/eval.json not found" in proc.stderr


def test_by_pair_misses_tell_what_was_drawn_in_place_of_each_heldout_object(tmp_path):
    run = tmp_path / "run"
    (run / "ev").mkdir(parents=True)
    (run / "config.yaml").write_text((ROOT / "mmx" / "assets" / "shapes_t2i" / "config.yaml").read_text())
    prompts = ["a green circle on the left", "a red circle at the top and a blue square on the right",
               "a green circle at the top", "a red triangle on the left"]
    drawn = [["green triangle left"], ["red triangle top", "blue square right"], ["green circle top"], []]
    report = {"prompts": prompts, "correct": [False, False, True, False], "drawn": drawn}
    (run / "ev" / "eval.json").write_text(json.dumps(report))
    proc = _run(run / "ev", "--misses")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "green circle, drawn instead: green triangle 1\n" in proc.stdout  # the right one is not counted
    assert "circle at the top, drawn instead: red triangle 1\n" in proc.stdout
    assert "red triangle, drawn instead: nothing 1\n" in proc.stdout
    assert "square at the bottom, drawn instead: none" in proc.stdout
    del report["drawn"]  # an eval.json from before the detector's reading was kept
    (run / "ev" / "eval.json").write_text(json.dumps(report))
    proc = _run(run / "ev", "--misses")
    assert proc.returncode != 0 and "has no 'drawn' list" in proc.stderr
