"""Replay buffers in Diffusion Policy's zarr layout, padded windows, episode splits."""

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from mmx.data import trajectory
from mmx.data.trajectory import (
    ReplayBuffer,
    TrajectoryDataset,
    collate_trajectories,
    episode_split,
    sequence_indices,
)

ZARR3 = int(zarr.__version__.split(".")[0]) >= 3


def make_buffer(lengths=(2, 4, 3)):
    """Episodes whose ``t`` is the global step index, plus a 2-D action, an image and an instruction."""
    episodes = []
    step = 0
    for i, length in enumerate(lengths):
        t = np.arange(step, step + length, dtype=np.float32)
        episodes.append(
            {
                "t": t,
                "action": np.stack([t, -t], axis=1),
                "image": np.broadcast_to(t[:, None, None], (length, 3, 3)).astype(np.uint8),
                "instruction": f"episode {i} é",  # 0-d: repeated over the episode
            }
        )
        step += length
    return ReplayBuffer.from_episodes(episodes)


def write_dp_store(store, data, episode_ends, zarr_format=None):
    """A store in Diffusion Policy's layout, written with zarr itself (not with mmx)."""
    kwargs = {"zarr_format": zarr_format} if ZARR3 and zarr_format else {}
    root = zarr.open_group(store=store, mode="w", **kwargs)
    groups = {"data": root.create_group("data"), "meta": root.create_group("meta")}
    arrays = [("data", k, v) for k, v in data.items()] + [("meta", "episode_ends", np.asarray(episode_ends))]
    for group, name, value in arrays:
        if ZARR3:
            groups[group].create_array(name, data=value, chunks=(2,) + value.shape[1:])
        else:
            groups[group].create_dataset(name, data=value, chunks=(2,) + value.shape[1:])


def assert_same(a: ReplayBuffer, b: ReplayBuffer):
    assert a.keys() == b.keys() or sorted(a.keys()) == sorted(b.keys())
    np.testing.assert_array_equal(a.episode_ends, b.episode_ends)
    assert b.episode_ends.dtype == np.int64
    for key in a.keys():
        assert a[key].dtype == b[key].dtype, key
        np.testing.assert_array_equal(a[key], b[key])


# --------------------------------------------------------------------------- buffer


def test_from_episodes_concatenates_and_repeats_scalars():
    buf = make_buffer()
    assert buf.n_episodes == 3 and buf.n_steps == 9
    np.testing.assert_array_equal(buf.episode_ends, [2, 6, 9])
    np.testing.assert_array_equal(buf.episode_lengths, [2, 4, 3])
    assert buf.keys() == ["t", "action", "image", "instruction"]
    ep = buf.episode(1)
    np.testing.assert_array_equal(ep["t"], [2, 3, 4, 5])
    assert ep["instruction"].tolist() == ["episode 1 é"] * 4
    np.testing.assert_array_equal(buf.episode(-1)["t"], [6, 7, 8])
    assert "n_episodes=3" in repr(buf) and "action: float32[2]" in repr(buf)
    with pytest.raises(IndexError, match="episode 3 out of range"):
        buf.episode(3)


def test_constructor_errors_name_key_and_values():
    with pytest.raises(ValueError, match=r"data\['a'\] has 4 steps .* expected 5"):
        ReplayBuffer({"a": np.zeros(4)}, [2, 5])
    with pytest.raises(ValueError, match="strictly increasing"):
        ReplayBuffer({"a": np.zeros(5)}, [3, 3, 5])
    with pytest.raises(ValueError, match="episode_ends must be integers"):
        ReplayBuffer({"a": np.zeros(5)}, [2.0, 5.0])
    with pytest.raises(ValueError, match=r"data\['a'\] has dtype object.*np.asarray"):
        ReplayBuffer({"a": np.array([None] * 5)}, [5])
    with pytest.raises(ValueError, match="without '/'"):
        ReplayBuffer({"a/b": np.zeros(5)}, [5])
    with pytest.raises(ValueError, match="episode 1 has different keys .* missing \\['b'\\]"):
        ReplayBuffer.from_episodes([{"a": [1], "b": [2]}, {"a": [1]}])
    with pytest.raises(ValueError, match="episode 0: keys have different lengths"):
        ReplayBuffer.from_episodes([{"a": [1, 2], "b": [2]}])
    with pytest.raises(ValueError, match="'a' has per-step shape \\(3,\\), episode 0 has \\(2,\\)"):
        ReplayBuffer.from_episodes([{"a": np.zeros((1, 2))}, {"a": np.zeros((1, 3))}])


# --------------------------------------------------------------------------- zarr files


@pytest.mark.parametrize("zarr_format", [2, 3] if ZARR3 else [None])
@pytest.mark.parametrize("as_zip", [False, True])
def test_reads_store_written_in_dp_layout(tmp_path, zarr_format, as_zip):
    rng = np.random.default_rng(0)
    data = {"state": rng.normal(size=(7, 5)).astype(np.float32), "action": rng.normal(size=(7, 2))}
    path = tmp_path / ("demo.zarr.zip" if as_zip else "demo.zarr")
    store = zarr.storage.ZipStore(str(path), mode="w") if as_zip else str(path)
    write_dp_store(store, data, np.array([3, 7], dtype=np.int64), zarr_format)
    if as_zip:
        store.close()
    buf = ReplayBuffer.load(path)
    assert buf.n_episodes == 2 and sorted(buf.keys()) == ["action", "state"]
    np.testing.assert_array_equal(buf["state"], data["state"])
    np.testing.assert_array_equal(buf.episode(1)["action"], data["action"][3:])
    only = ReplayBuffer.load(str(path), keys=["action"])
    assert only.keys() == ["action"]


@pytest.mark.parametrize("name", ["buf.zarr", "buf.zarr.zip"])
def test_save_load_round_trip_with_text(tmp_path, name):
    buf = make_buffer()
    written = buf.save(tmp_path / name)
    assert written.is_dir() == (not name.endswith(".zip"))
    back = ReplayBuffer.load(written)
    assert_same(buf, back)
    assert back["instruction"].dtype.kind == "U"
    assert back.episode(0)["instruction"][0] == "episode 0 é"
    # plain zarr sees Diffusion Policy's layout
    store = zarr.storage.ZipStore(str(written), mode="r") if written.is_file() else str(written)
    root = zarr.open_group(store=store, mode="r")
    np.testing.assert_array_equal(root["meta"]["episode_ends"][:], [2, 6, 9])
    assert root["data"]["action"].shape == (9, 2)
    if written.is_file():
        store.close()


@pytest.mark.parametrize("name", ["buf.zarr", "buf.zarr.zip"])
def test_failed_save_leaves_previous_store_intact(tmp_path, name, monkeypatch):
    path = tmp_path / name
    old = make_buffer((2, 2))
    old.save(path)
    new = make_buffer((5, 5, 5))
    original, calls = trajectory._write_array, []

    def failing(group, key, array):
        calls.append(key)
        if len(calls) == 3:
            raise OSError("disk full")
        original(group, key, array)

    monkeypatch.setattr(trajectory, "_write_array", failing)
    with pytest.raises(OSError, match="disk full"):
        new.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no temporary left behind
    assert_same(old, ReplayBuffer.load(path))
    monkeypatch.setattr(trajectory, "_write_array", original)
    new.save(path)  # a successful save replaces the store
    assert_same(new, ReplayBuffer.load(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]


def test_save_refuses_to_overwrite_non_store(tmp_path):
    precious = tmp_path / "notes.zarr"
    precious.mkdir()
    (precious / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a zarr store"):
        make_buffer().save(precious)
    assert (precious / "keep.txt").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_buffer().save(tmp_path / "missing" / "buf.zarr")


def test_load_errors_name_path_and_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere\.zarr.*does not exist"):
        ReplayBuffer.load(tmp_path / "nowhere.zarr")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty is not a zarr group"):
        ReplayBuffer.load(tmp_path / "empty")
    (tmp_path / "text.zip").write_text("not a zip")
    with pytest.raises(ValueError, match="not a zip archive"):
        ReplayBuffer.load(tmp_path / "text.zip")

    no_meta = tmp_path / "no_meta.zarr"
    root = zarr.open_group(str(no_meta), mode="w")
    root.create_group("data")
    root.create_group("meta")
    with pytest.raises(ValueError, match=r"no_meta\.zarr has no 'meta/episode_ends'"):
        ReplayBuffer.load(no_meta)
    no_data = tmp_path / "no_data.zarr"
    zarr.open_group(str(no_data), mode="w").create_group("meta")
    with pytest.raises(ValueError, match=r"no_data\.zarr has no 'data' group"):
        ReplayBuffer.load(no_data)

    path = make_buffer().save(tmp_path / "ok.zarr")
    with pytest.raises(KeyError, match=r"no data key\(s\) \['obs'\]; available keys: \['action', 'image'"):
        ReplayBuffer.load(path, keys=["action", "obs"])


# --------------------------------------------------------------------------- windows


def reference_indices(ends, horizon, pad_before, pad_after):
    """Window rows by walking every start step one by one (the definition, not the vectorised code)."""
    rows, start = [], 0
    for end in ends:
        length = end - start
        for j in range(-pad_before, length - horizon + pad_after + 1):
            covered = [s for s in range(j, j + horizon) if 0 <= s < length]
            rows.append([start + covered[0], start + covered[-1] + 1, covered[0] - j, covered[-1] + 1 - j])
        start = end
    return np.array(rows, dtype=np.int64).reshape(-1, 4)


def test_sequence_indices_hand_computed():
    np.testing.assert_array_equal(sequence_indices([3], 2), [[0, 2, 0, 2], [1, 3, 0, 2]])
    np.testing.assert_array_equal(sequence_indices([3], 3, 1, 1), [[0, 2, 1, 3], [0, 3, 0, 3], [1, 3, 0, 2]])
    # episode 0 (2 steps) is shorter than the horizon: with padding it still gives windows
    expected = [
        [0, 2, 1, 3],  # episode 0: pad, s0, s1, pad
        [0, 2, 0, 2],  # s0, s1, pad, pad
        [2, 5, 1, 4],  # episode 1 (buffer 2..5): pad, s0, s1, s2
        [2, 6, 0, 4],
        [3, 6, 0, 3],
        [4, 6, 0, 2],
    ]
    np.testing.assert_array_equal(sequence_indices([2, 6], 4, pad_before=1, pad_after=2), expected)
    np.testing.assert_array_equal(sequence_indices([2, 6], 4), [[2, 6, 0, 4]])  # no padding: too short, skipped
    masked = sequence_indices([2, 6], 4, 1, 2, episode_mask=np.array([False, True]))
    np.testing.assert_array_equal(masked, expected[2:])
    assert sequence_indices([2, 6], 4, episode_mask=np.array([False, False])).shape == (0, 4)
    assert sequence_indices([2, 6], 4).dtype == np.int64


def test_sequence_indices_match_the_definition_on_random_episodes():
    rng = np.random.default_rng(1)
    for _ in range(50):
        ends = np.cumsum(rng.integers(1, 12, size=rng.integers(1, 6)))
        horizon = int(rng.integers(1, 10))
        pad_before, pad_after = (int(x) for x in rng.integers(0, horizon, size=2))
        got = sequence_indices(ends, horizon, pad_before, pad_after)
        np.testing.assert_array_equal(got, reference_indices(ends.tolist(), horizon, pad_before, pad_after))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"horizon": 0}, "horizon must be >= 1"),
        ({"horizon": 4, "pad_before": -1}, r"pad_before must be in \[0, horizon - 1\] = \[0, 3\], got -1"),
        ({"horizon": 4, "pad_after": 4}, r"pad_after must be in \[0, horizon - 1\] = \[0, 3\], got 4"),
    ],
)
def test_window_arguments_are_checked(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sequence_indices([3], **kwargs)
    with pytest.raises(ValueError, match=message):
        TrajectoryDataset(make_buffer(), **kwargs)


def test_windows_repeat_first_and_last_step():
    buf = make_buffer((2, 4, 3))
    ds = TrajectoryDataset(buf, horizon=4, pad_before=1, pad_after=2)
    first = ds[0]  # episode 0, window starting one step before it
    np.testing.assert_array_equal(first["t"], [0, 0, 1, 1])
    np.testing.assert_array_equal(first["action"][:, 1], [0, 0, -1, -1])
    np.testing.assert_array_equal(first["image"][:, 0, 0], [0, 0, 1, 1])
    assert first["instruction"].tolist() == ["episode 0 é"] * 4
    np.testing.assert_array_equal(ds[1]["t"], [0, 1, 1, 1])
    np.testing.assert_array_equal(ds[-1]["t"], [7, 8, 8, 8])  # last window of episode 2 (steps 6..8)
    windows = np.stack([ds[i]["t"] for i in range(len(ds))])
    # windows never mix episodes
    episode_of = np.searchsorted(buf.episode_ends, windows, side="right")
    assert (episode_of == episode_of[:, :1]).all()
    ds[0]["t"][:] = -5  # items are copies
    assert buf["t"][0] == 0
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]


def test_key_first_k_returns_first_k_positions():
    buf = make_buffer((2, 4, 3))
    full = TrajectoryDataset(buf, horizon=4, pad_before=1, pad_after=2)
    part = TrajectoryDataset(buf, horizon=4, pad_before=1, pad_after=2, key_first_k={"image": 2, "t": 9})
    for i in range(len(full)):
        a, b = full[i], part[i]
        assert b["image"].shape == (2, 3, 3)
        np.testing.assert_array_equal(b["image"], a["image"][:2])
        np.testing.assert_array_equal(b["t"], a["t"])  # k >= horizon: the whole window
        np.testing.assert_array_equal(b["action"], a["action"])
    with pytest.raises(KeyError, match="not among the dataset keys"):
        TrajectoryDataset(buf, horizon=4, keys=["t"], key_first_k={"image": 2})
    with pytest.raises(ValueError, match=r"key_first_k\['image'\] must be an int >= 1"):
        TrajectoryDataset(buf, horizon=4, key_first_k={"image": 0})
    with pytest.raises(KeyError, match=r"keys \['obs'\] are not in the buffer"):
        TrajectoryDataset(buf, horizon=4, keys=["obs"])


def test_dataset_length_is_dp_formula():
    rng = np.random.default_rng(2)
    lengths = rng.integers(1, 30, size=20)
    buf = ReplayBuffer({"x": np.zeros(lengths.sum())}, np.cumsum(lengths))
    for horizon, pad_before, pad_after in [(16, 1, 7), (1, 0, 0), (8, 0, 0), (10, 9, 9)]:
        ds = TrajectoryDataset(buf, horizon, pad_before, pad_after)
        assert len(ds) == sum(max(0, n - horizon + pad_before + pad_after + 1) for n in lengths)
    train, _ = episode_split(buf.n_episodes, 0.25, seed=0)
    ds = TrajectoryDataset(buf, 16, 1, 7, episode_mask=train)
    assert len(ds) == sum(max(0, n - 16 + 1 + 7 + 1) for n in lengths[train])
    with pytest.raises(ValueError, match=r"episode_mask must be a bool array of shape \(20,\)"):
        TrajectoryDataset(buf, 4, episode_mask=np.ones(3, dtype=bool))


def test_episode_split():
    train, val = episode_split(10, 0.2, seed=3)
    assert val.sum() == 2 and train.sum() == 8 and not (train & val).any()
    again = episode_split(10, 0.2, seed=3)
    assert (again[1] == val).all() and (again[0] == train).all()
    assert any((episode_split(10, 0.2, seed=s)[1] != val).any() for s in range(4, 10))
    # the same episodes as Diffusion Policy's get_val_mask for this seed
    expected = np.zeros(10, dtype=bool)
    expected[np.random.default_rng(3).choice(10, size=2, replace=False)] = True
    assert (val == expected).all()
    assert episode_split(10, 0.01, seed=0)[1].sum() == 1  # at least one validation episode
    assert episode_split(2, 0.9, seed=0)[1].sum() == 1  # never all of them
    assert episode_split(1, 0.5, seed=0)[1].sum() == 0
    assert episode_split(10, 0.0)[1].sum() == 0
    train, val = episode_split(10, 0.2, seed=3, max_train=3)
    assert train.sum() == 3 and not (train & val).any()
    with pytest.raises(ValueError, match=r"val_ratio must be in \[0, 1\)"):
        episode_split(10, 1.0)


def test_dataloader_batches_numbers_and_text(tmp_path):
    path = make_buffer((5, 6)).save(tmp_path / "buf.zarr.zip")
    ds = TrajectoryDataset(ReplayBuffer.load(path), horizon=4, pad_before=1, pad_after=3, key_first_k={"image": 2})
    batch = next(iter(DataLoader(ds, batch_size=3, collate_fn=collate_trajectories)))
    assert batch["action"].shape == (3, 4, 2) and batch["action"].dtype == torch.float32
    assert batch["image"].shape == (3, 2, 3, 3) and batch["image"].dtype == torch.uint8
    assert batch["instruction"].shape == (3, 4) and batch["instruction"][0, 0] == "episode 0 é"
