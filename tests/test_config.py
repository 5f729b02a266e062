"""Configs are data: strict YAML -> dataclass with errors that name the key and what was expected."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from mmx.config import ConfigError, apply_overrides, from_dict, load_config, save_config, to_dict


@dataclass
class Inner:
    steps: int = 10
    lr: float = 1e-3
    mode: Literal["a", "b"] = "a"


@dataclass
class Outer:
    name: str = "x"
    sizes: tuple[int, ...] = (1, 2)
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)
    extra: dict = field(default_factory=dict)


def test_round_trip_and_conversions(tmp_path):
    cfg = from_dict(Outer, {"sizes": [3, 4, 5], "inner": {"lr": 1, "mode": "b"}, "limit": 7})
    assert cfg.sizes == (3, 4, 5) and cfg.inner.lr == 1.0 and isinstance(cfg.inner.lr, float)
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", Outer) == cfg
    assert to_dict(cfg)["sizes"] == [3, 4, 5]


def test_unknown_key_lists_valid_keys():
    with pytest.raises(
        ConfigError, match=r"unknown key\(s\) inner.stpes in Inner; valid keys: inner.steps, inner.lr, inner.mode"
    ):
        from_dict(Outer, {"inner": {"stpes": 3}})


def test_wrong_type_names_key_value_and_type():
    with pytest.raises(ConfigError, match=r"inner.steps: expected int; got str 'ten'"):
        from_dict(Outer, {"inner": {"steps": "ten"}})
    with pytest.raises(ConfigError, match=r"sizes\[1\]: expected int; got float 2.5"):
        from_dict(Outer, {"sizes": [1, 2.5]})
    with pytest.raises(ConfigError, match=r"inner.mode: 'c' is not one of 'a', 'b'"):
        from_dict(Outer, {"inner": {"mode": "c"}})
    with pytest.raises(ConfigError, match=r"limit: 'many' is not a int \| None"):
        from_dict(Outer, {"limit": "many"})
    with pytest.raises(ConfigError, match=r"inner.steps: expected int; got bool True"):
        from_dict(Outer, {"inner": {"steps": True}})


def test_overrides_with_dots_and_yaml_values(tmp_path):
    data = apply_overrides({"inner": {"steps": 1}}, ["inner.steps=5", "sizes=[8, 9]", "limit=null", "name=hello world"])
    cfg = from_dict(Outer, data)
    assert cfg.inner.steps == 5 and cfg.sizes == (8, 9) and cfg.limit is None and cfg.name == "hello world"
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["inner.steps"])


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml", Outer)
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(bad, Outer)
