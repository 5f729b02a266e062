"""Two small numpy simulators with scripted demonstrators, for Diffusion-Policy-style action diffusion.

Both live in the unit square with the image convention: the agent is at (x, y) in [0, 1]^2 and
y grows downward, as the positions of the shapes renderer. An action is the next desired position
(absolute, like Diffusion Policy's Push-T targets); each step the agent moves toward it by at most
``max_speed``, never overshooting. Everything is deterministic from the seed given to ``reset``.

* ``ReachEnv`` ("reach"): go around a round obstacle to a goal. The expert takes the upper or the
  lower route with probability 1/2, so its demonstrations are bimodal: a policy that regresses to
  the mean action drives into the obstacle (Chi et al., Diffusion Policy, RSS 2023).
* ``TargetsEnv`` ("targets"): three shapes at three of the five anchors of ``mmx.data.shapes``; the
  instruction ("go to the blue square") names one of them. Observations carry the 32x32 picture.

>>> env = make_env("reach")
>>> obs = env.reset(seed=0)                     # obs["state"]: [4] float32
>>> obs, done, info = env.step(env.expert())    # info["success"], info["collided"], info["route"]
>>> demos = collect_demos("targets", n_episodes=10)  # demos[0]["image"]: [T, 32, 32, 3] uint8
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from mmx.data.shapes import COLOURS, POSITIONS, SHAPES, ShapeSpec, object_masks
from mmx.data.shapes import render as render_shapes
from mmx.registry import UnknownNameError

__all__ = [
    "ENVS",
    "INSTRUCTION_TEMPLATES",
    "Env",
    "ReachEnv",
    "TargetsEnv",
    "collect_demos",
    "make_env",
    "rollout",
]

logger = logging.getLogger(__name__)

Seed = int | Sequence[int]
Observation = dict[str, Any]  # "state" float32 [D]; "image" uint8 [32, 32, 3]; "instruction" str

# The instruction ends with "<colour> <shape>", so the two words that pick the target are adjacent and last.
INSTRUCTION_TEMPLATES: tuple[str, ...] = ("go to the", "move to the", "reach the", "navigate to the")


@runtime_checkable
class Env(Protocol):
    """What policies and the rollout evaluator use: reset, step, the expert's action and a picture."""

    name: str
    action_dim: int
    max_steps: int

    def reset(self, seed: Seed) -> Observation: ...

    def step(self, action: np.ndarray) -> tuple[Observation, bool, dict[str, Any]]: ...

    def expert(self) -> np.ndarray: ...

    def render(self, size: int = 96) -> np.ndarray: ...


# ------------------------------------------------------------------------------------- geometry


def _move_toward(position: np.ndarray, target: np.ndarray, max_speed: float) -> np.ndarray:
    """The point at most ``max_speed`` from ``position`` on the way to ``target`` (no overshoot)."""
    delta = target - position
    length = float(np.hypot(*delta))
    if length <= max_speed:
        return target.copy()
    return position + delta * (max_speed / length)


def _segment_distance(p: np.ndarray, q: np.ndarray, c: np.ndarray) -> float:
    """Distance from point ``c`` to the segment from ``p`` to ``q``."""
    d = q - p
    denom = float(d @ d)
    t = 0.0 if denom == 0.0 else float(np.clip((c - p) @ d / denom, 0.0, 1.0))
    return float(np.hypot(*(p + t * d - c)))


def _along(points: Sequence[np.ndarray], distance: float) -> np.ndarray:
    """The point ``distance`` along the polyline through ``points`` (its end if the line is shorter)."""
    for a, b in zip(points[:-1], points[1:]):
        length = float(np.hypot(*(b - a)))
        if distance <= length:
            return a + (b - a) * (distance / length) if length > 0 else b.copy()
        distance -= length
    return points[-1].copy()


def _check_action(action: np.ndarray, action_dim: int) -> np.ndarray:
    action = np.asarray(action, dtype=np.float64).reshape(-1)
    if action.shape != (action_dim,):
        raise ValueError(f"action must have {action_dim} values (the next position x, y); got shape {action.shape}")
    if not np.all(np.isfinite(action)):
        raise ValueError(f"action must be finite; got {action}")
    return np.clip(action, 0.0, 1.0)


# -------------------------------------------------------------------------------------- drawing


def _pixel_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates as fractions of the image: x [1, W], y [H, 1]."""
    grid = (np.arange(size) + 0.5) / size
    return grid[None, :], grid[:, None]


def _disc(image: np.ndarray, centre: Sequence[float], radius: float, colour: Sequence[int]) -> None:
    """Paint pixels whose centres lie within ``radius`` (fraction of the image) of ``centre``."""
    x, y = _pixel_grid(image.shape[0])
    image[(x - centre[0]) ** 2 + (y - centre[1]) ** 2 <= radius**2] = colour


def _ring(image: np.ndarray, centre: Sequence[float], radius: float, width: float, colour: Sequence[int]) -> None:
    """Paint a circle outline of ``width`` (fraction of the image)."""
    x, y = _pixel_grid(image.shape[0])
    r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2)
    image[np.abs(r - radius) <= width / 2] = colour


def _polyline(image: np.ndarray, points: np.ndarray, width: float, colour: Sequence[int]) -> None:
    """Paint the path through ``points`` [N, 2] with a line ``width`` wide (fraction of the image)."""
    if len(points) < 2:
        return
    x, y = _pixel_grid(image.shape[0])
    pix = np.stack(np.broadcast_arrays(x, y), axis=-1)[None]  # [1, H, W, 2]
    p, q = points[:-1, None, None], points[1:, None, None]  # [N-1, 1, 1, 2]
    d = q - p
    denom = np.maximum((d**2).sum(-1), 1e-12)  # [N-1, 1, 1]
    t = np.clip(((pix - p) * d).sum(-1) / denom, 0.0, 1.0)  # [N-1, H, W]
    dist = np.linalg.norm(p + t[..., None] * d - pix, axis=-1).min(axis=0)  # [H, W]
    image[dist <= width / 2] = colour


class _Sim:
    """State shared by both tasks: agent position, its path, step count, done flag."""

    name = ""
    action_dim = 2

    def __init__(self, max_steps: int, max_speed: float, expert_speed: float) -> None:
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1; got {max_steps}")
        if not 0 < max_speed <= 1:
            raise ValueError(f"max_speed must be in (0, 1]; got {max_speed}")
        if not 0 < expert_speed <= 1:
            raise ValueError(f"expert_speed (a fraction of max_speed) must be in (0, 1]; got {expert_speed}")
        self.max_steps, self.max_speed = max_steps, max_speed
        self.expert_speed = expert_speed * max_speed  # per step, slightly below max_speed: the move is exact
        self._agent: np.ndarray | None = None
        self._path: list[np.ndarray] = []
        self._steps = 0
        self._done = False

    @property
    def agent(self) -> np.ndarray:
        """The agent's (x, y), float64 [2]."""
        if self._agent is None:
            raise RuntimeError(f"{type(self).__name__}: call reset(seed) first")
        return self._agent.copy()

    @property
    def trajectory(self) -> np.ndarray:
        """Agent positions since reset, the start included: [steps + 1, 2] float64."""
        return np.array(self._path, dtype=np.float64).reshape(-1, 2)

    @property
    def steps(self) -> int:
        """Steps taken since reset."""
        return self._steps

    def _start(self, agent: np.ndarray) -> None:
        self._agent = agent.astype(np.float64)
        self._path = [self._agent.copy()]
        self._steps = 0
        self._done = False

    def _begin_step(self, action: np.ndarray) -> np.ndarray:
        if self._agent is None:
            raise RuntimeError(f"{type(self).__name__}: call reset(seed) before step")
        if self._done:
            raise RuntimeError(f"{type(self).__name__}: the episode is over; call reset(seed)")
        return _check_action(action, self.action_dim)

    def _finish_step(self, position: np.ndarray, done: bool) -> bool:
        self._agent = position
        self._path.append(position.copy())
        self._steps += 1
        self._done = done or self._steps >= self.max_steps
        return self._done


# ------------------------------------------------------------------------------------------ reach


class ReachEnv(_Sim):
    """Reach a goal past a round obstacle; the expert goes above or below it with probability 1/2 each.

    obs["state"] = [agent_x, agent_y, goal_x, goal_y] float32. A move whose segment enters the
    obstacle is blocked (the agent stays) and the episode can no longer succeed. The episode ends
    within ``goal_radius`` of the goal or after ``max_steps``. ``info["route"]`` is "upper" or
    "lower" by the agent's y where it first crossed x = 0.5 (None before that).
    """

    name = "reach"
    OBSTACLE_CENTRE = (0.5, 0.5)
    OBSTACLE_RADIUS = 0.2
    START = (0.1, 0.5)
    GOAL = (0.9, 0.5)
    JITTER = 0.05
    ROUTES = ("upper", "lower")

    def __init__(
        self,
        max_steps: int = 60,
        max_speed: float = 0.05,
        expert_speed: float = 0.9,
        goal_radius: float = 0.05,
        clearance: float = 0.1,
    ) -> None:
        super().__init__(max_steps, max_speed, expert_speed)
        if not 0 < clearance <= 0.25:
            raise ValueError(f"clearance must be in (0, 0.25] so the detour stays inside the square; got {clearance}")
        self.goal_radius = goal_radius
        self.clearance = clearance
        self._centre = np.array(self.OBSTACLE_CENTRE)
        self._goal = np.zeros(2)
        self._route: str | None = None
        self._expert_route = "upper"
        self._collided = False

    def reset(self, seed: Seed) -> Observation:
        """Start an episode: jittered start and goal, and the expert's route, all from ``seed``."""
        rng = np.random.default_rng(seed)
        start = np.array(self.START) + rng.uniform(-self.JITTER, self.JITTER, size=2)
        self._goal = np.array(self.GOAL) + rng.uniform(-self.JITTER, self.JITTER, size=2)
        self._expert_route = self.ROUTES[int(rng.integers(2))]
        self._start(start)
        self._route = None
        self._collided = False
        return self._observation()

    def _observation(self) -> Observation:
        return {"state": np.concatenate([self.agent, self._goal]).astype(np.float32)}  # [4]

    def info(self) -> dict[str, Any]:
        """success, collided, route, the distance to the goal and the step count."""
        distance = float(np.hypot(*(self.agent - self._goal)))
        return {
            "success": distance < self.goal_radius and not self._collided,
            "collided": self._collided,
            "route": self._route,
            "distance": distance,
            "steps": self._steps,
        }

    def step(self, action: np.ndarray) -> tuple[Observation, bool, dict[str, Any]]:
        """Move toward ``action`` (the next desired position) by at most ``max_speed``."""
        action = self._begin_step(action)
        old = self._agent
        new = _move_toward(old, action, self.max_speed)
        if _segment_distance(old, new, self._centre) < self.OBSTACLE_RADIUS:
            self._collided, new = True, old.copy()  # blocked: stay outside the obstacle
        elif self._route is None and (old[0] - 0.5) * (new[0] - 0.5) <= 0 and old[0] != new[0]:
            y = old[1] + (new[1] - old[1]) * (0.5 - old[0]) / (new[0] - old[0])  # y where x crosses 0.5
            self._route = "upper" if y < self._centre[1] else "lower"
        reached = float(np.hypot(*(new - self._goal))) < self.goal_radius
        done = self._finish_step(new, reached)
        return self._observation(), done, self.info()

    @property
    def expert_route(self) -> str:
        """The route the expert drew at reset: "upper" or "lower"."""
        return self._expert_route

    def waypoints(self, route: str | None = None) -> np.ndarray:
        """The expert's detour: three points on a circle ``clearance`` outside the obstacle, [3, 2]."""
        route = route or self._expert_route
        sign = -1.0 if route == "upper" else 1.0
        r = self.OBSTACLE_RADIUS + self.clearance
        angles = np.deg2rad([135.0, 90.0, 45.0])  # left of, over/under, right of the obstacle
        return self._centre + r * np.stack([np.cos(angles), sign * np.sin(angles)], axis=-1)

    def expert(self) -> np.ndarray:
        """The point ``expert_speed`` further along the expert's path: waypoints ahead (by x), then the goal."""
        agent = self.agent
        ahead = [w for w in self.waypoints() if w[0] > agent[0] + 1e-9]
        return _along([agent, *ahead, self._goal], self.expert_speed).astype(np.float32)

    def render(self, size: int = 96) -> np.ndarray:
        """uint8 [size, size, 3]: obstacle (red after a collision), goal zone, path and agent on white."""
        image = np.full((size, size, 3), 255, dtype=np.uint8)
        obstacle = (200, 70, 70) if self._collided else (110, 110, 110)
        _disc(image, self._centre, self.OBSTACLE_RADIUS, obstacle)
        _disc(image, self._goal, self.goal_radius, (120, 210, 120))
        _disc(image, self._goal, 0.015, (0, 120, 0))
        if self._agent is not None:
            _polyline(image, self.trajectory, max(1.5 / size, 0.012), (90, 140, 230))
            _disc(image, self._agent, 0.03, (20, 40, 160))
        return image


# ---------------------------------------------------------------------------------------- targets


class TargetsEnv(_Sim):
    """Go to the one of three shapes that the instruction names ("go to the blue square").

    Every scene has a "hub" (colour c, shape s) with one distractor (c, s') and one (c', s): the hub
    needs both words, the (c, s') object only its shape word, the (c', s) object only its colour
    word. The hub is named with probability ``both_words_prob`` and each other object with half the
    rest; the default 1/3 names the three uniformly, so the picture alone never tells which object
    is named (with more, a policy that ignores the instruction reaches the hub that often).

    obs: "image" uint8 [32, 32, 3] (the shapes and a white agent dot), "state" [agent_x, agent_y]
    float32, "instruction" str. Success: within ``success_radius`` of the named target's centre
    (the episode ends). info["target"]: index of the named target in ``targets``; info["reached"]:
    index of the target the agent is on now (within ``success_radius``), or None.
    """

    name = "targets"
    DOT_RADIUS = 1.5  # pixels of the observation image
    MIN_START_DISTANCE = 0.25
    START_MARGIN = 0.05

    def __init__(
        self,
        max_steps: int = 40,
        max_speed: float = 0.05,
        expert_speed: float = 0.9,
        success_radius: float = 0.08,
        image_size: int = 32,
        both_words_prob: float = 1 / 3,
    ) -> None:
        super().__init__(max_steps, max_speed, expert_speed)
        if not 0 <= both_words_prob <= 1:
            raise ValueError(f"both_words_prob must be in [0, 1]; got {both_words_prob}")
        self.success_radius = success_radius
        self.image_size = image_size
        self.both_words_prob = both_words_prob
        self.targets: list[ShapeSpec] = []
        self.target = 0
        self.instruction = ""
        self._scene = np.zeros((image_size, image_size, 3), dtype=np.uint8)
        self._centres = np.zeros((0, 2))

    def reset(self, seed: Seed) -> Observation:
        """Start an episode: three targets, the named one, the instruction and the start, all from ``seed``."""
        rng = np.random.default_rng(seed)
        colours, shapes = list(COLOURS), list(SHAPES)
        c, c_other = rng.choice(len(colours), size=2, replace=False)
        s, s_other = rng.choice(len(shapes), size=2, replace=False)
        kinds = [(colours[c], shapes[s]), (colours[c], shapes[s_other]), (colours[c_other], shapes[s])]
        rest = (1 - self.both_words_prob) / 2
        named = int(rng.choice(3, p=[self.both_words_prob, rest, rest]))
        order = rng.permutation(3)
        places = rng.choice(list(POSITIONS), size=3, replace=False)
        self.targets = [ShapeSpec(*kinds[k], str(p)) for k, p in zip(order, places)]
        self.target = int(np.flatnonzero(order == named)[0])
        self._centres = np.array([t.centre for t in self.targets], dtype=np.float64)  # [3, 2]
        template = INSTRUCTION_TEMPLATES[int(rng.integers(len(INSTRUCTION_TEMPLATES)))]
        self.instruction = f"{template} {kinds[named][0]} {kinds[named][1]}"
        self._scene = render_shapes(self.targets, self.image_size)
        self._target_mask = object_masks([self.targets[self.target]], self.image_size)[0]
        lo, hi = self.START_MARGIN, 1 - self.START_MARGIN
        while True:  # rejection sampling; well over half the square qualifies
            start = rng.uniform(lo, hi, size=2)
            if np.min(np.hypot(*(self._centres - start).T)) >= self.MIN_START_DISTANCE:
                break
        self._start(start)
        return self._observation()

    def target_mask(self) -> np.ndarray:
        """bool [H, W]: the named target's pixels in the observation image (where a policy should look)."""
        if not self.targets:
            raise RuntimeError(f"{type(self).__name__}: call reset(seed) first")
        return self._target_mask.copy()

    def annotations(self) -> dict[str, np.ndarray]:
        """Per-step training labels beside the observation: ``target_mask`` (see :meth:`target_mask`)."""
        return {"target_mask": self.target_mask()}

    def _observation(self) -> Observation:
        image = self._scene.copy()
        _disc(image, self.agent, self.DOT_RADIUS / self.image_size, (255, 255, 255))
        return {"image": image, "state": self.agent.astype(np.float32), "instruction": self.instruction}

    def _on(self, position: np.ndarray) -> int | None:
        """Index of the target within ``success_radius`` of ``position``, or None."""
        distances = np.hypot(*(self._centres - position).T)  # [3]
        k = int(np.argmin(distances))
        return k if distances[k] < self.success_radius else None

    def info(self) -> dict[str, Any]:
        """success, target, reached and the step count."""
        reached = self._on(self.agent)
        return {"success": reached == self.target, "target": self.target, "reached": reached, "steps": self._steps}

    def step(self, action: np.ndarray) -> tuple[Observation, bool, dict[str, Any]]:
        """Move toward ``action`` (the next desired position) by at most ``max_speed``."""
        action = self._begin_step(action)
        new = _move_toward(self._agent, action, self.max_speed)
        success = self._on(new) == self.target
        done = self._finish_step(new, success)
        return self._observation(), done, self.info()

    def expert(self) -> np.ndarray:
        """The point ``expert_speed`` along the straight line to the named target's centre."""
        return _move_toward(self.agent, self._centres[self.target], self.expert_speed).astype(np.float32)

    def render(self, size: int = 96) -> np.ndarray:
        """uint8 [size, size, 3]: the shapes, a ring around the named one, the path and the agent."""
        image = render_shapes(self.targets, size, antialias=True)
        if self.targets:
            _ring(image, self._centres[self.target], self.success_radius + 0.1, max(1.5 / size, 0.012), (150, 150, 150))
        if self._agent is not None:
            _polyline(image, self.trajectory, max(1.5 / size, 0.012), (170, 170, 170))
            _disc(image, self._agent, self.DOT_RADIUS / 32, (255, 255, 255))
        return image


# -------------------------------------------------------------------------------- registry, data

ENVS: dict[str, type] = {"reach": ReachEnv, "targets": TargetsEnv}


def make_env(name: str, **kwargs: Any) -> Env:
    """Build the environment registered as ``name``; an unknown name lists the valid ones."""
    if name not in ENVS:
        raise UnknownNameError(f"unknown environment {name!r}; valid names: {', '.join(sorted(ENVS))}")
    return ENVS[name](**kwargs)


def _stack(values: list[Any]) -> np.ndarray:
    if isinstance(values[0], str):
        return np.array(values, dtype=np.str_)  # [T] unicode
    return np.stack(values)


def collect_demos(
    env_name_or_env: str | Env,
    n_episodes: int,
    seed: int = 0,
    noise: float = 0.0,
    progress: bool = False,
) -> list[dict[str, np.ndarray]]:
    """Scripted demonstrations: one dict per successful episode of per-step arrays.

    Each observation key is stacked over the T steps ("state" [T, D] float32, "image" [T, H, W, 3]
    uint8, "instruction" [T] unicode) beside "action" [T, 2] float32, the expert's action for that
    observation. An env with an ``annotations()`` method adds its per-step labels too (TargetsEnv:
    "target_mask" [T, H, W] bool, the named target's pixels), which are never observations but
    may supervise training (e.g. a policy's ``attention_supervision``). Episode ``i`` is
    ``reset((seed, i))``. With ``noise`` > 0 the executed action is the expert's plus Gaussian
    noise of that standard deviation (per coordinate, from ``(seed, i, 1)``) while the recorded
    action stays the expert's, so the data show how to recover from drift.
    Failed episodes are dropped and counted in a warning.
    """
    env = make_env(env_name_or_env) if isinstance(env_name_or_env, str) else env_name_or_env
    if n_episodes < 0:
        raise ValueError(f"n_episodes must be >= 0; got {n_episodes}")
    if noise < 0:
        raise ValueError(f"noise must be >= 0; got {noise}")
    episodes = range(n_episodes)
    if progress:
        from tqdm.auto import tqdm

        episodes = tqdm(episodes, desc=f"{env.name} demos")
    demos, failures = [], 0
    for i in episodes:
        noise_rng = np.random.default_rng([seed, i, 1])
        obs = env.reset((seed, i))
        annotate = getattr(env, "annotations", None)
        labels = annotate() if annotate is not None else {}
        steps: dict[str, list[Any]] = {key: [] for key in (*obs, *labels, "action")}
        done, info = False, {"success": False}
        while not done:
            action = env.expert()
            for key, value in {**obs, **labels}.items():
                steps[key].append(value)
            steps["action"].append(action)
            executed = action + noise * noise_rng.standard_normal(action.shape) if noise else action
            obs, done, info = env.step(executed)
            if annotate is not None and not done:
                labels = annotate()
        if info["success"]:
            demo = {key: _stack(values) for key, values in steps.items()}
            demo["action"] = demo["action"].astype(np.float32)
            demos.append(demo)
        else:
            failures += 1
    if failures:
        logger.warning(
            "collect_demos(%s): %d of %d expert episodes failed and were dropped", env.name, failures, n_episodes
        )
    lengths = [len(d["action"]) for d in demos]
    if lengths:
        logger.info(
            "collect_demos(%s): %d episodes, length mean %.1f, min %d, max %d",
            env.name, len(demos), float(np.mean(lengths)), min(lengths), max(lengths),
        )  # fmt: skip
    return demos


def rollout(
    env: Env,
    policy_fn: Callable[[list[Observation]], np.ndarray],
    seed: Seed,
    n_action_steps: int | None = None,
) -> dict[str, Any]:
    """Run one receding-horizon episode: ``policy_fn(history)`` returns a chunk of actions [k, 2].

    The env executes the first ``n_action_steps`` of each chunk (all when None), then asks again,
    until the episode ends. ``history`` holds every observation so far (the caller keeps the last
    n_obs_steps). Returns the last info (success, steps, route / target / reached, ...) plus
    "trajectory" [steps + 1, 2] agent positions (start included) and "chunks" (policy calls).
    """
    if n_action_steps is not None and n_action_steps < 1:
        raise ValueError(f"n_action_steps must be >= 1 or None; got {n_action_steps}")
    history = [env.reset(seed)]
    done, info, chunks = False, {}, 0
    while not done:
        actions = np.asarray(policy_fn(history), dtype=np.float64).reshape(-1, env.action_dim)  # [k, 2]
        chunks += 1
        if len(actions) == 0:
            raise ValueError("policy_fn returned no actions")
        for action in actions[:n_action_steps]:
            obs, done, info = env.step(action)
            history.append(obs)
            if done:
                break
    trajectory = getattr(env, "trajectory", None)
    if trajectory is None:
        trajectory = np.stack([np.asarray(o["state"])[:2] for o in history])
    return {**info, "trajectory": np.asarray(trajectory, dtype=np.float64), "chunks": chunks}
