"""Reach and targets simulators: determinism, expert reliability, physics, pictures, demos, rollouts."""

import copy

import numpy as np
import pytest

from mmx.data.envs import ENVS, Env, ReachEnv, TargetsEnv, collect_demos, make_env, rollout
from mmx.data.shapes import COLOURS


def run_expert(env, seed):
    """Run the expert to the end; returns observations (reset included), actions and the last info."""
    observations, actions = [env.reset(seed)], []
    done, info = False, {}
    while not done:
        actions.append(env.expert())
        obs, done, info = env.step(actions[-1])
        observations.append(obs)
    assert info["steps"] == len(actions) == env.steps
    return observations, actions, info


def same_observations(a, b):
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b)
    )


# ---------------------------------------------------------------------------------------- common


@pytest.mark.parametrize("name", ["reach", "targets"])
def test_protocol_and_determinism_by_seed(name):
    env = make_env(name)
    assert isinstance(env, Env) and env.name == name and env.action_dim == 2
    first = run_expert(env, 7)
    again = run_expert(make_env(name), 7)
    other = run_expert(env, 8)
    assert same_observations(first[0], again[0]) and all(np.array_equal(a, b) for a, b in zip(first[1], again[1]))
    assert not same_observations(first[0], other[0])


@pytest.mark.parametrize("name", ["reach", "targets"])
def test_max_speed_respected_without_overshoot(name):
    env = make_env(name, max_speed=0.05)
    env.reset(3)
    rng = np.random.default_rng(0)
    for _ in range(env.max_steps - 1):
        before = env.agent
        action = rng.uniform(0, 1, size=2)
        _, done, info = env.step(action)
        moved = np.hypot(*(env.agent - before))
        assert moved <= 0.05 + 1e-12
        if not info.get("collided") and not done:  # free move: full speed toward a far target, exact for a near one
            assert moved == pytest.approx(min(0.05, np.hypot(*(action - before))))
        if done:
            break
    env.reset(3)
    near = env.agent + np.array([0.01, -0.02])
    env.step(near)
    np.testing.assert_allclose(env.agent, near)  # no overshoot


@pytest.mark.parametrize("name", ["reach", "targets"])
def test_step_outside_an_episode_raises(name):
    env = make_env(name)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(np.array([0.5, 0.5]))
    env.reset(0)
    with pytest.raises(ValueError, match="2 values"):
        env.step(np.zeros(3))
    run_expert(env, 0)
    with pytest.raises(RuntimeError, match="over"):
        env.step(np.array([0.5, 0.5]))


def test_make_env_lists_valid_names():
    assert set(ENVS) == {"reach", "targets"}
    assert isinstance(make_env("reach", max_steps=5), ReachEnv) and make_env("reach", max_steps=5).max_steps == 5
    with pytest.raises(KeyError, match="reach.*targets"):
        make_env("pusht")


# ------------------------------------------------------------------------------------------ reach


def test_reach_expert_succeeds_on_both_routes():
    env = ReachEnv()
    routes = []
    successes = 0
    for seed in range(200):
        _, _, info = run_expert(env, seed)
        successes += info["success"]
        assert not info["collided"]
        assert info["route"] == env.expert_route  # the route detector agrees with what the expert chose
        routes.append(info["route"])
    assert successes >= 198
    assert 0.35 <= routes.count("upper") / len(routes) <= 0.65


def test_reach_collision_blocks_and_fails():
    env = ReachEnv()
    env.reset(0)
    centre = np.array(ReachEnv.OBSTACLE_CENTRE)
    positions = []
    for _ in range(15):  # drive into the obstacle
        _, _, info = env.step(centre)
        positions.append(env.agent)
    assert info["collided"] and not info["success"]
    np.testing.assert_array_equal(positions[-1], positions[-2])  # blocked: it stays put
    assert np.hypot(*(positions[-1] - centre)) >= ReachEnv.OBSTACLE_RADIUS
    done = False
    while not done:  # the expert then brings it to the goal, but the collision is remembered
        _, done, info = env.step(env.expert())
    assert info["distance"] < env.goal_radius and info["collided"] and not info["success"]


def test_reach_straight_line_policy_collides():
    env = ReachEnv()
    result = rollout(env, lambda history: history[-1]["state"][None, 2:4], seed=1)  # aim straight at the goal
    assert result["collided"] and not result["success"]
    assert result["steps"] == env.max_steps and result["route"] is None


def test_reach_render_shows_the_collision():
    env = ReachEnv()
    env.reset(0)
    clean = env.render(64)
    assert clean.shape == (64, 64, 3) and clean.dtype == np.uint8
    for _ in range(15):
        env.step(np.array(ReachEnv.OBSTACLE_CENTRE))
    hit = env.render(64)
    assert tuple(hit[32, 32]) != tuple(clean[32, 32])  # the obstacle turns red
    assert hit[32, 32, 0] > hit[32, 32, 1]


# ---------------------------------------------------------------------------------------- targets


def test_targets_expert_succeeds():
    env = TargetsEnv()
    successes = 0
    for seed in range(200):
        _, _, info = run_expert(env, seed)
        successes += info["success"] and info["reached"] == info["target"]
    assert successes >= 198


def test_targets_image_shows_agent_dot_and_three_targets():
    env = TargetsEnv()
    for seed in range(20):
        obs = env.reset(seed)
        image = obs["image"]
        assert image.shape == (32, 32, 3) and image.dtype == np.uint8
        white = np.argwhere((image == 255).all(-1))  # [N, 2] (row, col)
        assert 4 <= len(white) <= 9
        np.testing.assert_allclose(white.mean(0)[::-1] + 0.5, obs["state"] * 32, atol=1.0)  # dot at the agent
        for spec in env.targets:
            col, row = (np.array(spec.centre) * 32).astype(int)
            assert tuple(image[row, col]) == COLOURS[spec.colour]
        kinds = {(t.colour, t.shape) for t in env.targets}
        assert len(kinds) == 3 and len({t.position for t in env.targets}) == 3
        assert min(np.hypot(*(np.array(t.centre) - obs["state"])) for t in env.targets) >= 0.25
    frame = env.render(96)
    assert frame.shape == (96, 96, 3) and frame.dtype == np.uint8


def test_targets_mask_covers_the_named_target_only():
    env = TargetsEnv()
    for seed in range(20):
        obs = env.reset(seed)
        mask = env.target_mask()
        named = env.targets[env.target]
        assert mask.shape == (32, 32) and 20 <= mask.sum() <= 64  # one 8x8-pixel shape
        pixels = obs["image"][mask]
        assert (
            (pixels == COLOURS[named.colour]).all(-1) | (pixels == 255).all(-1)
        ).all()  # its colour (or the agent dot)
        others = [t for k, t in enumerate(env.targets) if k != env.target]
        col, row = (np.array(named.centre) * 32).astype(int)
        assert mask[row, col] and not any(mask[int(t.centre[1] * 32), int(t.centre[0] * 32)] for t in others)
        assert env.annotations()["target_mask"].tolist() == mask.tolist()


def matches(targets, colour=None, shape=None):
    return [k for k, t in enumerate(targets) if colour in (None, t.colour) and shape in (None, t.shape)]


def test_targets_instruction_needs_its_words():
    counts = {"both": 0, "colour": 0, "shape": 0}
    env = TargetsEnv()
    for seed in range(300):
        obs = env.reset(seed)
        words = obs["instruction"].split()
        colour, shape = words[-2:]
        assert " ".join(words[:-2]) in {"go to the", "move to the", "reach the", "navigate to the"}
        assert matches(env.targets, colour, shape) == [env.target]
        by_colour, by_shape = len(matches(env.targets, colour=colour)), len(matches(env.targets, shape=shape))
        assert by_colour > 1 or by_shape > 1  # one word alone never suffices for both readings
        counts["both" if by_colour > 1 and by_shape > 1 else "colour" if by_shape > 1 else "shape"] += 1
    # The picture alone does not say which object is named: each kind of object is named about 1/3 of the time.
    assert all(60 <= n <= 140 for n in counts.values()), counts
    env = TargetsEnv(both_words_prob=1.0)
    for seed in range(100):
        obs = env.reset(seed)
        colour, shape = obs["instruction"].split()[-2:]
        assert len(matches(env.targets, colour=colour)) == 2 and len(matches(env.targets, shape=shape)) == 2


# ------------------------------------------------------------------------------------ demos, rollout


def test_collect_demos_shapes_dtypes_and_determinism():
    reach = collect_demos("reach", n_episodes=4, seed=3)
    assert len(reach) == 4
    for demo in reach:
        assert set(demo) == {"state", "action"}
        T = len(demo["action"])
        assert demo["state"].shape == (T, 4) and demo["state"].dtype == np.float32
        assert demo["action"].shape == (T, 2) and demo["action"].dtype == np.float32
        np.testing.assert_allclose(demo["action"][:-1], demo["state"][1:, :2], atol=1e-6)  # action = next position
    observations, actions, _ = run_expert(ReachEnv(), (3, 2))  # episode i is reset((seed, i))
    np.testing.assert_array_equal(reach[2]["action"], np.stack(actions))

    targets = collect_demos(TargetsEnv(), n_episodes=3, seed=0, noise=0.01)
    assert len(targets) == 3
    for demo in targets:
        T = len(demo["action"])
        assert set(demo) == {"image", "state", "instruction", "target_mask", "action"}
        assert demo["image"].shape == (T, 32, 32, 3) and demo["image"].dtype == np.uint8
        assert demo["target_mask"].shape == (T, 32, 32) and demo["target_mask"].dtype == bool
        assert demo["state"].shape == (T, 2) and demo["state"].dtype == np.float32
        assert demo["instruction"].shape == (T,) and demo["instruction"].dtype.kind == "U"
        assert len(set(demo["instruction"])) == 1
    again = collect_demos(TargetsEnv(), n_episodes=3, seed=0, noise=0.01)
    assert all(np.array_equal(a["state"], b["state"]) for a, b in zip(targets, again))
    noiseless = collect_demos(TargetsEnv(), n_episodes=3, seed=0)
    assert not np.array_equal(targets[0]["state"], noiseless[0]["state"])


@pytest.mark.parametrize("name", ["reach", "targets"])
def test_rollout_with_expert_chunks(name):
    env = make_env(name)

    def chunk_policy(history, horizon=8):
        sim = copy.deepcopy(env)  # plan open loop on a copy: the expert's next `horizon` actions
        actions = []
        for _ in range(horizon):
            actions.append(sim.expert())
            if sim.step(actions[-1])[1]:
                break
        return np.stack(actions)

    result = rollout(env, chunk_policy, seed=5, n_action_steps=4)
    assert result["success"]
    assert result["chunks"] == -(-result["steps"] // 4)
    assert result["trajectory"].shape == (result["steps"] + 1, 2)
    single = rollout(env, lambda history: env.expert()[None], seed=5)
    assert single["success"] and single["chunks"] == single["steps"] == result["steps"]
    np.testing.assert_allclose(single["trajectory"], result["trajectory"])
