"""Smoke tests of every `mmx` command (CI runs them on every change)."""

import subprocess
import sys

from typer.testing import CliRunner

from mmx.cli import app

runner = CliRunner()


def test_console_script_help_lists_commands():
    out = subprocess.run([sys.executable, "-m", "mmx.cli", "--help"], capture_output=True, text=True, check=True)
    assert "info" in out.stdout and "encode" in out.stdout


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and "mmx 0." in result.output


def test_info_shows_versions_device_and_encoders():
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    for word in ("torch", "device", "clip", "hf", "resnet"):
        assert word in result.output


def test_encode_shows_word_spans(minilm_path):
    result = runner.invoke(app, ["encode", "--encoder", "hf", "--model", minilm_path, "a photorealistic circle"])
    assert result.exit_code == 0, result.output
    assert "photorealistic" in result.output and "real tokens" in result.output


def test_encode_unknown_encoder_lists_valid_names():
    result = runner.invoke(app, ["encode", "--encoder", "nope", "--model", "x", "hello"])
    assert result.exit_code == 2
    assert "valid names" in result.output and "clip" in result.output


def test_encode_from_a_config_file():
    result = runner.invoke(app, ["encode", "--config", "configs/encoders/minilm.yaml", "a red circle"])
    assert result.exit_code == 0, result.output
    assert "(1, 5, 384)" in result.output  # [CLS] a red circle [SEP], MiniLM width 384


def test_encode_missing_config_names_the_path():
    result = runner.invoke(app, ["encode", "--config", "configs/nope.yaml", "hello"])
    assert result.exit_code == 2 and "configs/nope.yaml" in result.output
