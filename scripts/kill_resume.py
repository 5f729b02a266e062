"""Kill-and-resume harness: SIGKILL a training at random points, resume it, compare with an uninterrupted run.

The training is a tiny MLP task defined here (dropout, a seeded noise generator, AdamW, cosine LR
with warm-up, EMA, a checkpoint every 5 of 24 steps, keeping 2), run by this script in a subprocess
(``--child``). The child prints a line per event: every optimiser step (with its loss), and every
stage of writing a checkpoint (accelerate's files one by one, the trainer's state, hashing each file
for the manifest, the manifest, the rename, deleting old checkpoints), pausing briefly after each so
that a kill lands between them. The harness alternates the train phase and the save phase (the 13
save stages in a shuffled cycle), picks a random such event within the next two checkpoints, sends
SIGKILL a random moment after the event's line arrives, records where the child really was, checks
every ``step_N`` folder against its manifest (sizes and sha256), and resumes with ``--resume
latest``; kills go on until the training completes (a chain), then a new chain starts. At the end
of each chain, every tensor of the final training weights, EMA weights and Adam state, and the
loss of every step, must be bit-identical to the uninterrupted run's.

    python scripts/kill_resume.py --json benchmarks/kill_resume.json   # the full run: 26 kill points
    python scripts/kill_resume.py --points 3 --no-ema                  # the CI slice
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCRIPT = Path(__file__).resolve()
STEPS, EVERY, KEEP = 24, 5, 2


# --------------------------------------------------------------------------- the child: one training


class TinyTask:
    """Regression with an MLP: dropout uses the global RNG, the input noise the trainer's generator."""

    def __init__(self) -> None:
        import torch
        from torch import nn

        torch.manual_seed(0)
        self.model = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Dropout(0.1), nn.Linear(32, 4))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 8, generator=g)
        self.y = torch.tanh(self.x @ torch.randn(8, 4, generator=g))

    def train_dataset(self):
        import torch

        return torch.utils.data.TensorDataset(self.x, self.y)

    def collate(self, items):
        import torch

        return torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])

    def loss(self, model, batch, generator):
        import torch
        import torch.nn.functional as F

        x, y = batch
        return F.mse_loss(model(x + 0.1 * torch.randn(x.shape, generator=generator)), y)

    def validate(self, model, step, out_dir):
        return {}

    def save_model(self, model, out_dir):
        from safetensors.torch import save_file

        out_dir.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out_dir / "model.safetensors"))


def child(args: argparse.Namespace) -> None:
    """One training run; prints its events on stdout (flushed line by line)."""
    import accelerate
    import accelerate.checkpointing
    import torch

    import mmx.train.checkpoint as checkpoint
    import mmx.train.trainer as trainer

    torch.set_num_threads(1)
    current = {"step": 0}

    def event(text: str, pause: float) -> None:
        print(f"{text} @{current['step']}", flush=True)
        if pause:
            time.sleep(pause)

    def instrument(owner, name: str, label: str, begin: bool = True) -> None:
        original = getattr(owner, name)

        def wrapper(*a, **k):
            if begin:
                event(f"{label} begin", args.save_delay)
            result = original(*a, **k)
            event(f"{label} end", args.save_delay)
            return result

        setattr(owner, name, wrapper)

    original_save = accelerate.checkpointing.save

    def save_one_file(obj, f, *a, **k):  # accelerate writes the model, optimizer and scheduler through this
        original_save(obj, f, *a, **k)
        event(f"wrote {Path(f).name}", args.save_delay)

    accelerate.checkpointing.save = save_one_file
    instrument(accelerate.Accelerator, "save_state", "save_state")
    instrument(checkpoint, "_save_trainer_files", "trainer_files")
    instrument(checkpoint, "_write_manifest", "manifest")
    instrument(checkpoint, "_publish", "rename")
    instrument(checkpoint, "_prune_checkpoints", "prune")

    original_sha256, original_rmtree = checkpoint._sha256, shutil.rmtree

    def sha256(path, fsync=False):  # fsync=True: hashing a file for the manifest (resuming verifies without it)
        digest = original_sha256(path, fsync)
        if fsync:
            event(f"hashed {Path(path).name}", args.save_delay)
        return digest

    def rmtree(path, *a, **k):  # the retention limit deleting an old checkpoint (already renamed to .trash)
        if Path(path).exists():
            event(f"delete {Path(path).name}", args.save_delay)
        original_rmtree(path, *a, **k)

    checkpoint._sha256, shutil.rmtree = sha256, rmtree

    def on_step(step: int, loss) -> None:
        current["step"] = step
        print(f"step {step} {float(loss).hex()}", flush=True)
        time.sleep(args.step_delay)

    cfg = trainer.TrainConfig(
        max_steps=STEPS,
        batch_size=8,
        lr=1e-2,
        warmup_steps=3,
        checkpoint_every=EVERY,
        checkpoints_total_limit=KEEP,
        validate_every=1000,
        log_every=5,
        ema=args.ema,
        ema_decay=0.9,
        progress=False,
        tensorboard=False,
        seed=0,
    )
    trainer.train(TinyTask(), cfg, args.run_dir, resume=args.resume, on_step=on_step)
    print("done", flush=True)


# --------------------------------------------------------------------------- the harness


def child_command(run_dir: Path, args: argparse.Namespace, resume: bool) -> list[str]:
    cmd = [
        sys.executable,
        str(SCRIPT),
        "--child",
        "--run-dir",
        str(run_dir),
        "--save-delay",
        str(args.save_delay),
        "--step-delay",
        str(args.step_delay),
    ]
    return cmd + (["--resume", "latest"] if resume else []) + ([] if args.ema else ["--no-ema"])


def child_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPT.parents[1]), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_to_end(run_dir: Path, args: argparse.Namespace, resume: bool) -> tuple[list[str], str]:
    """Run a child to completion; its event lines and its stderr."""
    proc = subprocess.run(
        child_command(run_dir, args, resume), capture_output=True, text=True, env=child_env(), timeout=600
    )
    if proc.returncode != 0:
        raise RuntimeError(f"training in {run_dir} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout.splitlines(), proc.stderr


def kill_run(
    run_dir: Path, args: argparse.Namespace, resume: bool, reference: list[str], kinds: list[str], rng: random.Random
) -> dict:
    """Start a child; once its first step shows, pick a later event and SIGKILL the child there.

    The event is of the first kind in ``kinds`` (``step``, or a save stage such as ``hashed`` or
    ``rename end``) that occurs within the next two checkpoints, chosen at random among those.
    Returns what happened (``completed`` when the child finished first).
    """
    start = time.perf_counter()
    proc = subprocess.Popen(
        child_command(run_dir, args, resume), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env()
    )
    seen: list[str] = []
    target = None
    for line in proc.stdout:  # type: ignore[union-attr]
        line = line.rstrip("\n")
        seen.append(line)
        if target is None and line.startswith("step "):
            first_step = int(line.split()[1])
            here = reference.index(next(e for e in reference if e.startswith(f"step {first_step} ")))
            horizon = first_step - 1 + 2 * EVERY  # within the next two checkpoints: several kills per chain
            later = [
                i
                for i in range(here + 1, len(reference))
                if reference[i] != "done" and _step_at(reference[i]) <= horizon
            ]
            wanted = next(
                (
                    [i for i in later if _kind(reference[i]) == kind]
                    for kind in kinds
                    if any(_kind(reference[i]) == kind for i in later)
                ),
                later,
            )
            target = rng.choice(wanted)
            target_key = _key(reference[target])
        if target is not None and _key(line) == target_key:
            # save phase: inside the child's pause after the event; train phase: anywhere in the next steps
            time.sleep(
                rng.uniform(0.0, 0.9 * args.save_delay)
                if _phase(line) == "save"
                else rng.uniform(0.0, 2.5 * args.step_delay)
            )
            proc.send_signal(signal.SIGKILL)
            break
    rest, stderr = proc.communicate()
    seen += [line for line in rest.splitlines() if line]
    if proc.returncode == 0:
        return {"completed": True, "events": seen}
    if proc.returncode != -signal.SIGKILL or target is None:
        raise RuntimeError(
            f"the child was not killed (exit {proc.returncode}) waiting for {reference[target]!r}:\n{stderr[-3000:]}"
        )
    steps = [int(e.split()[1]) for e in seen if e.startswith("step ")]
    return {
        "target": _key(reference[target]),
        "phase": _phase(reference[target]),
        "kind": _kind(reference[target]),
        "last_event": _key(seen[-1]),
        "resumed_at": steps[0] - 1,
        "killed_at_step": steps[-1],
        "events": seen,
        "stderr": stderr,
        "seconds": round(time.perf_counter() - start, 2),
    }


def _phase(line: str) -> str:
    return "train" if line.startswith("step ") else "save"


def _kind(line: str) -> str:
    """``step``, or the save stage: ``save_state begin``, ``wrote``, ``hashed``, ``rename end``, ``delete``, ..."""
    if line.startswith("step "):
        return "step"
    label = line.rsplit(" @", 1)[0]
    return label.split()[0] if label.split()[0] in ("wrote", "hashed", "delete") else label


def _step_at(line: str) -> int:
    """The step an event belongs to: ``step 7 ...`` -> 7, ``wrote optimizer.bin @10`` -> 10."""
    return int(line.split()[1]) if line.startswith("step ") else int(line.rsplit("@", 1)[1])


def _key(line: str) -> str:
    """An event without the loss value: ``step 7`` or ``wrote optimizer.bin @10``."""
    return " ".join(line.split()[:2]) if line.startswith("step ") else line


def check_folders(run_dir: Path) -> dict:
    """Every ``step_N`` folder must pass its manifest (sizes and sha256); what ``--resume latest`` would take."""
    from mmx.train.trainer import CheckpointError, latest_checkpoint, verify_checkpoint

    folders = sorted((run_dir / "checkpoints").glob("step_*")) if (run_dir / "checkpoints").is_dir() else []
    bad = []
    for folder in folders:
        if folder.name.startswith("step_") and folder.name[5:].isdigit():
            try:
                verify_checkpoint(folder)
            except CheckpointError as err:
                bad.append(f"{folder.name}: {err}")
    latest = latest_checkpoint(run_dir)
    return {"folders": [f.name for f in folders], "bad": bad, "latest": latest.name if latest else None}


def final_state(run_dir: Path) -> dict:
    """Training weights and optimizer state of the last checkpoint, the saved (EMA) model, each step's loss."""
    import torch
    from safetensors.torch import load_file

    last = run_dir / "checkpoints" / f"step_{STEPS:07d}"
    optimizer = torch.load(last / "optimizer.bin", map_location="cpu", weights_only=True)
    tensors = {f"train.{k}": v for k, v in load_file(str(last / "model.safetensors")).items()}
    tensors |= {f"saved.{k}": v for k, v in load_file(str(run_dir / "model" / "model.safetensors")).items()}
    for index, slots in optimizer["state"].items():
        tensors |= {f"adam.{index}.{k}": v for k, v in slots.items() if isinstance(v, torch.Tensor)}
    return tensors


def same(a: dict, b: dict) -> tuple[bool, str]:
    import torch

    if a.keys() != b.keys():
        return False, f"different tensors: {sorted(a.keys() ^ b.keys())}"
    for key in a:
        if a[key].shape != b[key].shape or not torch.equal(a[key], b[key]):
            diff = (a[key].float() - b[key].float()).abs().max().item() if a[key].shape == b[key].shape else "shape"
            return False, f"{key} differs (max abs diff {diff})"
    return True, "bit-identical"


def losses_of(lines: list[str], into: dict[int, str]) -> None:
    for line in lines:
        if line.startswith("step "):
            _, step, value = line.split()
            into[int(step)] = value  # a redone step overwrites the killed run's value


def harness(args: argparse.Namespace) -> dict:
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="kill_resume_"))
    if args.keep:
        print(f"run folders: {root}", flush=True)
    t0 = time.perf_counter()
    reference, _ = run_to_end(root / "reference", args, resume=False)
    reference_losses: dict[int, str] = {}
    losses_of(reference, reference_losses)
    expected = final_state(root / "reference")
    save_kinds = sorted({_kind(e) for e in reference if e != "done" and _phase(e) == "save"})
    queue: list[str] = []  # the save stages in a shuffled cycle, so that every stage gets its kills
    points, chains = [], []
    chain = 0
    while len(points) < args.points:
        chain += 1
        run_dir = root / f"chain{chain}"
        losses: dict[int, str] = {}
        kills, resume, finished = 0, False, False
        while len(points) < args.points:
            if len(points) % 2 == 0:
                queue = queue or rng.sample(save_kinds, len(save_kinds))
                kinds = list(queue)
            else:
                kinds = ["step"]
            point = kill_run(run_dir, args, resume, reference, kinds, rng)
            losses_of(point.pop("events"), losses)
            if point.get("completed"):
                finished = True
                break
            if point["kind"] in queue:
                queue.remove(point["kind"])
            stderr = point.pop("stderr")
            point |= {"chain": chain, "fallback_warnings": stderr.count("skipping"), **check_folders(run_dir)}
            points.append(point)
            kills += 1
            resume = True
            print(
                f"  kill {len(points):2d}: chain {chain}, target {point['target']!r:32} "
                f"landed after {point['last_event']!r:32} resumed at {point['resumed_at']:2d}, "
                f"latest now {point['latest']}, bad folders {len(point['bad'])}",
                flush=True,
            )
        if not finished:
            lines, _ = run_to_end(run_dir, args, resume=resume)
            losses_of(lines, losses)
        identical, detail = same(final_state(run_dir), expected)
        chains.append(
            {
                "chain": chain,
                "kills": kills,
                "weights": detail,
                "weights_identical": identical,
                "losses_identical": losses == reference_losses,
            }
        )
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    ok = all(c["weights_identical"] and c["losses_identical"] for c in chains) and not any(p["bad"] for p in points)
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "machine": _machine(),
        "steps": STEPS,
        "checkpoint_every": EVERY,
        "keep": KEEP,
        "ema": args.ema,
        "save_delay_s": args.save_delay,
        "step_delay_s": args.step_delay,
        "seed": args.seed,
        "kill_points": len(points),
        "save_phase": sum(p["phase"] == "save" for p in points),
        "train_phase": sum(p["phase"] == "train" for p in points),
        "save_stages": {k: sum(p["kind"] == k for p in points) for k in save_kinds},
        "chains": chains,
        "points": points,
        "seconds": round(time.perf_counter() - t0, 1),
        "ok": ok,
    }


def _machine() -> str:
    sys.path.insert(0, str(SCRIPT.parent))
    import torch
    from _machine import device_name

    torch.set_num_threads(1)
    return device_name(torch.device("cpu"))


def print_table(result: dict) -> None:
    print(
        "\n| # | chain | phase | kill target | child's last event | step at kill | resumed from | bad step_N folders |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for i, p in enumerate(result["points"], 1):
        print(
            f"| {i} | {p['chain']} | {p['phase']} | `{p['target']}` | `{p['last_event']}` | {p['killed_at_step']} "
            f"| {p['resumed_at']} | {len(p['bad'])} |"
        )
    print("\n| chain | kills | final weights, EMA, Adam state vs uninterrupted | every step's loss |")
    print("|---|---|---|---|")
    for c in result["chains"]:
        losses = "identical" if c["losses_identical"] else "DIFFERENT"
        print(f"| {c['chain']} | {c['kills']} | {c['weights']} | {losses} |")
    stages = result["save_stages"]
    print(
        f"\nsave stages targeted: {sum(v > 0 for v in stages.values())} of {len(stages)}: "
        + ", ".join(f"{k} {v}" for k, v in stages.items())
    )
    print(
        f"{result['kill_points']} kill points ({result['save_phase']} in the save phase, {result['train_phase']} "
        f"in the train phase), {len(result['chains'])} chains, {result['seconds']} s: "
        + ("PASS" if result["ok"] else "FAIL")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=26, help="kill points in all (alternating save / train phase)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill-point choice")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    parser.add_argument("--no-ema", dest="ema", action="store_false", help="train without EMA (skips a slow import)")
    parser.add_argument("--save-delay", type=float, default=0.03, help="child's pause after each save-phase event (s)")
    parser.add_argument("--step-delay", type=float, default=0.02, help="child's pause after each step (s)")
    parser.add_argument("--keep", action="store_true", help="keep the run folders (printed temporary folder)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--resume", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    result = harness(args)
    print_table(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
