"""FSDP2: the trainer under Accelerate's FSDP saves, resumes and trains as DDP does (mmx.train.fsdp).

Two kinds of launch, both two gloo processes on the CPU:

* torch's own ``fully_shard`` and mmx's :class:`~mmx.train.fsdp.FullModel` alone (``_fsdp_worker.py``):
  the gathered model equals one process trained on the whole batch;
* ``mmx train`` under ``accelerate launch --config_file configs/accelerate/fsdp_4gpu.yaml``
  (``_accelerate_fsdp_worker.py``). Accelerate makes FSDP only from GPU process groups, so the worker
  turns its CPU state into the FSDP state a GPU launch makes (see its docstring); the rest, Accelerate's
  sharding, ``save_state`` and ``load_state`` and mmx's trainer, runs as it does on GPUs. Trained 4
  steps, resumed to 6, it ends where a 2-process DDP run of 6 steps ends: both average the same
  gradients, and the noise generators are seeded per process alike.

The resumed comparison uses a constant LR: a cosine schedule depends on ``max_steps``, which the
first run (4) and the reference (6) do not share.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.train.test_trainer_distributed import ROOT, _clean_env, _failure, _free_port, _run, _torchrun, needs_gloo

WORKER = Path(__file__).with_name("_fsdp_worker.py")
ACCELERATE_WORKER = Path(__file__).with_name("_accelerate_fsdp_worker.py")
TRAIN = [
    "train", str(ROOT / "configs/shapes_t2i_tiny.yaml"), "train.ema=false", "train.checkpoint_every=2",
    "train.lr_schedule=constant", "train.progress=false", "train.tensorboard=false",
]  # fmt: skip
WEIGHTS = "model/unet/diffusion_pytorch_model.safetensors"


@needs_gloo
def test_the_gathered_model_equals_one_process_training_on_the_whole_batch(tmp_path):
    from safetensors.torch import load_file

    from mmx.models import UNet1D

    done = _run(_torchrun(2, str(WORKER), str(tmp_path)), _clean_env(cpu_flag=True))
    if done.returncode != 0:
        pytest.fail(_failure(done))
    gathered = load_file(tmp_path / "gathered.safetensors")
    reference = load_file(tmp_path / "reference.safetensors")
    assert gathered.keys() == reference.keys() and len(gathered) > 10
    for key in gathered:
        torch.testing.assert_close(gathered[key], reference[key], atol=1e-5, rtol=1e-4, msg=key)
    torch.manual_seed(0)
    start = UNet1D(input_dim=2, down_dims=(16, 32), diffusion_step_embed_dim=16, kernel_size=3, n_groups=4).state_dict()
    assert any(not torch.equal(gathered[k], start[k]) for k in gathered)  # training moved the weights
    saved = UNet1D.from_pretrained(str(tmp_path / "saved"))
    for key, value in saved.state_dict().items():
        assert torch.equal(value, gathered[key]), key


def test_without_fsdp_the_unwrapped_model_is_used_and_nothing_is_copied():
    from types import SimpleNamespace

    from mmx.train.fsdp import FullModel

    model = torch.nn.Linear(2, 2)
    full = FullModel(model, sharded=False, main=True)
    accelerator = SimpleNamespace(unwrap_model=lambda m: m, is_main_process=True)
    assert full.replica is None and full.get(accelerator, model) is model
    assert FullModel(model, sharded=False, main=False).get(SimpleNamespace(is_main_process=False), model) is None
    assert sys.modules["mmx.train.fsdp"].is_fsdp(SimpleNamespace(distributed_type="MULTI_CPU")) is False


def _fsdp_launch(units: Path, *args: str) -> None:
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(ROOT / "configs/accelerate/fsdp_4gpu.yaml"), "--num_processes", "2", "--main_process_port",
        str(_free_port()), str(ACCELERATE_WORKER), str(units), *TRAIN, *args,
    ]  # fmt: skip
    done = _run(cmd, _clean_env(cpu_flag=False))
    if done.returncode != 0:
        pytest.fail(_failure(done))


@needs_gloo
def test_accelerate_fsdp2_trains_saves_resumes_and_ends_where_ddp_ends(tmp_path):
    from safetensors.torch import load_file

    run, units = tmp_path / "fsdp", tmp_path / "units.json"
    _fsdp_launch(units, "train.max_steps=4", "--out", str(run))
    assert json.loads(units.read_text()) == ["FSDPGroupNorm", "FSDPResBlock2D", "FSDPSpatialTransformer", "FSDPUNet2D"]
    first = run / "checkpoints" / "step_0000004"
    assert {"pytorch_model_fsdp.bin", "optimizer.bin", "mmx_checkpoint.json"} <= {p.name for p in first.iterdir()}
    after_four = load_file(run / WEIGHTS)  # gathered from the shards on the main process and saved
    _fsdp_launch(units, "train.max_steps=6", "--resume", "latest", "--out", str(run))
    assert sorted(p.name for p in (run / "checkpoints").iterdir())[-1] == "step_0000006"
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [4, 6]

    ddp = tmp_path / "ddp"
    cmd = _torchrun(2, "-m", "mmx.cli", *TRAIN, "train.max_steps=6", "--out", str(ddp))
    done = _run(cmd, _clean_env(cpu_flag=True))
    if done.returncode != 0:
        pytest.fail(_failure(done))
    resumed, reference = load_file(run / WEIGHTS), load_file(ddp / WEIGHTS)
    assert resumed.keys() == reference.keys() and len(resumed) > 100
    for key in reference:
        torch.testing.assert_close(resumed[key], reference[key], atol=1e-6, rtol=1e-5, msg=key)
    moved = max((resumed[k] - after_four[k]).abs().max().item() for k in resumed)
    assert moved > 1e-4, "steps 5 and 6 hardly moved the weights: the comparison would prove nothing"


def test_a_wrap_policy_that_picks_a_module_list_is_explained():
    from torch.distributed.fsdp import fully_shard

    from mmx.models import UNet2D
    from mmx.train.fsdp import wrap_policy_hint

    with pytest.raises(ValueError) as refused:
        fully_shard(torch.nn.ModuleList([torch.nn.Linear(2, 2)]))  # what SIZE_BASED_WRAP hands it
    hint = wrap_policy_hint(refused.value, UNet2D(channels=(16, 32), attention_levels=(False, True), norm_groups=8))
    assert "TRANSFORMER_BASED_WRAP" in hint and "['ResBlock2D', 'SpatialTransformer']" in hint and "UNet2D" in hint
    assert wrap_policy_hint(ValueError("something else"), torch.nn.Linear(2, 2)) is None


def test_ema_under_fsdp_is_refused_before_anything_is_sharded(tmp_path, monkeypatch):
    from mmx.config import load_config
    from mmx.recipes.text_to_image import TextToImageConfig, TextToImageTask
    from mmx.train import TrainSetupError, train

    cfg = load_config(ROOT / "configs/shapes_t2i_tiny.yaml", TextToImageConfig, ["train.tensorboard=false"])
    monkeypatch.setattr("mmx.train.trainer.is_fsdp", lambda accelerator: True)  # as under an FSDP launch
    with pytest.raises(TrainSetupError, match=r"set train\.ema=false"):
        train(TextToImageTask(cfg, tmp_path), cfg.train, tmp_path)
    assert not (tmp_path / "checkpoints").exists()
