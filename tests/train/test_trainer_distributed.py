"""The trainer as two processes on the CPU (torchrun, gloo), and the Accelerate launch files.

Two processes with batch b must train exactly like one process with batch 2b, because:

* data order: Accelerate's seedable sampler draws one permutation of the data set per epoch (seed
  ``train.seed + epoch``) on every process, and its batch sharder hands process r the batches
  r, r + N, r + 2N, ... of size b; the two batches of step k are therefore the samples 2bk .. 2bk+2b-1
  of the permutation, the batch of step k of one process with batch 2b (checked sample by sample);
* gradients: DDP averages the processes' gradients, each a mean over b samples, which equals the mean
  over 2b that one process computes, for a loss that is a mean over the batch;
* randomness: the trainer seeds its noise generator with ``train.seed + process_index``, so a task that
  draws noise per sample (diffusion timesteps, dropout) sees different numbers under two processes and
  can only match in distribution. The task here (``_dist_task.py``) has a deterministic loss;
* EMA, gradient clipping and Adam act on the averaged gradient and the replicated parameters: equal too;
* the LR schedule must advance once per optimiser step whatever the process count (see
  :func:`test_lr_schedule_does_not_depend_on_the_process_count`).

What remains is float32 rounding: averaging two half-batch means sums in another order than one mean.
After 8 Adam steps the largest parameter difference seen is 3e-8 (parameters are of order 0.1 to 1,
float32 spacing there is 1e-8 to 1e-7), so the comparison allows ``atol=1e-6, rtol=1e-5``: 30 times
the difference seen, and far below how far training moves the parameters (over 1e-3 from step 4 to
step 8, checked, so the comparison is not vacuous).

The processes are started by ``python -m torch.distributed.run`` (what the ``torchrun`` command runs),
with ``OMP_NUM_THREADS=1`` and no GPU visible. Accelerate only forms a CPU process group (MULTI_CPU,
gloo) when told to use the CPU; the trainer tells it when the launcher started several processes on a
machine without a GPU (:func:`mmx.train.trainer.multi_process_cpu_launch`). Most launches here also
set ``ACCELERATE_USE_CPU=1``; :func:`test_torchrun_alone_gives_a_two_process_run` and the CLI test
launch without it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[2]
HELPER = Path(__file__).with_name("_dist_task.py")
ACCELERATE_CONFIGS = ROOT / "configs" / "accelerate"
STEPS, BATCH, SAMPLES = 8, 4, 24  # as in _dist_task.base_config / RegressionTask
LAUNCH_TIMEOUT = 240  # seconds; a launch takes 5-15 s on two busy cores
ATOL, RTOL = 1e-6, 1e-5

needs_gloo = pytest.mark.skipif(
    not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="torch was built without the gloo backend",
)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _clean_env(cpu_flag: bool) -> dict[str, str]:
    """This process's environment without launcher / Accelerate variables, one thread, no GPU visible."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("ACCELERATE_")
        and k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    }
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")
    if cpu_flag:
        env["ACCELERATE_USE_CPU"] = "1"
    return env


def _run(cmd: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run ``cmd`` from the repository root; past ``LAUNCH_TIMEOUT`` it is killed (every worker too): the test fails."""
    # a session of its own, so that on a timeout torchrun and the workers it started go down together
    with subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=LAUNCH_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            pytest.fail(
                f"{' '.join(cmd)} ran past {LAUNCH_TIMEOUT} s and was killed\n{stdout[-2000:]}\n{stderr[-6000:]}"
            )
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _torchrun(processes: int, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(_free_port()),
        *args,
    ]


def _launch(
    out: Path, runs: list[str], batch_size: int, processes: int, cpu_flag: bool = True, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``_dist_task.py`` as ``processes`` processes (torchrun) or as one plain process.

    ``check``: fail the test with the command's output when it exits with an error.
    """
    task = [str(HELPER), str(out), *runs, "--batch-size", str(batch_size)]
    cmd = _torchrun(processes, *task) if processes > 1 else [sys.executable, *task]
    done = _run(cmd, _clean_env(cpu_flag))
    if check and done.returncode != 0:
        pytest.fail(_failure(done))
    return done


def _failure(done: subprocess.CompletedProcess) -> str:
    return f"{' '.join(done.args)} exited with {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-6000:]}"


def _trace(out: Path, run: str, rank: int) -> dict:
    return json.loads((out / f"{run}.rank{rank}.json").read_text())


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``(step, value)`` of a tensorboard tag from the run's one event file."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = (run_dir / "logs" / "mmx").glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def _assert_same_parameters(two: dict[str, torch.Tensor], one: dict[str, torch.Tensor]) -> None:
    assert list(two) == list(one)
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=ATOL, rtol=RTOL, msg=lambda m, name=name: f"{name}: {m}")


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> Path:
    """Run ``constant`` (EMA on, constant LR) as 2 torchrun processes with batch 4 each."""
    out = tmp_path_factory.mktemp("two")
    _launch(out, ["constant"], BATCH, processes=2)
    return out


@pytest.fixture(scope="module")
def two_cosine(tmp_path_factory) -> Path:
    """Run ``cosine`` (warmup + cosine LR, no EMA) as 2 torchrun processes with batch 4 each."""
    out = tmp_path_factory.mktemp("two_cosine")
    _launch(out, ["cosine"], BATCH, processes=2)
    return out


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """Both runs in one plain process with batch 8 (one process can train twice; see _dist_task.main)."""
    out = tmp_path_factory.mktemp("one")
    _launch(out, ["constant", "cosine"], 2 * BATCH, processes=1)
    return out


@needs_gloo
def test_torchrun_with_accelerate_use_cpu_gives_two_gloo_processes(two):
    for rank in (0, 1):
        trace = _trace(two, "constant", rank)
        assert (trace["distributed_type"], trace["num_processes"], trace["process_index"]) == ("MULTI_CPU", 2, rank)


@needs_gloo
def test_two_processes_train_on_the_batches_of_one_process(two, one):
    """Step by step, process 0's batch then process 1's is the batch of one process with twice the batch size."""
    first, second = _trace(two, "constant", 0)["seen"], _trace(two, "constant", 1)["seen"]
    alone = _trace(one, "constant", 0)["seen"]
    assert len(first) == len(second) == len(alone) == STEPS
    assert [a + b for a, b in zip(first, second)] == alone
    per_epoch = SAMPLES // (2 * BATCH)
    for epoch in range(STEPS // per_epoch):  # each epoch visits every sample once, in a new order
        steps = alone[epoch * per_epoch : (epoch + 1) * per_epoch]
        assert sorted(i for batch in steps for i in batch) == list(range(SAMPLES))
    assert alone[:per_epoch] != alone[per_epoch : 2 * per_epoch]


@needs_gloo
def test_two_processes_end_with_the_parameters_of_one_process(two, one):
    """Trained and EMA parameters after 8 steps, and the logged loss of every step, agree to float32 rounding."""
    final = f"checkpoints/step_{STEPS:07d}/model.safetensors"
    trained_two, trained_one = _tensors(two / "constant" / final), _tensors(one / "constant" / final)
    _assert_same_parameters(trained_two, trained_one)
    _assert_same_parameters(
        _tensors(two / "constant/model/model.safetensors"), _tensors(one / "constant/model/model.safetensors")
    )  # saved with the EMA weights

    halfway = _tensors(one / "constant" / f"checkpoints/step_{STEPS // 2:07d}/model.safetensors")
    moved = max((trained_one[k] - halfway[k]).abs().max().item() for k in halfway)
    assert moved > 1e-3, "the parameters hardly changed: the comparison above would prove nothing"
    ema = _tensors(one / "constant/model/model.safetensors")
    assert any(not torch.equal(ema[k], trained_one[k]) for k in ema), "the EMA weights equal the trained ones"

    losses_two, losses_one = _scalars(two / "constant", "train/loss"), _scalars(one / "constant", "train/loss")
    assert [s for s, _ in losses_two] == [s for s, _ in losses_one] == list(range(1, STEPS + 1))
    assert [v for _, v in losses_two] == pytest.approx([v for _, v in losses_one], rel=1e-5, abs=1e-6)


# One process may, per checkpoint, make the folder the main process made (os.makedirs(exist_ok=True)
# in accelerate's save_state) and write its own RNG state and noise generator into it.
_OTHER_PROCESS_MAY = re.compile(
    r"^(os\.mkdir checkpoints/step_\d{7}\.tmp"
    r"|(torch\.save|safetensors|open) checkpoints/step_\d{7}\.tmp/(random_states_1\.pkl|mmx_state_1\.safetensors))$"
)


@needs_gloo
def test_only_the_main_process_writes_checkpoints_logs_and_samples(two):
    run = two / "constant"
    others = [" ".join(entry) for entry in _trace(two, "constant", 1)["writes"]]
    assert others, "process 1 wrote nothing at all, not even its RNG state: is the write log working?"
    assert [e for e in others if not _OTHER_PROCESS_MAY.match(e)] == []
    main = {path for _, path in _trace(two, "constant", 0)["writes"]}
    assert {
        "metrics.jsonl",
        "model/model.safetensors",
        f"samples/step_{STEPS:07d}.rank0.json",
        f"checkpoints/step_{STEPS:07d}.tmp/model.safetensors",
    } <= main

    # what the folder holds: validation and the final weights ran once, on the main process
    assert sorted(p.name for p in (run / "samples").iterdir()) == [
        f"step_{STEPS // 2:07d}.rank0.json",
        f"step_{STEPS:07d}.rank0.json",
    ]
    assert sorted(p.name for p in (run / "model").iterdir()) == ["model.safetensors", "written_by_rank0"]
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [
        STEPS // 2,
        STEPS,
    ]
    assert len(list((run / "logs" / "mmx").glob("events.out.tfevents.*"))) == 1

    from mmx.train.trainer import verify_checkpoint

    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert checkpoints == [f"step_{STEPS // 2:07d}", f"step_{STEPS:07d}"]
    for name in checkpoints:
        files = set(verify_checkpoint(run / "checkpoints" / name)["files"])
        per_process = {f for f in files if re.search(r"_\d+\.(pkl|safetensors)$", f)}
        assert per_process == {
            "random_states_0.pkl",
            "random_states_1.pkl",
            "mmx_state_0.safetensors",
            "mmx_state_1.safetensors",
        }
        assert files - per_process == {"model.safetensors", "optimizer.bin", "scheduler.bin", "mmx_ema.safetensors"}


@needs_gloo
def test_lr_schedule_does_not_depend_on_the_process_count(two_cosine, one):
    """Warmup (3 steps) then cosine decay over 8 steps: the same LR at every step, so the same parameters."""
    lr_two = [v for _, v in _scalars(two_cosine / "cosine", "train/lr")]
    lr_one = [v for _, v in _scalars(one / "cosine", "train/lr")]
    assert lr_one[0] < lr_one[2] and lr_one[-1] < lr_one[3]  # the schedule warms up and decays
    assert lr_two == pytest.approx(lr_one, rel=1e-6)
    final = f"cosine/checkpoints/step_{STEPS:07d}/model.safetensors"
    _assert_same_parameters(_tensors(two_cosine / final), _tensors(one / final))


@needs_gloo
def test_torchrun_alone_gives_a_two_process_run(tmp_path):
    """``torchrun --nproc_per_node 2`` with nothing else set: one gloo group, and one writer."""
    done = _launch(tmp_path, ["smoke"], BATCH, processes=2, cpu_flag=False, check=False)
    assert done.returncode == 0, _failure(done)  # two processes that each think they are alone can collide
    traces = [_trace(tmp_path, "smoke", rank) for rank in (0, 1)]
    assert [(t["distributed_type"], t["num_processes"]) for t in traces] == [("MULTI_CPU", 2)] * 2
    assert traces[0]["seen"] != traces[1]["seen"]
    assert [e for e in traces[1]["writes"] if not _OTHER_PROCESS_MAY.match(" ".join(e))] == []


def _accelerate_configs() -> list[Path]:
    return sorted(ACCELERATE_CONFIGS.glob("*.yaml"))


def test_the_accelerate_configs_are_there():
    kinds = {}
    from accelerate.commands.config.config_args import load_config_from_file

    for path in _accelerate_configs():
        config = load_config_from_file(str(path))
        kinds[path.name] = (config.distributed_type.value, config.num_machines)
    assert {"MULTI_GPU", "FSDP", "DEEPSPEED"} <= {kind for kind, _ in kinds.values()}
    assert any(kind == "MULTI_GPU" and machines > 1 for kind, machines in kinds.values()), kinds


@pytest.mark.parametrize("path", _accelerate_configs(), ids=lambda p: p.name)
def test_accelerate_config_loads_and_says_how_to_launch(path, monkeypatch):
    """Accelerate's own loader and launcher read the file; nested keys and values are ones Accelerate knows.

    ``load_config_from_file`` rejects unknown top-level keys but passes ``fsdp_config`` /
    ``deepspeed_config`` entries through unread, so those are checked against ``accelerate launch``'s
    options, and the plugin Accelerate would build from the launcher's environment is built here.
    """
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import DeepSpeedPlugin, DistributedType, FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    header = path.read_text().split("\ncompute_environment:")[0]
    assert f"accelerate launch --config_file configs/accelerate/{path.name}" in header
    assert "-m mmx.cli train configs/" in header

    config = load_config_from_file(str(path))
    assert config.num_processes >= 2 * config.num_machines
    parser = launch_command_parser()
    options = {action.dest: action for action in parser._actions}
    for section, prefix in (("fsdp_config", "fsdp_"), ("deepspeed_config", "")):
        for key, value in getattr(config, section).items():
            name = key if key.startswith(prefix) else prefix + key
            assert name in options, f"{path.name}: {section}.{key} is not an option Accelerate knows"
            if options[name].choices:
                assert str(value) in options[name].choices, f"{path.name}: {section}.{key} = {value!r}"

    # what `accelerate launch --config_file path -m mmx.cli train ...` would hand the processes
    args = parser.parse_args(["--config_file", str(path), "-m", "mmx.cli", "train", "configs/shapes_t2i.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    assert args.module and args.training_script == "mmx.cli"
    if config.distributed_type == DistributedType.DEEPSPEED:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    if config.distributed_type == DistributedType.FSDP:
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == config.fsdp_config["fsdp_version"]
    elif config.distributed_type == DistributedType.DEEPSPEED:
        plugin = DeepSpeedPlugin()
        assert plugin.zero_stage == config.deepspeed_config["zero_stage"]
        assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # train.grad_accum decides
    else:
        assert config.distributed_type == DistributedType.MULTI_GPU and env.get("ACCELERATE_USE_FSDP") is None
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # the recipe's train.mixed_precision decides


@needs_gloo
def test_mmx_train_under_torchrun_writes_one_run(tmp_path):
    """`torchrun --nproc_per_node 2 -m mmx.cli train CONFIG`: one config, one model, samples from rank 0 only."""
    run = tmp_path / "run"
    cmd = _torchrun(
        2,
        "-m",
        "mmx.cli",
        "train",
        "configs/policy_reach_tiny.yaml",
        "train.max_steps=2",
        "train.validate_every=2",
        "--out",
        str(run),
    )
    done = _run(cmd, _clean_env(cpu_flag=False))
    assert done.returncode == 0, _failure(done)
    assert done.stdout.count("trained 2 steps") == 1  # the closing line comes from the main process only
    assert (run / "config.yaml").is_file() and (run / "model").is_dir()
    checkpoint = run / "checkpoints" / "step_0000002"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in checkpoint.iterdir()}
