"""The Accelerate training loop on the tiny text-to-image recipe: learning, exact resume, run folders."""

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from mmx.config import load_config
from mmx.recipes import load_run
from mmx.recipes.text_to_image import TextToImageConfig, TextToImageTask
from mmx.train import latest_checkpoint, train

TINY = Path(__file__).parents[2] / "configs" / "shapes_t2i_tiny.yaml"


def _cfg(*overrides):
    return load_config(TINY, TextToImageConfig, ["train.tensorboard=false", *overrides])


def test_tiny_model_overfits_a_few_captions(tmp_path):
    """Four captions, 120 steps: the loss at fixed noise and timesteps falls at least 3x."""
    cfg = _cfg(
        "data.length=16",
        "train.batch_size=16",
        "train.max_steps=120",
        "train.lr=0.003",
        "train.ema=false",
        "train.checkpoint_every=1000",
        "train.validate_every=1000",
        "diffusion.cond_drop_prob=0.0",
        "diffusion.min_snr_gamma=null",
    )
    task = TextToImageTask(cfg, tmp_path)
    batch = task.collate([task.train_dataset()[i] for i in range(16)])

    def fixed_loss():
        with torch.no_grad():
            return task.pipeline.loss(batch["image"], batch["caption"], torch.Generator().manual_seed(0)).item()

    before = fixed_loss()
    train(task, cfg.train, tmp_path)
    after = fixed_loss()
    assert after < before / 3, f"loss {before:.4f} -> {after:.4f}"


def test_stop_and_resume_reproduces_the_uninterrupted_losses(tmp_path):
    cfg = _cfg("train.max_steps=8", "train.checkpoint_every=4", "train.validate_every=1000")
    whole: list[float] = []
    train(TextToImageTask(cfg, tmp_path / "a"), cfg.train, tmp_path / "a", on_step=lambda s, l: whole.append(l.item()))

    class Stop(Exception):
        pass

    first: list[float] = []

    def stop_after_checkpoint(step, loss):
        first.append(loss.item())
        if step == 5:
            raise Stop

    with pytest.raises(Stop):
        train(TextToImageTask(cfg, tmp_path / "b"), cfg.train, tmp_path / "b", on_step=stop_after_checkpoint)
    assert latest_checkpoint(tmp_path / "b").name == "step_0000004"
    rest: list[float] = []
    train(
        TextToImageTask(cfg, tmp_path / "b"),
        cfg.train,
        tmp_path / "b",
        resume="latest",
        on_step=lambda s, l: rest.append(l.item()),
    )
    assert first[:4] == whole[:4]
    assert rest == pytest.approx(whole[4:], rel=1e-5, abs=1e-6)


def test_run_folder_rebuilds_itself_and_keeps_limited_checkpoints(tmp_path):
    cfg = _cfg(
        "train.max_steps=8", "train.checkpoint_every=2", "train.checkpoints_total_limit=2", "train.validate_every=8"
    )
    result = train(TextToImageTask(cfg, tmp_path), cfg.train, tmp_path)
    assert result.step == 8 and "caption_accuracy" in result.metrics
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000006", "step_0000008"]
    assert (tmp_path / "samples" / "step_0000008.png").is_file()
    assert (tmp_path / "metrics.jsonl").read_text().count("caption_accuracy") == 1
    loaded = load_run(tmp_path)
    loaded_cfg, pipeline = loaded.config, loaded.model
    assert loaded_cfg == cfg
    images = pipeline.generate(
        ["a red circle on the left", "a blue square at the top and a green triangle on the right"],
        num_steps=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert images.shape == (2, 3, 16, 16) and images.abs().max() <= 1


def test_the_model_is_saved_before_the_last_validation_so_a_failing_one_cannot_lose_it(tmp_path, monkeypatch):
    cfg = _cfg("train.max_steps=2", "train.validate_every=1000")
    task = TextToImageTask(cfg, tmp_path)

    def broken(*args, **kwargs):
        raise RuntimeError("validation broke")

    monkeypatch.setattr(task, "validate", broken)
    with pytest.raises(RuntimeError, match="validation broke"):
        train(task, cfg.train, tmp_path)
    assert (tmp_path / "model" / "unet" / "config.json").is_file()
    load_run(tmp_path)  # the trained model is there and loads


def test_resume_from_a_missing_folder_names_it(tmp_path):
    cfg = _cfg("train.max_steps=1")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        train(TextToImageTask(cfg, tmp_path), cfg.train, tmp_path, resume=tmp_path / "nowhere")


def test_load_run_errors_name_the_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_run(tmp_path)


# --------------------------------------------------------------------------- non-finite losses, exact resume (MLP)


class _MLPTask:
    """A tiny regression task; its loss is NaN at the steps in ``nan_at`` and 1e36 times larger at ``huge_at``."""

    def __init__(self, nan_at=(), huge_at=()):
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.GELU(), torch.nn.Linear(16, 2))
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(32, 4, generator=g), torch.randn(32, 2, generator=g)
        self.nan_at, self.huge_at = set(nan_at), set(huge_at)
        self.calls, self.grads_were_none = 0, []

    def train_dataset(self):
        return torch.utils.data.TensorDataset(self.x, self.y)

    def collate(self, items):
        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    def loss(self, model, batch, generator):
        self.calls += 1  # == the step being computed (grad_accum = 1)
        self.grads_were_none.append(all(p.grad is None for p in model.parameters()))
        x, y = batch
        loss = torch.nn.functional.mse_loss(model(x + 0.1 * torch.randn(x.shape, generator=generator)), y)
        if self.calls in self.nan_at:
            return loss * float("nan")
        return loss * 1e36 if self.calls in self.huge_at else loss

    def validate(self, model, step, out_dir):
        return {}

    def save_model(self, model, out_dir):
        pass


def _mlp_cfg(**changes):
    from mmx.train import TrainConfig

    base = dict(
        max_steps=6,
        batch_size=8,
        lr=1e-2,
        warmup_steps=1,
        checkpoint_every=3,
        checkpoints_total_limit=None,
        validate_every=1000,
        log_every=1,
        progress=False,
        tensorboard=False,
        ema=True,
        ema_decay=0.9,
    )
    return TrainConfig(**{**base, **changes})


def _checkpoint_counts(folder):
    """(steps the trainer ran, non-finite steps, EMA updates, LR-schedule steps) recorded in a checkpoint."""
    import json

    from safetensors import safe_open

    with safe_open(str(folder / "mmx_state_0.safetensors"), "pt") as f:
        state = f.metadata()
    with safe_open(str(folder / "mmx_ema.safetensors"), "pt") as f:
        ema = json.loads(f.metadata()["mmx_ema"])
    schedule = torch.load(folder / "scheduler.bin", weights_only=True)
    return int(state["step"]), int(state["nonfinite_steps"]), ema["optimization_step"], schedule["last_epoch"]


def test_a_nonfinite_loss_skips_the_step_and_is_counted(tmp_path, caplog):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    task = _MLPTask(nan_at={2, 5})
    weights = {}
    train(
        task,
        _mlp_cfg(tensorboard=True),
        tmp_path,
        on_step=lambda s, l: weights.__setitem__(s, [p.detach().clone() for p in task.model.parameters()]),
    )
    for step in (2, 5):  # no optimizer step: the weights stay those of the step before
        same = all(torch.equal(a, b) for a, b in zip(weights[step], weights[step - 1]))
        assert same, f"step {step} changed the weights"
        assert task.grads_were_none[step], f"the gradients of step {step} were not zeroed"
    assert not any(torch.equal(a, b) for a, b in zip(weights[3], weights[2])), "step 3 trains again"
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelname == "WARNING"] == ["step 2", "step 5"]
    # 6 steps, 2 skipped: neither EMA nor the LR schedule moved on them
    assert _checkpoint_counts(tmp_path / "checkpoints" / "step_0000006") == (6, 2, 4, 4)
    events = EventAccumulator(str(next((tmp_path / "logs").rglob("events.out.tfevents*")).parent))
    events.Reload()
    counted = {e.step: e.value for e in events.Scalars("train/nonfinite_steps")}
    assert counted == {1: 0, 2: 1, 3: 1, 4: 1, 5: 2, 6: 2}
    losses = {e.step: e.value for e in events.Scalars("train/loss")}
    assert all(v == v for v in losses.values()) and set(losses) == {1, 3, 4, 6}, "skipped steps log no loss"


def test_nonfinite_losses_in_a_row_stop_training_naming_the_step_and_the_last_good_checkpoint(tmp_path):
    from mmx.train.trainer import NonFiniteLossError

    cfg = _mlp_cfg(max_steps=20, checkpoint_every=2, max_nonfinite_steps=3)
    with pytest.raises(NonFiniteLossError, match=r"step 7: .* 3 steps in a row \(steps 5-7.*step_0000004") as err:
        train(_MLPTask(nan_at=range(5, 21)), cfg, tmp_path)
    assert "--resume" in str(err.value)
    # the checkpoint due at step 6 (inside the streak) was postponed, so step 4 stays the newest
    assert latest_checkpoint(tmp_path).name == "step_0000004"


def test_under_a_grad_scaler_overflow_is_the_scalers_and_a_nan_loss_is_counted(tmp_path, monkeypatch, caplog):
    """fp16 path (a CPU GradScaler stands in): the scaler skips both bad steps; only the NaN loss counts."""
    import accelerate

    made = []

    class ScaledAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
            made.append(self)

    monkeypatch.setattr(accelerate, "Accelerator", ScaledAccelerator)
    task = _MLPTask(nan_at={2}, huge_at={4})  # 1e36 * 2**10 overflows float32 in the scaled backward pass
    train(task, _mlp_cfg(max_nonfinite_steps=2, max_grad_norm=None), tmp_path)
    assert made[0].scaler.get_scale() == 2.0**8, "the scaler saw and skipped both steps"
    assert [r.getMessage().split(":")[0] for r in caplog.records if r.levelname == "WARNING"] == ["step 2"]
    assert _checkpoint_counts(tmp_path / "checkpoints" / "step_0000006") == (6, 1, 4, 4)


def test_runs_in_one_process_may_change_mixed_precision_and_a_callers_accelerator_is_kept(tmp_path):
    """A notebook trains in bf16, then in fp32; the trainer releases the Accelerate state it made."""
    import accelerate
    from accelerate.state import AcceleratorState, is_initialized

    AcceleratorState._reset_state()  # as in a fresh process
    cfg = _mlp_cfg(max_steps=2, checkpoint_every=2, ema=False)
    seen = []

    def precision(step, loss):
        seen.append(AcceleratorState().mixed_precision)

    train(_MLPTask(), dataclasses.replace(cfg, mixed_precision="bf16"), tmp_path / "bf16", on_step=precision)
    assert not is_initialized()
    train(_MLPTask(), cfg, tmp_path / "fp32", on_step=precision)
    assert seen == ["bf16", "bf16", "no", "no"]
    try:
        mine = accelerate.Accelerator(mixed_precision="no")  # the caller's own, made before training
        train(_MLPTask(), cfg, tmp_path / "own")
        assert is_initialized() and mine.state.mixed_precision == "no"
    finally:
        AcceleratorState._reset_state()


def test_stop_and_resume_is_bit_identical_with_ema(tmp_path):
    """Weights, EMA and Adam state after an interrupted + resumed run equal the uninterrupted run's exactly."""
    from safetensors.torch import load_file

    class Stop(Exception):
        pass

    def stop_at_5(step, loss):
        if step == 5:
            raise Stop

    cfg = _mlp_cfg(max_steps=8, checkpoint_every=4)
    train(_MLPTask(), cfg, tmp_path / "a")
    with pytest.raises(Stop):
        train(_MLPTask(), cfg, tmp_path / "b", on_step=stop_at_5)
    train(_MLPTask(), cfg, tmp_path / "b", resume="latest")
    a, b = (tmp_path / x / "checkpoints" / "step_0000008" for x in "ab")
    for name in ("model.safetensors", "mmx_ema.safetensors"):
        wa, wb = load_file(str(a / name)), load_file(str(b / name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    oa, ob = (torch.load(x / "optimizer.bin", weights_only=True)["state"] for x in (a, b))
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])


# --------------------------------------------------------------------------- speed options


def _losses_and_images_format(cfg, run_dir):
    """Train; return the per-step losses, the task, and whether every image batch reached the loss channels-last."""
    task = TextToImageTask(cfg, run_dir)
    formats, losses = [], []
    task_loss = task.loss

    def loss(model, batch, generator):
        formats.append(batch["image"].is_contiguous(memory_format=torch.channels_last))
        return task_loss(model, batch, generator)

    task.loss = loss
    train(task, cfg.train, run_dir, on_step=lambda s, l: losses.append(l.item()))
    return losses, task, all(formats)


def test_gradient_checkpointing_and_channels_last_train_like_the_plain_run_and_save_loadable_weights(tmp_path):
    common = ("train.max_steps=4", "train.checkpoint_every=4", "train.validate_every=1000")
    plain, plain_task, plain_format = _losses_and_images_format(_cfg(*common), tmp_path / "plain")
    cfg = _cfg(*common, "train.gradient_checkpointing=true", "train.channels_last=true")
    fast, task, fast_format = _losses_and_images_format(cfg, tmp_path / "fast")
    assert task.model.is_gradient_checkpointing and not plain_task.model.is_gradient_checkpointing
    assert task.model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast_format and not plain_format
    assert fast == pytest.approx(plain, rel=2e-3)  # same data, noise and weights: only the float rounding differs
    loaded = load_run(tmp_path / "fast")
    loaded_cfg, pipeline = loaded.config, loaded.model
    assert loaded_cfg.train.gradient_checkpointing and loaded_cfg.train.channels_last
    saved, reference = pipeline.unet.state_dict(), load_run(tmp_path / "plain").model.unet.state_dict()
    assert saved.keys() == reference.keys()
    images = pipeline.generate(["a red circle on the left"], num_steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 3, 16, 16) and torch.isfinite(images).all()


def _saved_keys(run_dir, step):
    from safetensors.torch import load_file

    checkpoint = load_file(str(run_dir / "checkpoints" / f"step_{step:07d}" / "model.safetensors"))
    final = load_file(str(run_dir / "model" / "unet" / "diffusion_pytorch_model.safetensors"))
    return set(checkpoint), set(final)


def test_compiled_training_forward_saves_the_models_own_keys(tmp_path, monkeypatch):
    """The compile plumbing with dynamo's eager backend (seconds); the inductor run is the slow test below."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    cfg = _cfg("train.max_steps=2", "train.checkpoint_every=2", "train.validate_every=2", "train.compile=true")
    task = TextToImageTask(cfg, tmp_path)
    result = train(task, cfg.train, tmp_path)
    assert result.step == 2 and "caption_accuracy" in result.metrics  # validation ran on the model itself
    checkpoint, final = _saved_keys(tmp_path, 2)
    assert checkpoint == final == set(task.model.state_dict())
    load_run(tmp_path)


@pytest.mark.slow
def test_compiled_training_with_inductor_runs_and_saves_keys_without_orig_mod(tmp_path):
    """torch.compile's default backend (inductor builds C++ on the CPU: about 2 minutes cold, seconds once cached)."""
    cfg = _cfg("train.max_steps=2", "train.checkpoint_every=2", "train.validate_every=1000", "train.compile=true")
    losses = []
    train(TextToImageTask(cfg, tmp_path), cfg.train, tmp_path, on_step=lambda s, l: losses.append(l.item()))
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    checkpoint, final = _saved_keys(tmp_path, 2)
    assert checkpoint == final and not any("_orig_mod" in key for key in checkpoint)
    load_run(tmp_path)


def test_speed_options_are_checked_and_harmless_where_they_do_not_apply(tmp_path):
    from mmx.train.trainer import TrainSetupError

    with pytest.raises(TrainSetupError, match=r"train.compile = 'yes'; expected true or false"):
        train(_MLPTask(), _mlp_cfg(compile="yes"), tmp_path / "a")
    with pytest.raises(TrainSetupError, match="Sequential has no submodule that supports it"):
        train(_MLPTask(), _mlp_cfg(gradient_checkpointing=True), tmp_path / "b")
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    task = _MLPTask()
    train(task, _mlp_cfg(max_steps=2, channels_last=True, allow_tf32=not tf32[0]), tmp_path / "c")
    assert (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32) == tf32, "CPU: TF32 untouched"
    assert all(p.is_contiguous() for p in task.model.parameters()), "no 2-D convolution: nothing to change"
