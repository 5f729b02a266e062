"""`mmx bench`: every suite runs (quick sizes) and reports finite, positive ratios; errors name the valid suites."""

import json
import math

import pytest
from typer.testing import CliRunner

from mmx.bench import ORDER, SUITES, Figure, resolve
from mmx.cli import app

runner = CliRunner()


def test_bench_all_quick_writes_every_suite_with_finite_ratios(tmp_path):
    out = tmp_path / "bench" / "all.json"
    result = runner.invoke(app, ["bench", "all", "--quick", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["errors"] == {}
    assert (
        list(data["suites"])
        == list(ORDER)
        == ["attention", "unet2d", "sample", "recorder", "unet1d", "decoding", "options", "scaling"]
    )
    for name, suite in data["suites"].items():
        assert suite["figures"], f"{name} reported no figures"
        for figure in suite["figures"]:
            assert math.isfinite(figure["ratio"]) and figure["ratio"] > 0, (name, figure)
            assert figure["ratio"] == pytest.approx(figure["value"] / figure["other"])
    meta = data["meta"]
    for key in ("date", "device", "torch", "diffusers", "peak_memory_method"):
        assert meta[key], key
    assert meta["quick"] is True and meta["device"].startswith("cpu")
    # The scaling PNGs land next to the JSON; the table names device and versions.
    assert sorted(p.name for p in out.parent.glob("*.png")) == ["scaling_unet1d.png", "scaling_unet2d.png"]
    assert data["suites"]["scaling"]["details"]["unet2d"]["points"][0]["peak_mib"] is not None
    # options: every option against fp32 (UNet1D has no channels_last); TF32 is a note on the CPU, not a figure.
    options = data["suites"]["options"]
    labels = [f["label"] for f in options["figures"]]
    for option in (
        "gradient checkpointing step",
        "gradient checkpointing peak memory",
        "torch.compile step (steady)",
        "torch.compile compile time",
        "bf16 autocast step",
    ):
        assert sum(option in label for label in labels) == 2, option
    assert sum("channels_last" in label for label in labels) == 1
    assert not any("TF32" in label for label in labels) and "TF32: not applicable on the CPU" in options["notes"][0]
    assert set(options["details"]["unet2d"]["variants"]) == {
        "fp32",
        "gradient checkpointing",
        "channels_last",
        "torch.compile",
        "bf16 autocast",
    }
    assert "diffusers" in result.output and "ratio" in result.output


def test_bench_unknown_suite_lists_the_valid_ones():
    result = runner.invoke(app, ["bench", "speed"])
    assert result.exit_code == 2
    assert "unknown benchmark suite 'speed'" in result.output
    for name in (*ORDER, "all"):
        assert name in result.output


def test_bench_unknown_device_is_refused():
    result = runner.invoke(app, ["bench", "unet1d", "--device", "tpu"])
    assert result.exit_code == 2 and "valid devices: cpu, cuda" in result.output


def test_registry_and_ratio():
    by_name_only = ["trace", "training", "latency", "fsdp"]
    assert sorted([*ORDER, *by_name_only]) == SUITES.names()
    assert resolve("gpu") == [*ORDER, "training", "latency", "fsdp"]
    assert resolve("all") == list(ORDER) and resolve(["unet1d", "unet1d"]) == ["unet1d"]
    assert resolve(["trace"]) == ["trace"]
    with pytest.raises(KeyError, match="valid names"):
        resolve(["unet1d", "nope"])
    figure = Figure("step", 2.0, "other", 4.0, "ms")
    assert figure.ratio == 0.5 and math.isnan(Figure("x", 1.0, "y", 0.0, "ms").ratio)


def test_bench_trace_quick_compares_tracing_with_no_tracing_and_full_maps(tmp_path):
    out = tmp_path / "trace.json"
    result = runner.invoke(app, ["bench", "trace", "--quick", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["errors"] == {} and list(data["suites"]) == ["trace"]
    suite = data["suites"]["trace"]
    assert [f["alternative"] for f in suite["figures"]] == ["untraced", "full maps", "full maps", "untraced"]
    for case in ("sd15", "flux"):
        details = suite["details"][case]
        assert details["identical"] is True  # tracing reads the attention, it does not change the output
        # both record the same layer-steps; full maps keep them whole, tracing keeps one running sum
        assert details["traced_layer_steps"] == details["full_layer_steps"] > 0
        assert 0 < details["trace_sum_mib"] < details["full_kept_mib"]
    flux = suite["details"]["flux"]
    assert flux["traced_layer_steps"] == 2  # one double- and one single-stream block, one step


def test_bench_gpu_without_cuda_says_so_in_one_line_and_fails(monkeypatch):
    monkeypatch.setattr("mmx.cli.tools.torch_cuda_available", lambda: False)
    result = runner.invoke(app, ["bench", "gpu"])
    assert result.exit_code == 1
    assert result.output.strip() == "mmx bench gpu needs a CUDA GPU, and torch sees none on this machine"


def test_bench_options_of_the_gpu_command_are_checked(tmp_path):
    result = runner.invoke(app, ["bench", "unet1d", "--results", str(tmp_path / "r.md")])
    assert result.exit_code == 2 and "goes with `mmx bench gpu`" in " ".join(result.output.split())
    result = runner.invoke(app, ["bench", "unet1d", "--peak-tflops", "0"])
    assert result.exit_code == 2 and "--peak-tflops must be a positive number" in result.output


def test_bench_training_and_latency_quick_write_their_figures_and_details(tmp_path):
    out = tmp_path / "gpu.json"
    result = runner.invoke(app, ["bench", "training", "--quick", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    training = json.loads(out.read_text())["suites"]["training"]
    row = training["details"]["throughput"][0]
    assert row["batch"] == 8 and row["samples_per_s"] > 0 and row["flops_per_step"] > 1e8
    assert row["mfu"] is None and training["details"]["peak_source"] == "CPU: no peak"  # no bf16 peak for a CPU
    backends = training["details"]["sdpa_backends"]
    assert backends and all(b["backend"] == "flash (CPU)" and b["dtype"] == "bfloat16" for b in backends)
    assert training["details"]["host_syncs"]["per_step"] is None  # nothing to sync with on a CPU
    reach = training["details"]["time_to_accuracy"]
    assert reach["steps"] == 4 and [v["step"] for v in reach["validations"]] == [2, 4]
    result = runner.invoke(app, ["bench", "latency", "--quick", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    latency = json.loads(out.read_text())["suites"]["latency"]
    assert list(latency["details"]["modes"]) == ["eager"] and latency["details"]["modes"]["eager"]["steps"] == 16
    assert latency["figures"][-1]["alternative"] == "target" and latency["figures"][-1]["other"] == 5.0


def test_bench_fsdp_off_cuda_says_it_did_not_run():
    import torch

    from mmx.bench.gpu import fsdp_suite

    result = fsdp_suite(torch.device("cpu"))
    assert result.figures == [] and result.notes[0].startswith(
        "not run: Accelerate shards models with FSDP on GPUs only"
    )


def test_the_gpu_section_of_the_results_page_is_replaced_whole(tmp_path):
    from mmx.bench import run_suites
    from mmx.bench.gpu import BEGIN, END, results_section, write_section

    report = run_suites(["latency"], "cpu", quick=True, command="mmx bench gpu")
    text = results_section(report)
    assert "| latency | policy chunk latency, eager |" in text and "Measured by `mmx bench gpu` on cpu" in text
    page = tmp_path / "results.md"
    page.write_text(f"# Results\n\n## GPU\n\n{BEGIN}\nNo GPU has been lent yet.\n{END}\n\n## Next\n")
    write_section(page, text)
    written = page.read_text()
    assert "No GPU has been lent yet" not in written and text in written and written.endswith("## Next\n")
    write_section(page, "second run")  # a rerun replaces the section again
    assert page.read_text().count(BEGIN) == 1 and "second run" in page.read_text() and text not in page.read_text()
    other = tmp_path / "other.md"
    other.write_text("# no markers\n")
    with pytest.raises(ValueError, match="has no GPU section: add the lines"):
        write_section(other, text)
    assert other.read_text() == "# no markers\n" and not list(tmp_path.glob(".*.tmp"))


def test_trainer_syncs_count_only_steps_5_to_8_per_step(tmp_path, monkeypatch):
    """A loss that syncs once a step reads as 1 sync a step: setup, steps 1-4 and 9-10 are not counted."""
    import warnings

    import torch

    from mmx.bench import gpu

    mode = [0]  # CUDA's sync debug mode, stood in for on a CPU
    monkeypatch.setattr(torch.cuda, "set_sync_debug_mode", lambda m: mode.__setitem__(0, m))
    monkeypatch.setattr(torch.cuda, "get_sync_debug_mode", lambda: mode[0])
    real_task = gpu._task

    def task_whose_loss_syncs(*args):
        cfg, task = real_task(*args)
        loss = task.loss

        def syncing_loss(*a, **k):
            if mode[0] == "warn":
                warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)
            return loss(*a, **k)

        task.loss = syncing_loss
        return cfg, task

    monkeypatch.setattr(gpu, "_task", task_whose_loss_syncs)
    overrides = ["train.progress=false", "train.tensorboard=false", "train.max_steps=10", "train.validate_every=1000"]
    syncs = gpu.trainer_syncs("shapes_t2i_tiny.yaml", overrides, tmp_path, torch.device("cuda"))
    assert syncs["per_step"] == 1.0 and sum(syncs["sites"].values()) == 4, syncs
    assert all(site.startswith("train/trainer.py:") for site in syncs["sites"]) and mode[0] == 0
    assert gpu.trainer_syncs("shapes_t2i_tiny.yaml", overrides, tmp_path, torch.device("cpu"))["per_step"] is None
