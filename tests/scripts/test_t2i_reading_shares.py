"""scripts/t2i_reading_shares.py on the shipped demo model: shares of each split that sum to one."""

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _script():
    spec = importlib.util.spec_from_file_location("t2i_reading_shares", ROOT / "scripts" / "t2i_reading_shares.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_reading_shares_of_the_demo_model(tmp_path):
    out = tmp_path / "shares.json"
    result = _script().main([str(ROOT / "mmx" / "assets" / "shapes_t2i"), "--num", "3", "--json", str(out)])
    assert set(result) == {"train", "heldout"} and out.is_file()
    for shares in result.values():
        assert shares["objects"] >= 3  # every sample has 1-2 objects, each at least half covering a grid cell
        assert 0 < shares["colour"] < 1 and 0 < shares["shape"] < 1
        assert shares["colour"] + shares["shape"] + shares["other"] == pytest.approx(1.0)
    with pytest.raises(SystemExit):
        _script().main([str(ROOT / "mmx" / "assets" / "shapes_t2i"), "--t", "5000"])
