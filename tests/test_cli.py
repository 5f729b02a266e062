"""Smoke tests of every `mmx` command (CI runs them on every change)."""

import json
import subprocess
import sys

import pytest
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


def test_train_sample_eval_on_the_tiny_recipe(tmp_path):
    run = tmp_path / "run"
    result = runner.invoke(
        app, ["train", "configs/shapes_t2i_tiny.yaml", "train.max_steps=2", "train.validate_every=2", "--out", str(run)]
    )
    assert result.exit_code == 0, result.output
    assert "trained 2 steps" in result.output and (run / "model" / "unet" / "config.json").is_file()
    assert any((run / "logs").rglob("events.out.tfevents*")), "loss and learning rate go to tensorboard"
    result = runner.invoke(
        app,
        [
            "sample",
            str(run),
            "-p",
            "a red circle on the left",
            "-p",
            "a green square",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "s"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "grid.png").is_file() and (tmp_path / "s" / "001.png").is_file()
    result = runner.invoke(app, ["eval", str(run), "--num", "4", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "held-out caption accuracy" in result.output and (run / "eval" / "eval.json").is_file()
    assert "every cross-attention layer" in result.output and "by the held-out pair they name" in result.output
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert sum(total for _, total in report["accuracy_by_pair"].values()) >= report["num_prompts"] == 4
    assert len(report["drawn"]) == 4 and all(isinstance(text, str) for seen in report["drawn"] for text in seen)
    result = runner.invoke(app, ["eval", str(run), "--num", "4", "--steps", "2", "--max-downsample", "2"])
    assert result.exit_code == 0, result.output
    assert "at most 2x coarser" in result.output
    assert json.loads((run / "eval" / "eval.json").read_text())["attention_max_downsample"] == 2


def test_the_diffusers_unet_trains_with_attention_losses_and_evaluates_and_attends(tmp_path):
    run = tmp_path / "run"
    losses = "attention_losses=[{name: coverage, weight: 0.05}, {name: reading, weight: 0.1}]"
    args = ["configs/shapes_t2i_tiny.yaml", "model.name=diffusers_unet2d", losses, "train.max_steps=2"]
    result = runner.invoke(app, ["train", *args, "train.validate_every=2", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert json.loads((run / "model" / "unet" / "config.json").read_text())["_class_name"] == "UNet2DConditionModel"
    result = runner.invoke(app, ["eval", str(run), "--num", "4", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "held-out caption accuracy" in result.output and "attention mIoU" in result.output
    result = runner.invoke(
        app, ["attend", str(run), "-p", "a red circle", "--steps", "2", "--out", str(tmp_path / "a")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a" / "words.json").is_file()


def test_own_photos_with_free_form_captions_train_validate_save_sample_eval_and_attend(
    photo_folder, tmp_path, tiny_clip_file, inception_weights
):
    """The own-images config on a folder of real photos, through the command line as a user runs it."""
    run = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "train",
            "configs/imagefolder_t2i.yaml",
            f"data.root={photo_folder}",
            "image_size=[3, 16, 16]",
            "model.channels=[16, 32, 32]",
            "train.max_steps=4",
            "train.validate_every=2",
            "train.checkpoint_every=4",
            "train.progress=false",
            "diffusion.sample_steps=2",
            "eval.num_prompts=2",
            "--out",
            str(run),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "denoising_loss" in result.output and (run / "model" / "unet" / "config.json").is_file()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(r["denoising_loss"] > 0 for r in rows)
    assert (run / "samples" / "step_0000004.png").is_file()
    result = runner.invoke(
        app, ["sample", str(run), "-p", "a ginger cat asleep on a sofa", "--steps", "2", "--out", str(tmp_path / "s")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "s" / "grid.png").is_file()
    clip_name, clip_file, _ = tiny_clip_file
    metrics = (
        f"eval.metrics=[{{name: denoising_loss}}, "
        f"{{name: clip_score, model_name: {clip_name}, pretrained: {clip_file}}},"
        f" {{name: fid, weights: {inception_weights}}}]"
    )
    result = runner.invoke(app, ["eval", str(run), metrics])
    assert result.exit_code == 0, result.output
    for line in ("held-out denoising loss:", "CLIP score:", "FID:"):
        assert line in result.output
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["denoising_loss"] == pytest.approx(rows[-1]["denoising_loss"])  # the last validation's number
    assert len(report["clip_scores"]) == report["num_prompts"] == 2 and report["fid_images"] == 2
    assert (run / "eval" / "heldout_grid.png").is_file()
    result = runner.invoke(
        app, ["attend", str(run), "-p", "a ginger cat asleep on a sofa", "--steps", "2", "--out", str(tmp_path / "att")]
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "att" / "word_01_ginger.png").is_file()
    result = runner.invoke(app, ["eval", str(run), "train.max_steps=3"])
    assert result.exit_code == 2 and "changes only eval.* settings" in result.output


def test_train_refuses_a_data_size_that_differs_from_the_image_size(photo_folder, tmp_path):
    result = runner.invoke(
        app,
        [
            "train",
            "configs/imagefolder_t2i.yaml",
            f"data.root={photo_folder}",
            "data.size=64",
            "image_size=[3, 32, 32]",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2
    assert "data.size = 64 but image_size = [3, 32, 32]" in " ".join(result.output.split())
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_train_seed_fixes_the_initial_weights(tmp_path):
    """Two runs of one recipe and seed train the same model, whatever ran in the process before (the
    task builds the model before the trainer seeds its own generators); another seed trains another."""
    import torch

    from mmx.models import UNet2D

    def weights(name: str, *overrides: str) -> dict:
        torch.rand(7)  # the process's random state differs from run to run
        result = runner.invoke(
            app,
            [
                "train",
                "configs/shapes_t2i_tiny.yaml",
                "train.max_steps=1",
                "train.validate_every=100",
                *overrides,
                "--out",
                str(tmp_path / name),
            ],
        )
        assert result.exit_code == 0, result.output
        return UNet2D.from_pretrained(tmp_path / name / "model" / "unet").state_dict()

    first, again, other = weights("a"), weights("b"), weights("c", "train.seed=1")
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


def test_train_config_typo_lists_valid_keys(tmp_path):
    result = runner.invoke(app, ["train", "configs/shapes_t2i_tiny.yaml", "train.max_stepz=2", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "valid keys" in result.output and "train.max_steps" in result.output


def test_sample_from_a_folder_that_is_no_run(tmp_path):
    result = runner.invoke(app, ["sample", str(tmp_path), "-p", "a red circle"])
    assert result.exit_code == 2 and "config.yaml" in result.output


def test_demo_retrains_the_tiny_recipe_and_reports_accuracy(tmp_path):
    """`mmx demo --train` end to end on the tiny recipe (the shipped model is checked in test_demo_asset)."""
    result = runner.invoke(
        app,
        [
            "demo",
            "--train",
            "--config",
            "configs/shapes_t2i_tiny.yaml",
            "--num",
            "4",
            "--steps",
            "2",
            "--out",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "held-out caption accuracy" in result.output
    assert (tmp_path / "heldout_grid.png").is_file() and (tmp_path / "run" / "model" / "unet").is_dir()


def test_attend_writes_overlays_grid_and_word_statistics(tmp_path):
    run = tmp_path / "run"
    assert (
        runner.invoke(app, ["train", "configs/shapes_t2i_tiny.yaml", "train.max_steps=1", "--out", str(run)]).exit_code
        == 0
    )
    out = tmp_path / "att"
    result = runner.invoke(
        app, ["attend", str(run), "-p", "a red circle on the left", "--steps", "2", "--gif", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    import json

    stats = json.loads((out / "words.json").read_text())
    assert [w["word"] for w in stats["words"]] == ["a", "red", "circle", "on", "the", "left"]
    assert (out / "grid.png").is_file() and (out / "word_01_red.png").is_file() and (out / "word_01_red.gif").is_file()
    from PIL import Image

    Image.new("RGB", (20, 10), (255, 0, 0)).save(tmp_path / "real.png")
    result = runner.invoke(
        app,
        [
            "attend",
            str(run),
            "-p",
            "a red square in the middle",
            "--image",
            str(tmp_path / "real.png"),
            "--out",
            str(tmp_path / "att2"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "att2" / "word_01_red.png").is_file()
    result = runner.invoke(
        app,
        [
            "attend",
            str(run),
            "-p",
            "a red circle",
            "--steps",
            "2",
            "--max-downsample",
            "1",
            "--out",
            str(tmp_path / "att3"),
        ],
    )
    assert result.exit_code == 2 and "max_downsample=1 allows" in " ".join(result.output.split())


def test_shipped_demo_model_is_the_committed_recipe_and_runs(tmp_path):
    from mmx.cli.runs import DEMO_RUN
    from mmx.config import load_config
    from mmx.recipes.text_to_image import TextToImageConfig

    shipped = load_config(DEMO_RUN / "config.yaml", TextToImageConfig)
    assert shipped == load_config("configs/shapes_t2i.yaml", TextToImageConfig), (
        "the demo model must be the one configs/shapes_t2i.yaml trains (retrain and export it after a recipe change)"
    )
    result = runner.invoke(app, ["demo", "--num", "4", "--steps", "4", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "held-out caption accuracy" in result.output
    assert (tmp_path / "heldout_grid.png").is_file() and (tmp_path / "attention_0.png").is_file()


def test_policy_train_eval_attend(tmp_path):
    run = tmp_path / "policy"
    result = runner.invoke(app, ["train", "configs/policy_targets_tiny.yaml", "train.max_steps=2", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "model" / "policy.safetensors").is_file()
    result = runner.invoke(app, ["eval", str(run), "--num", "2", "--steps", "2"])
    assert result.exit_code == 0, result.output
    assert "success" in result.output and "latency" in result.output and (run / "eval" / "rollouts.png").is_file()
    out = tmp_path / "attend"
    result = runner.invoke(app, ["attend", str(run), "-p", "go to the red circle", "--out", str(out), "--steps", "2"])
    assert result.exit_code == 0, result.output
    for name in ("attention_steps.png", "attention_image.png", "scene.png", "attention.json"):
        assert (out / name).is_file(), name
    import json

    saved = json.loads((out / "attention.json").read_text())
    assert saved["instruction"] == "go to the red circle" and "red" in saved["columns"]
    result = runner.invoke(app, ["sample", str(run), "-p", "x"])
    assert result.exit_code == 2 and "policy run" in result.output


def test_seq2seq_translation_train_eval_attend(tmp_path):
    run = tmp_path / "translation"
    result = runner.invoke(app, ["train", "configs/seq2seq_translation_tiny.yaml", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "model" / "seq2seq" / "config.json").is_file() and (run / "model" / "tokenizer_source.json").is_file()
    result = runner.invoke(app, ["eval", str(run), "--num", "4", "--beam", "2"])
    assert result.exit_code == 0, result.output
    assert "exact match" in result.output and "alignment accuracy" in result.output
    report = json.loads((run / "eval" / "eval.json").read_text())
    assert report["num"] == 4 and report["decoding"] == "beam 2" and 0.0 <= report["exact_match"] <= 1.0
    out = tmp_path / "attend"
    result = runner.invoke(app, ["attend", str(run), "-p", "a red circle on the left", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "alignment.png").stat().st_size > 0
    words = json.loads((out / "words.json").read_text())
    assert words["source"] == "a red circle on the left"
    assert all(len(w["attention"]) == 6 and abs(sum(w["attention"]) - 1) < 1e-3 for w in words["words"])
    result = runner.invoke(app, ["attend", str(run), "-p", "a purple circle"])
    assert result.exit_code != 0 and "purple" in result.output


def test_seq2seq_captioning_train_eval_attend(tmp_path):
    run = tmp_path / "captioning"
    result = runner.invoke(app, ["train", "configs/seq2seq_captioning_tiny.yaml", "--out", str(run)])
    assert result.exit_code == 0, result.output
    assert not (run / "model" / "tokenizer_source.json").exists()
    result = runner.invoke(app, ["eval", str(run), "--num", "4"])
    assert result.exit_code == 0, result.output
    assert "exact match" in result.output and "attention mIoU" in result.output
    out = tmp_path / "attend"
    result = runner.invoke(app, ["attend", str(run), "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "grid.png").stat().st_size > 0
    assert json.loads((out / "words.json").read_text())["reference"].startswith("a ")
    result = runner.invoke(app, ["attend", str(run), "-p", "a red circle"])
    assert result.exit_code != 0 and "--image" in result.output


def test_seq2seq_config_needs_the_model_of_its_data(tmp_path):
    result = runner.invoke(
        app, ["train", "configs/seq2seq_captioning_tiny.yaml", "model.name=seq2seq", "--out", str(tmp_path)]
    )
    assert result.exit_code != 0 and "model.name: captioner" in result.output


def test_convert_refuses_a_pickled_checkpoint_unless_trusted(tmp_path):
    import types

    import torch

    from mmx.models import UNet1D

    torch.manual_seed(0)
    unet = UNet1D(input_dim=2, global_cond_dim=4, diffusion_step_embed_dim=16, down_dims=(16, 32)).eval()
    state = {f"model.{k}": v for k, v in unet.state_dict().items()}
    ckpt = tmp_path / "epoch=0100.ckpt"
    torch.save(
        {
            "cfg": types.SimpleNamespace(name="train_diffusion_unet_lowdim"),  # a pickled object, as upstream
            "state_dicts": {"model": state, "ema_model": state},
        },
        ckpt,
    )
    out = tmp_path / "unet1d"
    refused = runner.invoke(app, ["convert", str(ckpt), "--out", str(out)])
    assert refused.exit_code == 2 and "--trust-pickle" in refused.output and not out.exists()
    result = runner.invoke(app, ["convert", str(ckpt), "--out", str(out), "--trust-pickle"])
    assert result.exit_code == 0, result.output
    assert "(16, 32)" in result.output and "from_pretrained" in result.output
    x, t, g = torch.randn(1, 8, 2), torch.tensor([5]), torch.randn(1, 4)
    with torch.no_grad():
        assert torch.allclose(UNet1D.from_pretrained(out)(x, t, pooled=g), unet(x, t, pooled=g), atol=1e-6)
    again = runner.invoke(app, ["convert", str(ckpt), "--out", str(out), "--trust-pickle"])
    assert again.exit_code == 2 and "already exists" in again.output
    missing = runner.invoke(app, ["convert", str(tmp_path / "nope.ckpt"), "--out", str(tmp_path / "x")])
    assert missing.exit_code == 2 and "nope.ckpt" in missing.output
