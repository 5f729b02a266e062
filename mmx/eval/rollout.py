"""Policy evaluation: seeded rollouts in the built-in simulators, batched across episodes.

Every episode runs its own simulator; at each decision point the policy denoises one action chunk
for all still-running episodes in one batched call (receding horizon: ``n_action_steps`` actions
are executed, then it plans again). The observation history handed to the policy is the last
``n_obs_steps`` observations, the first one repeated at the start of an episode, as Diffusion
Policy's environment wrapper does.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["RolloutResult", "stack_history", "evaluate_policy", "chunk_latency"]


@dataclass
class RolloutResult:
    """What a batch of seeded episodes did."""

    seeds: list[int]
    success: list[bool]
    steps: list[int]
    infos: list[dict[str, Any]]
    trajectories: list[np.ndarray] = field(repr=False)  # per episode [T, 2] agent positions
    frames: list[np.ndarray] = field(default_factory=list, repr=False)  # final renders, if asked for

    @property
    def success_rate(self) -> float:
        return float(np.mean(self.success)) if self.success else float("nan")

    def share(self, key: str) -> dict[str, float]:
        """Share of episodes per value of ``info[key]`` (e.g. ``route``: upper / lower / None)."""
        values = [str(info.get(key)).lower() for info in self.infos]
        return {v: values.count(v) / len(values) for v in sorted(set(values))} if values else {}

    def summary(self) -> dict[str, float]:
        """Success rate, mean episode length and, where the task has routes, each route's share."""
        out = {"success_rate": self.success_rate, "mean_steps": float(np.mean(self.steps))}
        if any("route" in info for info in self.infos):
            for route, share in self.share("route").items():
                out[f"route_{route}"] = share
        return out


def stack_history(histories: Sequence[Sequence[dict[str, Any]]], n_obs_steps: int) -> dict[str, Any]:
    """Per key ``[B, To, ...]`` arrays from each episode's observation list (strings: the latest per episode)."""
    batch: dict[str, Any] = {}
    for key, first in histories[0][-1].items():
        if isinstance(first, str):
            batch[key] = [h[-1][key] for h in histories]
            continue
        rows = []
        for h in histories:
            recent = list(h[-n_obs_steps:])
            recent = [recent[0]] * (n_obs_steps - len(recent)) + recent  # pad with the first observation
            rows.append(np.stack([np.asarray(o[key]) for o in recent]))
        batch[key] = torch.from_numpy(np.stack(rows))
    return batch


PolicyFn = Callable[[dict[str, Any]], np.ndarray]


def _policy_fn(policy: Any, generator: torch.Generator | None) -> PolicyFn:
    def act(batch: dict[str, Any]) -> np.ndarray:
        return policy.predict_action(batch, generator=generator)["action"].float().cpu().numpy()  # (B, Ta, Da)

    return act


def evaluate_policy(
    policy: Any,
    env: str,
    episodes: int = 50,
    seed: int = 100_000,
    batch_size: int = 64,
    env_kwargs: dict[str, Any] | None = None,
    render: int = 0,
    progress: bool = False,
) -> RolloutResult:
    """Roll ``policy`` out in ``episodes`` seeded episodes of simulator ``env``.

    Args:
        policy: a :class:`mmx.diffusion.DiffusionPolicy` (anything with ``predict_action``,
            ``n_obs_steps`` and ``n_action_steps``).
        env: a simulator name of :func:`mmx.data.envs.make_env` ("reach", "targets").
        episodes: how many episodes; episode i is reset with seed ``seed + i``.
        batch_size: episodes advanced together (one policy call per decision point for all).
        render: keep a final picture of the first ``render`` episodes.
    """
    from tqdm.auto import tqdm

    from mmx.data.envs import make_env

    if episodes < 1:
        raise ValueError(f"episodes must be >= 1; got {episodes}")
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    act = _policy_fn(policy, generator)
    result = RolloutResult(seeds=[], success=[], steps=[], infos=[], trajectories=[])
    bar = tqdm(total=episodes, desc=f"rollouts ({env})", disable=not progress, dynamic_ncols=True)
    for first in range(0, episodes, batch_size):
        seeds = list(range(seed + first, seed + min(episodes, first + batch_size)))
        envs = [make_env(env, **(env_kwargs or {})) for _ in seeds]
        histories = [[e.reset(seed=s)] for e, s in zip(envs, seeds)]
        infos: list[dict[str, Any]] = [{} for _ in envs]
        done = [False] * len(envs)
        steps = [0] * len(envs)
        while not all(done):
            live = [i for i, d in enumerate(done) if not d]
            chunks = act(stack_history([histories[i] for i in live], policy.n_obs_steps))
            for i, chunk in zip(live, chunks):
                for action in chunk[: policy.n_action_steps]:
                    obs, finished, info = envs[i].step(action)
                    histories[i] = histories[i][-policy.n_obs_steps :] + [obs]
                    steps[i] += 1
                    infos[i] = {**info, **({"instruction": obs["instruction"]} if "instruction" in obs else {})}
                    if finished:
                        done[i] = True
                        break
        for i, e in enumerate(envs):
            result.seeds.append(seeds[i])
            result.success.append(bool(infos[i].get("success", False)))
            result.steps.append(steps[i])
            result.infos.append({k: v for k, v in infos[i].items() if k != "success"})
            result.trajectories.append(np.asarray(e.trajectory, dtype=np.float32))  # [steps + 1, 2]
            if len(result.frames) < render:
                result.frames.append(e.render())
        bar.update(len(seeds))
    bar.close()
    return result


def chunk_latency(policy: Any, env: str, repeats: int = 20, warmup: int = 3, seed: int = 0) -> dict[str, float]:
    """Wall-clock milliseconds of one action chunk (batch 1: encode + all denoising steps)."""
    from mmx.data.envs import make_env

    e = make_env(env)
    batch = stack_history([[e.reset(seed=seed)]], policy.n_obs_steps)
    generator = torch.Generator(device=policy.device).manual_seed(seed)
    times = []
    for i in range(warmup + repeats):
        if policy.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        policy.predict_action(batch, generator=generator)
        if policy.device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1000)
    return {
        "median_ms": float(np.median(times)),
        "p90_ms": float(np.percentile(times, 90)),
        "steps": float(policy.num_inference_steps),
    }
