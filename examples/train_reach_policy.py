"""Train a diffusion policy on the built-in reach task from Python, then roll it out.

The scripted demonstrations go around an obstacle by the upper or the lower route, half the
time each; a diffusion policy keeps both routes (a regression policy would average them and hit
the obstacle). The full recipe is configs/policy_reach.yaml (`mmx train` / `mmx eval`).

    python examples/train_reach_policy.py            # about 15 minutes on 2 CPU cores
"""

from __future__ import annotations

import sys
from pathlib import Path


def main(
    steps: int = 3000,
    episodes: int = 200,
    eval_episodes: int = 100,
    out: str = "runs/reach_example",
    batch_size: int = 256,
) -> dict:
    from mmx.config import load_config
    from mmx.eval import evaluate_policy
    from mmx.recipes import load_run
    from mmx.recipes.policy import PolicyConfig, PolicyTask
    from mmx.train import train

    cfg = load_config(Path(__file__).parents[1] / "configs" / "policy_reach.yaml", PolicyConfig)
    cfg.train.max_steps, cfg.train.batch_size, cfg.data.episodes = steps, batch_size, episodes
    task = PolicyTask(cfg, out)  # collects the demonstrations, builds UNet1D + FiLM
    train(task, cfg.train, out)  # Accelerate loop, EMA, checkpoints, rollout panels
    policy = load_run(out).model  # the saved EMA weights and fitted normaliser
    result = evaluate_policy(policy, "reach", episodes=eval_episodes)
    summary = result.summary()
    print(
        f"success {summary['success_rate']:.0%}; routes: "
        + ", ".join(f"{k[6:]} {v:.0%}" for k, v in summary.items() if k.startswith("route_"))
    )
    return summary


if __name__ == "__main__":
    main(*(int(a) for a in sys.argv[1:3]))
