"""The GPU path in figures: bf16 training of the shapes recipe, a policy's action-chunk latency, FSDP2.

Three suites, which ``mmx bench gpu`` runs after every suite of ``mmx bench all`` on a CUDA device
(:data:`mmx.bench.GPU`); training and latency also run alone, on any device (``mmx bench training --quick``):

* ``training`` (:func:`training_suite`), the shapes text-to-image recipe (``configs/shapes_t2i.yaml``)
  under bf16 autocast:

  - samples per second and MFU at several batch sizes, on one fixed batch: the step is the recipe's
    loss (attention losses included), backward and AdamW; the model FLOPs of a step are counted by
    ``FlopCounterMode`` (:func:`mmx.bench.hardware.count_flops`), the peak is the card's dense bf16
    peak (:data:`mmx.bench.hardware.PEAK_BF16_TFLOPS`, or ``--peak-tflops``);
  - which SDPA kernel each attention shape ran (:func:`mmx.bench.hardware.sdpa_backends`);
  - the host synchronisations of steps 5 to 8 of the trainer's loop, by line
    (:func:`mmx.bench.hardware.sync_sites`; CUDA only);
  - time to 90% held-out caption accuracy: the recipe trained by :func:`mmx.train.train` with
    ``mixed_precision: bf16``, validated every 100 steps; the figure is the training clock (validation
    excluded) at the first validation at or above 90%.

* ``latency`` (:func:`latency_suite`): one action chunk of the language-conditioned targets policy
  (``configs/policy_targets.yaml``, batch 1, encoder and 16 DDIM steps) eager, with the UNet under
  ``torch.compile``, and under ``torch.compile(mode="reduce-overhead")``, which replays CUDA graphs
  (CUDA only). Random weights: latency does not depend on training.

* ``fsdp`` (:func:`fsdp_suite`): the trainer under ``configs/accelerate/fsdp_4gpu.yaml`` saves,
  resumes and saves again (CUDA only).

``--quick`` runs the tiny configs with a few steps: a smoke test of the code path, not figures.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from mmx.bench.hardware import count_flops, mfu, peak_tflops, sdpa_backends, sync_sites
from mmx.bench.report import Figure, Log, SuiteResult, _num, log_info
from mmx.bench.timing import _sync, device_name

__all__ = ["fsdp_suite", "latency_suite", "results_section", "time_to_accuracy", "training_suite", "write_section"]

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TARGET_ACCURACY = 0.9


def _config(name: str) -> Path:
    path = CONFIGS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the GPU suites read the recipes of a clone of the mmx repository")
    return path


def _task(config: str, overrides: list[str], run_dir: Path) -> Any:
    from mmx.recipes import load_recipe

    cfg, recipe = load_recipe(_config(config), overrides)
    return cfg, recipe.task_class(cfg, run_dir)


def _step(task: Any, model: torch.nn.Module, batch: Any, device: torch.device) -> Any:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    generator = torch.Generator(device=device).manual_seed(0)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = task.loss(model, batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def throughput(
    task: Any, batch_size: int, device: torch.device, steps: int, peak: float | None, log: Log
) -> tuple[dict[str, Any], Any]:
    """Samples per second, FLOPs per step and MFU of the recipe's bf16 training step at ``batch_size``,
    and the step itself (a zero-argument callable)."""
    dataset = task.train_dataset()
    batch = task.collate([dataset[i] for i in range(batch_size)])
    model = copy.deepcopy(task.model).to(device).train()
    step = _step(task, model, batch, device)
    for _ in range(3):  # warm-up: kernels chosen, the caption cache filled
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    flops = count_flops(step)
    row = {
        "batch": batch_size,
        "step_ms": seconds * 1000,
        "samples_per_s": batch_size / seconds,
        "flops_per_step": flops,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": mfu(flops, seconds, peak),
    }
    share = "n/a" if row["mfu"] is None else f"{row['mfu']:.1%}"
    log(
        f"training, batch {batch_size}: {row['step_ms']:.1f} ms a step, {row['samples_per_s']:,.0f} samples/s, "
        f"{flops / 1e9:,.1f} GFLOP a step, {row['achieved_tflops']:.2f} TFLOP/s, MFU {share}"
    )
    return row, step


def time_to_accuracy(
    config: str, overrides: list[str], run_dir: Path, target: float = TARGET_ACCURACY
) -> dict[str, Any]:
    """Train ``config`` with :func:`mmx.train.train`; the training clock at the first validation >= ``target``."""
    from mmx.train import train

    cfg, task = _task(config, overrides, run_dir)
    start = time.perf_counter()
    result = train(task, cfg.train, run_dir)
    wall = time.perf_counter() - start
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    validations = [h for h in history if "caption_accuracy" in h]
    reached = next((h for h in validations if h["caption_accuracy"] >= target), None)
    return {
        "target": target,
        "steps": result.step,
        "batch": cfg.train.batch_size,
        "wall_seconds": wall,
        "validations": [
            {"step": h["step"], "train_seconds": h.get("train_seconds"), "caption_accuracy": h["caption_accuracy"]}
            for h in validations
        ],
        "reached_at_step": None if reached is None else reached["step"],
        "seconds_to_target": None if reached is None else reached.get("train_seconds"),
        "final_accuracy": validations[-1]["caption_accuracy"] if validations else None,
    }


def trainer_syncs(config: str, overrides: list[str], run_dir: Path, device: torch.device) -> dict[str, Any]:
    """Host synchronisations per step of the trainer's loop, over its steps 5 to 8, by line of code."""
    from mmx.train import train

    if device.type != "cuda":
        return {"per_step": None, "sites": {}, "note": "not applicable off CUDA"}
    cfg, task = _task(config, overrides, run_dir)
    window = (4, 8)  # counted from the end of step 4 to the end of step 8

    def on_step(step: int, loss: torch.Tensor) -> None:
        if step == window[0]:
            torch.cuda.set_sync_debug_mode("warn")
        elif step == window[1]:
            torch.cuda.set_sync_debug_mode(0)

    try:  # the warnings are on from step 4 to step 8 only: not host_syncs, which would count the whole run
        sites = sync_sites(lambda: train(task, cfg.train, run_dir, on_step=on_step))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return {"per_step": sum(sites.values()) / (window[1] - window[0]), "sites": sites, "note": None}


def training_suite(
    device: torch.device, quick: bool = False, log: Log = log_info, peak: float | None = None
) -> SuiteResult:
    """``mmx bench training``: bf16 training of the shapes recipe (see the module docstring)."""
    name = device_name(device)
    peak_value, peak_source = peak_tflops(name, peak) if device.type == "cuda" or peak else (None, "CPU: no peak")
    config = "shapes_t2i_tiny.yaml" if quick else "shapes_t2i.yaml"
    batches = [8] if quick else [64, 256, 1024]
    workers = 0 if quick else max(0, min(8, (os.cpu_count() or 1) - 2))
    base = ["train.progress=false", "train.tensorboard=false", "train.mixed_precision=bf16", "train.compile=false"]
    with tempfile.TemporaryDirectory(prefix="mmx-bench-training-") as tmp:
        tmp_path = Path(tmp)
        _, task = _task(config, base, tmp_path / "throughput")
        task.model.to(device)
        rows, backends = [], []
        for b in batches:
            row, step = throughput(task, b, device, steps=2 if quick else 20, peak=peak_value, log=log)
            if b == batches[0]:
                backends = [vars(c) | {"query": list(c.query), "key": list(c.key)} for c in sdpa_backends(step)]
            rows.append(row)
            del step
        syncs = trainer_syncs(
            config,
            [*base, "train.max_steps=10", "train.validate_every=1000", "train.checkpoint_every=1000", "train.ema=true"],
            tmp_path / "syncs",
            device,
        )
        steps = ["train.max_steps=4", "train.validate_every=2"] if quick else ["train.validate_every=100"]
        reach = time_to_accuracy(
            config, [*base, *steps, "train.checkpoint_every=100000", f"train.num_workers={workers}"], tmp_path / "t90"
        )
    best = max(rows, key=lambda r: r["samples_per_s"])
    seconds = reach["seconds_to_target"]
    log(
        f"time to {TARGET_ACCURACY:.0%} held-out accuracy: "
        + (f"{seconds:.1f} s (step {reach['reached_at_step']})" if seconds is not None else "not reached")
        + f"; final {reach['final_accuracy']}, {reach['steps']} steps in {reach['wall_seconds']:.1f} s wall"
    )
    figures = [
        Figure(f"training throughput, batch {r['batch']}", r["samples_per_s"], "batch " + str(batches[0]),
               rows[0]["samples_per_s"], "samples/s")
        for r in rows
    ]  # fmt: skip
    if best["mfu"] is not None:
        figures.append(Figure(f"bf16 training MFU, batch {best['batch']}", best["mfu"], "target", 0.40, ""))
    if seconds is not None:
        figures.append(Figure(f"time to {TARGET_ACCURACY:.0%} held-out accuracy", seconds, "target", 60.0, "s"))
    notes = [
        f"peak bf16: {peak_value} TFLOP/s ({peak_source}); MFU by batch: "
        + ", ".join(f"{r['batch']}: " + ("n/a" if r["mfu"] is None else f"{r['mfu']:.1%}") for r in rows),
        "SDPA backends (batch "
        + str(batches[0])
        + "): "
        + (
            "; ".join(f"{c['query']} x {c['key']} {c['dtype']}: {c['backend']} ({c['calls']} calls)" for c in backends)
            or "none"
        ),
        "host syncs per trainer step: "
        + (syncs["note"] if syncs["per_step"] is None else f"{syncs['per_step']:g} ({syncs['sites']})"),
        f"time to {TARGET_ACCURACY:.0%} held-out accuracy: "
        + (f"{seconds:.1f} s" if seconds is not None else f"not reached (final {reach['final_accuracy']})"),
    ]
    details = {
        "device": name,
        "peak_tflops": peak_value,
        "peak_source": peak_source,
        "throughput": rows,
        "best_batch": best["batch"],
        "sdpa_backends": backends,
        "host_syncs": syncs,
        "time_to_accuracy": reach,
    }
    return SuiteResult("training", "bf16 training of the shapes recipe", figures, details=details, notes=notes)


def latency_suite(device: torch.device, quick: bool = False, log: Log = log_info) -> SuiteResult:
    """``mmx bench latency``: one action chunk of the targets policy, eager / compiled / CUDA graphs."""
    from mmx.eval.rollout import chunk_latency
    from mmx.recipes import load_recipe
    from mmx.recipes.policy.task import build_policy, load_buffer

    config = "policy_targets_tiny.yaml" if quick else "policy_targets.yaml"
    cfg, _ = load_recipe(_config(config), ["data.episodes=2", "diffusion.sample_steps=16"])
    policy = build_policy(cfg, load_buffer(cfg)).to(device).eval()
    eager_unet = policy.unet
    modes: dict[str, str | None] = {"eager": None}
    if not quick:
        modes["torch.compile"] = "default"
        if device.type == "cuda":
            modes["CUDA graphs"] = "reduce-overhead"
    repeats = 3 if quick else 50
    rows: dict[str, dict[str, float]] = {}
    for label, mode in modes.items():
        policy.unet = eager_unet if mode is None else torch.compile(eager_unet, mode=mode)
        start = time.perf_counter()
        chunk_latency(policy, cfg.data.env, repeats=1, warmup=0)  # compiles, for the compiled modes
        first = time.perf_counter() - start
        rows[label] = chunk_latency(policy, cfg.data.env, repeats=repeats, warmup=3) | {"first_call_s": first}
        log(
            f"policy chunk ({policy.num_inference_steps} DDIM steps), {label}: {rows[label]['median_ms']:.2f} ms median"
        )
    policy.unet = eager_unet
    eager = rows["eager"]["median_ms"]
    figures = [
        Figure(f"policy chunk latency, {label}", row["median_ms"], "eager", eager, "ms") for label, row in rows.items()
    ]
    best = min(rows, key=lambda label: rows[label]["median_ms"])
    figures.append(Figure(f"policy chunk latency, {best} (fastest)", rows[best]["median_ms"], "target", 5.0, "ms"))
    notes = [
        f"{cfg.data.env} policy, batch 1, {int(rows['eager']['steps'])} DDIM steps; anchors: Diffusion Policy "
        "0.1 s for 10 DDIM steps on an RTX 3080; target on one H100 <= 5 ms"
    ]
    if len(modes) < 3:
        notes.append("CUDA graphs: CUDA only" + ("; torch.compile: skipped in --quick" if quick else ""))
    return SuiteResult(
        "latency", "Policy action-chunk latency", figures, details={"config": config, "modes": rows}, notes=notes
    )


BEGIN, END = "<!-- mmx bench gpu: begin -->", "<!-- mmx bench gpu: end -->"


def results_section(report: Any) -> str:
    """The GPU section of docs/results.md for a report of ``mmx bench gpu``: one table of every figure."""
    m = report.meta
    command = m.get("command", "mmx bench gpu")
    lines = [
        f"Measured by `{command}` on {m['device']} (torch {m['torch']}, diffusers {m['diffusers']}), {m['date']}.",
        "",
        "| suite | figure | value | against | ratio |",
        "|---|---|---|---|---|",
    ]
    for name, suite in report.suites.items():
        for f in suite.figures:
            lines.append(
                f"| {name} | {f.label} | {_num(f.value, f.unit)} | {f.alternative}: {_num(f.other, f.unit)} | "
                f"{_num(f.ratio)} |"
            )
    for name in ("training", "latency", "fsdp"):
        suite = report.suites.get(name)
        if suite is not None:
            lines += [""] + [f"* {name}: {note}" for note in suite.notes]
    for name, message in report.errors.items():
        lines.append(f"* {name} failed: {message}")
    return "\n".join(lines)


def write_section(path: str | Path, text: str) -> Path:
    """Replace what stands between the GPU markers of ``path`` by ``text`` (written whole, then renamed)."""
    path = Path(path)
    old = path.read_text()
    if BEGIN not in old or END not in old or old.index(BEGIN) > old.index(END):
        raise ValueError(f"{path} has no GPU section: add the lines {BEGIN} and {END} where it belongs")
    head, rest = old.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{text.strip()}\n{END}{tail}"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(new)
    os.replace(tmp, path)
    return path


CPU_NOTE = (
    "not run: Accelerate shards models with FSDP on GPUs only (tests/train/test_fsdp.py runs the trainer "
    "under its FSDP2 on two CPU processes)"
)


def fsdp_suite(device: torch.device, quick: bool = False, log: Log = log_info) -> SuiteResult:
    """``mmx bench fsdp``: the trainer under Accelerate's FSDP2 saves, resumes and saves again (CUDA only).

    Two ``accelerate launch --config_file configs/accelerate/fsdp_4gpu.yaml`` runs of the tiny shapes
    recipe, one process per GPU: the first trains 4 steps (a checkpoint at 2 and 4) and saves its
    model; the second resumes the latest checkpoint and trains to step 6. The figure is each run's
    wall time; the details say what each run left (checkpoints, the saved model, the step it ended at).
    """
    import subprocess
    import sys

    if device.type != "cuda":
        return SuiteResult("fsdp", "FSDP2 save and resume", [], notes=[CPU_NOTE])
    gpus = torch.cuda.device_count()
    base = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_config("accelerate/fsdp_4gpu.yaml")),
        "--num_processes", str(gpus), "-m", "mmx.cli", "train", str(_config("shapes_t2i_tiny.yaml")),
        "train.ema=false", "train.checkpoint_every=2", "train.validate_every=2", "train.progress=false",
    ]  # fmt: skip
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="mmx-bench-fsdp-") as tmp:
        out = Path(tmp) / "run"
        for label, extra in (("train", ["train.max_steps=4"]), ("resume", ["train.max_steps=6", "--resume", "latest"])):
            start = time.perf_counter()
            done = subprocess.run([*base, *extra, "--out", str(out)], capture_output=True, text=True, timeout=300)
            seconds = time.perf_counter() - start
            checkpoints = sorted(p.name for p in (out / "checkpoints").glob("step_*")) if out.exists() else []
            runs[label] = {
                "exit_code": done.returncode,
                "seconds": seconds,
                "checkpoints": checkpoints,
                "model_saved": (out / "model" / "unet" / "config.json").is_file(),
                "output_tail": (done.stdout + done.stderr)[-3000:] if done.returncode else "",
            }
            log(f"fsdp {label}: exit {done.returncode} in {seconds:.1f} s; checkpoints {checkpoints}")
    ok = all(r["exit_code"] == 0 and r["model_saved"] for r in runs.values())
    ok = ok and runs["resume"]["checkpoints"][-1:] == ["step_0000006"]
    figures = [Figure(f"FSDP2 {label} run (tiny recipe)", r["seconds"], "train run", runs["train"]["seconds"], "s")
               for label, r in runs.items()]  # fmt: skip
    notes = [
        f"FSDP2 on {gpus} GPU(s): "
        + ("saved, resumed and saved again" if ok else "FAILED: see details.runs for the output")
    ]
    return SuiteResult("fsdp", "FSDP2 save and resume", figures, details={"runs": runs, "ok": ok}, notes=notes)
