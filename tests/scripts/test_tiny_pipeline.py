"""scripts/tiny_pipeline.py: a saved tiny pipeline that `mmx attend --pipeline` reads, as its docstring says."""

import json
import os
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from mmx.cli import app

ROOT = Path(__file__).parents[2]
SCRIPT = str(ROOT / "scripts" / "tiny_pipeline.py")


def _run(*args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(
        [sys.executable, SCRIPT, *map(str, args)], capture_output=True, text=True, timeout=300, env=env
    )


def test_a_saved_tiny_flux_pipeline_is_traced_by_mmx_attend(tmp_path):
    folder = tmp_path / "flux"
    result = _run("flux", folder)
    assert result.returncode == 0, result.stderr
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "FluxPipeline"
    out = tmp_path / "maps"
    result = CliRunner().invoke(
        app,
        ["attend", "--pipeline", str(folder), "-p", "a red cat on a mat", "--height", "32", "--width", "48",
         "--steps", "4", "--gif", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    words = json.loads((out / "words.json").read_text())
    assert "cat" in json.dumps(words)
    assert any(p.suffix == ".gif" for p in out.iterdir()) and (out / "grid_p0_i0.png").is_file()


def test_a_folder_in_use_and_an_unknown_family_are_refused(tmp_path):
    (tmp_path / "used").mkdir()
    (tmp_path / "used" / "keep.txt").write_text("mine")
    result = _run("sd", tmp_path / "used")
    assert result.returncode == 2 and "exists and is not empty" in result.stderr
    assert (tmp_path / "used" / "keep.txt").read_text() == "mine"
    result = _run("kandinsky", tmp_path / "new")
    assert result.returncode == 2 and "invalid choice: 'kandinsky'" in result.stderr
