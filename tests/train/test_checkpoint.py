"""Crash-safe checkpoints: SIGKILL and resume, manifests, corrupt and unsafe checkpoints, retention, config.yaml."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmx.train import TrainConfig, latest_checkpoint, train
from mmx.train.checkpoint import MANIFEST, CheckpointError, _write_manifest, verify_checkpoint

SCRIPTS = Path(__file__).parents[2] / "scripts"
sys.path.insert(0, str(SCRIPTS))
from kill_resume import TinyTask  # noqa: E402  the harness's task: an MLP with dropout and input noise


def _cfg(**changes) -> TrainConfig:
    base = dict(
        max_steps=4,
        batch_size=8,
        lr=1e-2,
        warmup_steps=1,
        checkpoint_every=2,
        checkpoints_total_limit=None,
        validate_every=1000,
        log_every=2,
        progress=False,
        tensorboard=False,
        ema=False,
    )
    return TrainConfig(**{**base, **changes})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A run of 4 steps with complete checkpoints at steps 2 and 4."""
    run = tmp_path_factory.mktemp("finished")
    train(TinyTask(), _cfg(), run)
    return run


@pytest.fixture
def run(finished_run, tmp_path) -> Path:
    """A copy of the finished run to damage."""
    shutil.copytree(finished_run, tmp_path / "run")
    return tmp_path / "run"


def _steps_run(run_dir, resume, **changes) -> list[int]:
    steps: list[int] = []
    train(TinyTask(), _cfg(**changes), run_dir, resume=resume, on_step=lambda s, l: steps.append(s))
    return steps


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_kill_and_resume_fast_slice(tmp_path):
    """3 SIGKILLs (save, train, save phase) in one training; the result is bit-identical to an uninterrupted run."""
    out = tmp_path / "kill_resume.json"
    command = [sys.executable, str(SCRIPTS / "kill_resume.py"), "--points", "3", "--no-ema", "--json", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and result["kill_points"] == 3 and result["save_phase"] == 2
    assert all(c["weights_identical"] and c["losses_identical"] for c in result["chains"])
    assert not any(p["bad"] for p in result["points"]), "no step_N folder may fail its manifest after a kill"


def test_the_manifest_lists_every_file_with_its_size_and_sha256(finished_run):
    folder = finished_run / "checkpoints" / "step_0000004"
    manifest = json.loads((folder / MANIFEST).read_text())
    on_disk = {p.name for p in folder.iterdir()} - {MANIFEST}
    assert manifest["step"] == 4 and set(manifest["files"]) == on_disk
    expected = {"model.safetensors", "optimizer.bin", "scheduler.bin", "random_states_0.pkl", "mmx_state_0.safetensors"}
    assert expected <= on_disk
    assert all(
        info["size"] == (folder / name).stat().st_size and len(info["sha256"]) == 64
        for name, info in manifest["files"].items()
    )
    assert not list((finished_run / "checkpoints").glob("*.tmp")), "no temporary folder stays behind"


def _truncate(folder):
    data = (folder / "optimizer.bin").read_bytes()
    (folder / "optimizer.bin").write_bytes(data[: len(data) // 2])


def _same_size_garbage(folder):
    size = (folder / "model.safetensors").stat().st_size
    (folder / "model.safetensors").write_bytes(b"\x00" * size)


def _escape_the_folder(folder):
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["../../secret"] = {"size": 1, "sha256": "0" * 64}
    (folder / MANIFEST).write_text(json.dumps(manifest))


DAMAGE = {
    "truncated": (_truncate, r"optimizer\.bin has \d+ bytes; mmx_checkpoint\.json says \d+"),
    "missing file": (lambda f: (f / "scheduler.bin").unlink(), r"scheduler\.bin is missing"),
    "garbage weights": (
        lambda f: (f / "model.safetensors").write_bytes(b"not a safetensors file"),
        r"model\.safetensors has 22 bytes",
    ),
    "same-size garbage": (_same_size_garbage, r"model\.safetensors is corrupt: its sha256 differs"),
    "no manifest": (lambda f: (f / MANIFEST).unlink(), r"mmx_checkpoint\.json is missing"),
    "bad manifest": (lambda f: (f / MANIFEST).write_text("{"), r"mmx_checkpoint\.json is not a valid"),
    "manifest leaves the folder": (_escape_the_folder, r"mmx_checkpoint\.json is not a valid .*outside the folder"),
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_an_explicitly_resumed_damaged_checkpoint_is_an_error_naming_the_file(run, damage):
    harm, message = DAMAGE[damage]
    folder = run / "checkpoints" / "step_0000004"
    harm(folder)
    with pytest.raises(CheckpointError, match=message):
        train(TinyTask(), _cfg(max_steps=6), run, resume=folder)
    expected = "step_0000004" if damage == "same-size garbage" else "step_0000002"
    assert latest_checkpoint(run).name == expected, (
        "latest_checkpoint checks sizes; resuming also checks the sha256 sums"
    )


def test_resume_latest_falls_back_to_the_previous_good_checkpoint_with_a_warning(run, finished_run, caplog):
    _truncate(run / "checkpoints" / "step_0000004")
    with caplog.at_level(logging.WARNING, logger="mmx.train.trainer"):
        steps = _steps_run(run, "latest")
    assert steps == [3, 4], "resumed from step 2"
    warning = next(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "skipping" in warning and "step_0000004" in warning and "optimizer.bin has" in warning
    assert _same_weights(run / "checkpoints" / "step_0000004", finished_run / "checkpoints" / "step_0000004"), (
        "redoing steps 3-4 from step 2 gives the same weights"
    )


def test_resume_latest_with_no_good_checkpoint_starts_from_scratch_with_a_warning(run, caplog):
    for step in (2, 4):
        (run / "checkpoints" / f"step_{step:07d}" / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="mmx.train.trainer"):
        steps = _steps_run(run, "latest")
    assert steps == [1, 2, 3, 4]
    assert any("no complete checkpoint" in r.getMessage() for r in caplog.records)


def test_leftovers_of_a_killed_save_are_never_resumed_and_are_removed_by_the_next_save(run):
    checkpoints = run / "checkpoints"
    shutil.copytree(checkpoints / "step_0000004", checkpoints / "step_0000006.tmp")  # killed before the rename
    shutil.copytree(checkpoints / "step_0000002", checkpoints / "step_0000002.trash")  # killed while pruning
    assert latest_checkpoint(run).name == "step_0000004"
    assert _steps_run(run, "latest", max_steps=6) == [5, 6]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000002", "step_0000004", "step_0000006"]


def test_the_retention_limit_never_deletes_the_only_good_checkpoint(tmp_path):
    """A damaged folder newer than the run (here: a step_N without manifest) is neither counted nor removed."""
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    (checkpoints / "step_0000099").mkdir()
    (checkpoints / "step_0000099" / "model.safetensors").write_bytes(b"half")
    train(TinyTask(), _cfg(checkpoints_total_limit=1), tmp_path)
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step_0000004", "step_0000099"]
    verify_checkpoint(checkpoints / "step_0000004")
    assert latest_checkpoint(tmp_path).name == "step_0000004"


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').close()",))


@pytest.mark.parametrize("name", ["optimizer.bin", "scheduler.bin", "random_states_0.pkl"])
def test_resume_never_unpickles_code_even_with_a_matching_manifest(run, tmp_path, name):
    folder = run / "checkpoints" / "step_0000004"
    marker = tmp_path / "payload_ran"
    content = torch.load(folder / name, weights_only=False)
    content["extra"] = _Payload(marker)
    torch.save(content, folder / name)
    (folder / MANIFEST).unlink()
    _write_manifest(folder, 4)  # whoever changed the file also rewrote the manifest
    refused = rf"{name} (holds objects other than tensors|cannot be loaded with weights_only)"
    with pytest.raises(CheckpointError, match=refused):
        train(TinyTask(), _cfg(max_steps=6), run, resume=folder)
    assert not marker.exists(), "the pickled code ran"


def test_config_yaml_is_written_atomically(tmp_path, monkeypatch):
    """A write that dies halfway leaves the previous config.yaml whole (temporary file + os.replace);
    `mmx train` reports the failure naming the file."""
    from typer.testing import CliRunner

    from mmx.cli import app

    (tmp_path / "config.yaml").write_text("previous: config\n")
    real_write = Path.write_text

    def dies_halfway(self, data, *args, **kwargs):
        real_write(self, data[: len(data) // 2], *args, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(Path, "write_text", dies_halfway)
    result = CliRunner().invoke(app, ["train", "configs/shapes_t2i_tiny.yaml", "--out", str(tmp_path)])
    monkeypatch.undo()
    output = " ".join(result.output.split())  # rich wraps long lines
    assert result.exit_code != 0 and "config.yaml" in output and "disk full" in output
    assert (tmp_path / "config.yaml").read_text() == "previous: config\n"
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]  # no temporary file left behind
