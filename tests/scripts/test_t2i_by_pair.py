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
