"""Smoke run of scripts/policy_first_chunk.py on a tiny targets policy: it plans, scores and writes its JSON."""

import importlib.util
import json
from pathlib import Path

import pytest

from mmx.config import load_config
from mmx.train import train
from mmx.train.policy import PolicyConfig, PolicyTask

SCRIPT = Path(__file__).parents[2] / "scripts" / "policy_first_chunk.py"


def _script():
    spec = importlib.util.spec_from_file_location("policy_first_chunk", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_first_chunk_check_on_a_tiny_targets_run(tmp_path):
    cfg = load_config("configs/policy_targets_tiny.yaml", PolicyConfig)
    cfg.train.max_steps, cfg.eval.val_episodes = 2, 0
    train(PolicyTask(cfg, tmp_path / "run"), cfg.train, tmp_path / "run")
    script = _script()
    out = tmp_path / "first.json"
    result = script.main([str(tmp_path / "run"), "--episodes", "3", "--expert-steps", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == result
    assert result["episodes"] == 3 and 0 <= result["first_chunk_named_target"] <= 1
    assert result["later_asked"] <= 3
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "run"), "--episodes", "0"])


def test_planned_target_is_the_first_target_the_path_reaches():
    import numpy as np

    from mmx.data.envs import TargetsEnv

    env = TargetsEnv()
    env.reset(0)
    centres = np.array([t.centre for t in env.targets])
    path = np.linspace(centres[1], centres[2], 16)  # passes target 1 first, ends on target 2
    assert _script().planned_target(env, path) == 1
    assert _script().planned_target(env, centres[[2]] + 0.2) == int(np.argmin(np.hypot(*(centres - (centres[2] + 0.2)).T)))
