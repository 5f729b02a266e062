"""Does a targets policy know which shape the instruction names before it starts moving?

A success rate can hide a policy that wanders over the targets until it lands on the right one.
This check asks each fresh scene for one action chunk from the first observation and reads
which target the planned path reaches first (the first point within the success radius of a
target; if none, the target nearest its end). Chance is 1 in 3. It then lets the expert walk
``--expert-steps`` steps and asks again, from a mid-episode observation.

    python scripts/policy_first_chunk.py runs/targets --episodes 100 [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from mmx.data.envs import TargetsEnv
from mmx.eval.rollout import stack_history
from mmx.train.policy import load_policy_run


def planned_target(env: TargetsEnv, chunk: np.ndarray) -> int:
    """Index of the target the planned positions ``chunk [T, 2]`` reach first (else the nearest to its end)."""
    centres = np.array([t.centre for t in env.targets])
    for point in chunk:
        distances = np.hypot(*(centres - point).T)
        if distances.min() < env.success_radius:
            return int(np.argmin(distances))
    return int(np.argmin(np.hypot(*(centres - chunk[-1]).T)))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", help="a policy run folder trained on the targets simulator")
    parser.add_argument("--episodes", type=int, default=100)
    parser.add_argument("--seed", type=int, default=100_000, help="first scene seed (as mmx eval)")
    parser.add_argument("--expert-steps", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.episodes < 1 or args.expert_steps < 0:
        parser.error(f"--episodes must be >= 1 and --expert-steps >= 0; got {args.episodes}, {args.expert_steps}")

    cfg, policy = load_policy_run(args.run)
    if cfg.data.env != "targets":
        parser.error(f"{args.run} was trained on {cfg.data.env!r}, not the targets simulator")
    generator = torch.Generator().manual_seed(0)

    def plan(history: list) -> np.ndarray:
        obs = stack_history([history], policy.n_obs_steps)
        return policy.predict_action(obs, generator=generator)["action_pred"][0].numpy()

    first = later = asked_later = 0
    for i in range(args.episodes):
        env = TargetsEnv()
        history = [env.reset(args.seed + i)]
        first += planned_target(env, plan(history)) == env.target
        done = False
        for _ in range(args.expert_steps):
            obs, done, _ = env.step(env.expert())
            history.append(obs)
            if done:
                break
        if not done:
            later += planned_target(env, plan(history)) == env.target
            asked_later += 1
    result = {
        "run": str(args.run), "episodes": args.episodes, "first_chunk_named_target": first / args.episodes,
        "expert_steps": args.expert_steps, "later_chunk_named_target": later / max(asked_later, 1),
        "later_asked": asked_later,
    }
    print(f"first chunk heads for the named target: {first}/{args.episodes} (chance: 1/3); "
          f"after {args.expert_steps} expert steps: {later}/{asked_later}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
