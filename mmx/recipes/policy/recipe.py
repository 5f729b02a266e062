"""The policy recipe as a unit: load a run, roll it out in its simulator, show what each action step read."""

from __future__ import annotations

from pathlib import Path

import torch

from mmx.recipes.base import Recipe, RecipeError, Result, Run, check_steps
from mmx.recipes.policy.config import PolicyConfig
from mmx.recipes.policy.task import WEIGHTS, PolicyTask, build_policy

__all__ = ["PolicyRecipe", "RECIPE"]


def _simulator(run: Run) -> str:
    """The run's simulator; rollouts and observations need one (a run trained on a data set alone has none)."""
    cfg = run.config
    if cfg.data.env is None:
        raise RecipeError(
            f"{run.path} was trained on {cfg.data.path} without a simulator (data.env is null): "
            "rollouts and observations need one"
        )
    return cfg.data.env


class PolicyRecipe(Recipe):
    """Observations (and instructions) -> action chunks: a Diffusion-Policy UNet1D with FiLM and/or cross-attention."""

    name = "policy"
    config_class = PolicyConfig
    task_class = PolicyTask
    model_folder = f"model/{WEIGHTS}"

    def load(self, path: Path, overrides: list[str] | None = None, device: str = "cpu") -> Run:
        """The run's config and its DiffusionPolicy with the EMA weights and fitted normaliser (eval mode)."""
        from safetensors.torch import load_file

        from mmx.config import load_config

        path = Path(path)
        cfg = load_config(path / "config.yaml", PolicyConfig, overrides)
        policy = build_policy(cfg)
        weights = path / self.model_folder
        try:
            state = load_file(str(weights))
        except Exception as err:  # safetensors raises its own error types for truncated / corrupt files
            raise RecipeError(f"cannot read the policy weights {weights}: {err}") from None
        policy.load_state_dict(state, strict=True)
        return Run(path, self, cfg, policy.to(device).eval())

    def evaluate(self, run: Run, num: int | None = None, steps: int | None = None) -> Result:
        """``num`` seeded episodes in the run's simulator: success, routes, chunk latency; rollouts.png, eval.json."""
        from mmx.eval.rollout import chunk_latency, evaluate_policy
        from mmx.train.visual import save_rollouts

        cfg, policy = run.config, run.model
        env = _simulator(run)
        check_steps(steps, policy.scheduler)
        if steps is not None:
            policy.num_inference_steps = steps
        episodes = num or cfg.eval.episodes
        result = evaluate_policy(
            policy, env, episodes, cfg.eval.seed, cfg.eval.batch_size, render=cfg.eval.render, progress=True
        )
        latency = chunk_latency(policy, env)
        summary = {
            **result.summary(),
            "episodes": episodes,
            "sampler": cfg.diffusion.sampler,
            "denoising_steps": policy.num_inference_steps,
            "chunk_latency_ms": latency["median_ms"],
        }
        routes = "  ".join(f"{k.removeprefix('route_')} {v:.0%}" for k, v in summary.items() if k.startswith("route_"))
        lines = [
            f"[bold]{env}: success {summary['success_rate']:.1%}[/bold] over {episodes} seeded episodes "
            f"({policy.num_inference_steps} {cfg.diffusion.sampler} steps per chunk)"
        ]
        lines += [f"routes: {routes}"] if routes else []
        lines.append(f"action-chunk latency (batch 1): {latency['median_ms']:.1f} ms median")
        pictures = {}
        if result.frames:
            pictures["rollouts.png"] = lambda path: save_rollouts(
                result, path, title=f"{run.name}: {env} rollouts (green: success)"
            )
        report = {**summary, "seeds": result.seeds, "success": result.success, "infos": result.infos}
        return Result(lines, report, "eval.json", pictures)

    def attend(self, run: Run, prompt: str | None = None, seed: int = 0, steps: int | None = None) -> Result:
        """For the first action chunk of seeded episode ``seed``: each action step's attention over the
        observation tokens (per source step and instruction word) and, for camera images, over image regions."""
        from PIL import Image

        from mmx.attnmap import attend_policy, save_region_overlays, save_token_heatmap
        from mmx.data.envs import make_env
        from mmx.eval.rollout import stack_history

        policy = run.model
        env_name = _simulator(run)
        check_steps(steps, policy.scheduler)
        env = make_env(env_name)
        obs = env.reset(seed=seed)
        if prompt is not None:
            if "instruction" not in obs:
                raise RecipeError(f"the {env_name} task has no instruction to replace with --prompt")
            obs["instruction"] = prompt
        batch = stack_history([[obs]], policy.n_obs_steps)
        action, att = attend_policy(policy, batch, torch.Generator().manual_seed(seed), steps)
        first = policy.n_obs_steps - 1
        executed = (first, first + policy.n_action_steps - 1)
        labels, matrix = att.groups(0)
        what = obs.get("instruction", env_name)
        scene = env.render()
        pictures = {
            "attention_steps.png": lambda path: save_token_heatmap(
                matrix,
                labels,
                path,
                executed=executed,
                title=f"{what!r}: each action step's attention (executed steps boxed)",
            ),
            "scene.png": lambda path: Image.fromarray(scene).save(path),
        }
        for seg in att.segments:
            if seg.kind == "rgb":
                frames = list(batch[seg.name][0].numpy())  # (To, H, W, 3) uint8
                region = att.region_maps(seg.name, 0, slice(executed[0], executed[1] + 1))
                pictures[f"attention_{seg.name}.png"] = lambda path, frames=frames, region=region: save_region_overlays(
                    frames, region, path, title=f"{what!r}: where the executed steps looked"
                )
        share = matrix[executed[0] : executed[1] + 1].mean(0)
        ranked = sorted(zip(labels, share.tolist()), key=lambda kv: -kv[1])
        report = {
            "instruction": obs.get("instruction"),
            "seed": seed,
            "columns": labels,
            "per_action_step": [[round(v, 4) for v in row] for row in matrix.tolist()],
            "executed_steps": list(executed),
            "executed_mean": dict((k, round(v, 4)) for k, v in ranked),
            "action": action["action"][0].tolist(),
        }
        top = ", ".join(f"{k} {v:.2f}" for k, v in ranked[:4])
        return Result([f"executed action steps read most: {top}"], report, "attention.json", pictures)


RECIPE = PolicyRecipe()
