"""Demonstration trajectories in Diffusion Policy's replay-buffer layout, cut into padded windows.

Diffusion Policy (Chi et al., 2023, https://arxiv.org/abs/2303.04137) stores demonstrations as one
zarr group per data set::

    <name>.zarr/ (or <name>.zarr.zip)
      data/<key>          one array per key, first axis = step T (all keys the same length)
      meta/episode_ends   int64 [E], cumulative end index of each episode (last == T)

>>> buffer = ReplayBuffer.load("pusht_cchi_v7_replay.zarr", keys=["state", "action"])
>>> train, val = episode_split(buffer.n_episodes, val_ratio=0.1, seed=42)
>>> ds = TrajectoryDataset(buffer, horizon=16, pad_before=1, pad_after=7, episode_mask=train)
>>> ds[0]["action"].shape                                   # (16, 2)
>>> loader = DataLoader(ds, batch_size=64, collate_fn=collate_trajectories)

For a policy that sees ``n_obs`` observations and executes ``n_action`` actions, Diffusion Policy
uses ``pad_before = n_obs - 1`` and ``pad_after = n_action - 1``: every step of every episode is
then the current step of some window, and windows at the edges repeat the first / last step.

A key may hold text, one string per step (numpy unicode dtype ``<U..``), e.g. the language
instruction of the episode repeated over its steps. Stores are written in zarr format 2 (what
Diffusion Policy's zarr 2 code reads), where unicode arrays are native.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr

log = logging.getLogger(__name__)

__all__ = [
    "ReplayBuffer",
    "TrajectoryDataset",
    "collate_trajectories",
    "episode_split",
    "sequence_indices",
]

_ALLOWED_KINDS = "biufcU"  # bool, int, uint, float, complex, unicode text
_CHUNK_BYTES = 4 * 2**20  # target size of one stored chunk (chunks split the step axis only)
_ZARR3 = int(zarr.__version__.split(".")[0]) >= 3


# --------------------------------------------------------------------------- replay buffer


def _as_step_array(key: str, value: Any) -> np.ndarray:
    """``value`` as a numpy array of an allowed dtype with a step axis, or a ValueError naming ``key``."""
    if not isinstance(key, str) or not key or "/" in key:
        raise ValueError(f"data keys must be non-empty strings without '/', got {key!r}")
    array = np.asarray(value)
    if array.dtype.kind not in _ALLOWED_KINDS:
        hint = " (for text use a unicode array: np.asarray(values, dtype=str))" if array.dtype.kind in "OS" else ""
        raise ValueError(f"data[{key!r}] has dtype {array.dtype}; expected bool, integer, float or unicode{hint}")
    if array.ndim == 0:
        raise ValueError(f"data[{key!r}] is a scalar; expected an array whose first axis is the step")
    return array


class ReplayBuffer:
    """Per-step arrays of many episodes back to back: ``data[key][t]`` and ``episode_ends`` [E].

    Everything lives in numpy memory; ``load`` / ``save`` read and write Diffusion Policy's zarr
    layout. ``data[key]`` has shape [T, ...] for every key; episode ``i`` is the steps
    ``episode_ends[i-1]:episode_ends[i]`` (``0:episode_ends[0]`` for the first).
    """

    def __init__(self, data: Mapping[str, np.ndarray], episode_ends: Any) -> None:
        if not isinstance(data, Mapping):
            raise TypeError(f"data must be a mapping of key -> array, got {type(data).__name__}")
        ends = np.asarray(episode_ends)
        if ends.ndim != 1:
            raise ValueError(f"episode_ends must be 1-D, got shape {ends.shape}")
        if ends.size and ends.dtype.kind not in "iu":
            raise ValueError(f"episode_ends must be integers, got dtype {ends.dtype}")
        ends = ends.astype(np.int64)
        if ends.size and ends[0] <= 0:
            raise ValueError(f"episode_ends[0] must be > 0 (episodes are non-empty), got {ends[0]}")
        steps = np.diff(ends)
        if (steps <= 0).any():
            i = int(np.argmax(steps <= 0)) + 1
            raise ValueError(
                f"episode_ends must be strictly increasing: episode_ends[{i - 1}]={ends[i - 1]} "
                f">= episode_ends[{i}]={ends[i]}"
            )
        n_steps = int(ends[-1]) if ends.size else 0
        arrays: dict[str, np.ndarray] = {}
        for key, value in data.items():
            array = _as_step_array(key, value)
            if array.shape[0] != n_steps:
                raise ValueError(
                    f"data[{key!r}] has {array.shape[0]} steps (shape {array.shape}); "
                    f"expected {n_steps} = episode_ends[-1]"
                )
            arrays[key] = array
        self.data = arrays
        self.episode_ends = ends

    @classmethod
    def from_episodes(cls, episodes: Sequence[Mapping[str, Any]]) -> ReplayBuffer:
        """Concatenate episodes (each a dict key -> [T_i, ...] array) into one buffer.

        A 0-d value (e.g. ``{"instruction": "push the T"}``) is repeated over the episode's steps.
        """
        if isinstance(episodes, Mapping) or not isinstance(episodes, Sequence):
            raise TypeError(f"episodes must be a sequence of dicts, got {type(episodes).__name__}")
        if not episodes:
            raise ValueError("from_episodes needs at least one episode")
        keys = list(episodes[0])
        columns: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        lengths = []
        for i, episode in enumerate(episodes):
            if set(episode) != set(keys):
                missing, extra = sorted(set(keys) - set(episode)), sorted(set(episode) - set(keys))
                raise ValueError(f"episode {i} has different keys from episode 0: missing {missing}, extra {extra}")
            arrays = {k: np.asarray(v) for k, v in episode.items()}
            sized = {k: a.shape[0] for k, a in arrays.items() if a.ndim > 0}
            if not sized:
                raise ValueError(f"episode {i}: every value is a scalar, so its length is unknown")
            if len(set(sized.values())) != 1:
                raise ValueError(f"episode {i}: keys have different lengths {sized}")
            length = next(iter(sized.values()))
            if length == 0:
                raise ValueError(f"episode {i} is empty (0 steps)")
            for k, a in arrays.items():
                a = np.repeat(a[None], length, axis=0) if a.ndim == 0 else a
                if columns[k] and a.shape[1:] != columns[k][0].shape[1:]:
                    raise ValueError(
                        f"episode {i}: {k!r} has per-step shape {a.shape[1:]}, episode 0 has {columns[k][0].shape[1:]}"
                    )
                columns[k].append(_as_step_array(k, a))
            lengths.append(length)
        data = {k: np.concatenate(v, axis=0) for k, v in columns.items()}
        return cls(data, np.cumsum(lengths, dtype=np.int64))

    # ----------------------------------------------------------------------- views

    @property
    def n_steps(self) -> int:
        """Total number of steps T over all episodes."""
        return int(self.episode_ends[-1]) if self.episode_ends.size else 0

    @property
    def n_episodes(self) -> int:
        """Number of episodes E."""
        return int(self.episode_ends.size)

    @property
    def episode_lengths(self) -> np.ndarray:
        """int64 [E]: steps in each episode."""
        return np.diff(self.episode_ends, prepend=0)

    def keys(self) -> list[str]:
        """The data keys, in insertion order."""
        return list(self.data)

    def __getitem__(self, key: str) -> np.ndarray:
        if key not in self.data:
            raise KeyError(f"no key {key!r}; the buffer has {self.keys()}")
        return self.data[key]

    def __contains__(self, key: object) -> bool:
        return key in self.data

    def __iter__(self) -> Iterator[str]:
        return iter(self.data)

    def episode(self, i: int) -> dict[str, np.ndarray]:
        """Episode ``i`` (negative counts from the end) as key -> [T_i, ...] views into the buffer."""
        n = self.n_episodes
        if not -n <= i < n:
            raise IndexError(f"episode {i} out of range for a buffer of {n} episodes")
        i %= n
        start = int(self.episode_ends[i - 1]) if i > 0 else 0
        end = int(self.episode_ends[i])
        return {k: v[start:end] for k, v in self.data.items()}

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}: {v.dtype}{list(v.shape[1:])}" for k, v in self.data.items())
        return f"ReplayBuffer(n_episodes={self.n_episodes}, n_steps={self.n_steps}, data={{{fields}}})"

    # ----------------------------------------------------------------------- files

    @classmethod
    def load(cls, path: str | os.PathLike, keys: Sequence[str] | None = None) -> ReplayBuffer:
        """Read a Diffusion Policy zarr store (a directory or a ``.zip``) into memory; ``keys`` picks data keys."""
        path = Path(path).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"no replay buffer at {path}: the path does not exist")
        store = None
        try:
            if path.is_file():
                if not zipfile.is_zipfile(path):
                    raise ValueError(f"{path} is a file but not a zip archive; expected a .zarr directory or .zarr.zip")
                store = zarr.storage.ZipStore(str(path), mode="r")
                opened = {"store": store}
            else:
                opened = {"store": str(path)}
            try:
                root = zarr.open_group(mode="r", **opened)
            except Exception as error:  # zarr 2 and 3 raise different types here
                raise ValueError(f"{path} is not a zarr group: {error}") from error
            if "data" not in root or not isinstance(root["data"], zarr.Group):
                found = sorted(root.keys())
                raise ValueError(f"{path} has no 'data' group (expected data/<key> arrays); it has {found}")
            if "meta" not in root or "episode_ends" not in root["meta"]:
                raise ValueError(f"{path} has no 'meta/episode_ends' array (cumulative episode end indices)")
            group = root["data"]
            available = sorted(group.array_keys())
            wanted = available if keys is None else list(keys)
            missing = [k for k in wanted if k not in available]
            if missing:
                raise KeyError(f"{path} has no data key(s) {missing}; available keys: {available}")
            ends = np.asarray(root["meta"]["episode_ends"][:])
            data = {k: np.asarray(group[k][:]) for k in wanted}
        finally:
            if store is not None:
                store.close()
        log.debug("loaded %s: %d episodes, %d steps", path, ends.size, ends[-1] if ends.size else 0)
        return cls(data, ends)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the Diffusion Policy layout to ``path`` (a zip archive if it ends with ``.zip``) atomically.

        The store is written to a hidden temporary sibling and renamed into place, so a failure
        mid-way leaves an existing store at ``path`` untouched. An existing path that is not a zarr
        store is never overwritten. Returns the path written.
        """
        path = Path(path).expanduser()
        as_zip = path.name.endswith(".zip")
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot save to {path}: the folder {path.parent} does not exist")
        if path.exists() and not _is_zarr_store(path):
            raise FileExistsError(f"{path} exists and is not a zarr store; refusing to overwrite it")
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            self._write(tmp, as_zip)
            _replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
        return path

    def _write(self, path: Path, as_zip: bool) -> None:
        fmt = {"zarr_format": 2} if _ZARR3 else {}
        store = zarr.storage.ZipStore(str(path), mode="w") if as_zip else str(path)
        try:
            root = zarr.open_group(store=store, mode="w", **fmt)
            data, meta = root.create_group("data"), root.create_group("meta")
            for key, value in self.data.items():
                _write_array(data, key, value)
            _write_array(meta, "episode_ends", self.episode_ends)
        finally:
            if as_zip:
                store.close()


def _chunks(array: np.ndarray) -> tuple[int, ...]:
    """Chunks that split the step axis only, about ``_CHUNK_BYTES`` each."""
    step_bytes = max(1, array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64)))
    length = max(1, min(array.shape[0], _CHUNK_BYTES // step_bytes))
    return (length,) + tuple(max(1, d) for d in array.shape[1:])


def _write_array(group: Any, name: str, array: np.ndarray) -> None:
    """Create ``group[name]`` holding ``array`` (zarr 3: ``create_array``, zarr 2: ``create_dataset``)."""
    if _ZARR3:
        group.create_array(name, data=array, chunks=_chunks(array))
    else:
        group.create_dataset(name, data=array, chunks=_chunks(array))


def _is_zarr_store(path: Path) -> bool:
    if path.is_file():
        return zipfile.is_zipfile(path)
    return any((path / name).exists() for name in (".zgroup", "zarr.json"))


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _replace(tmp: Path, path: Path) -> None:
    """Move ``tmp`` onto ``path``; an existing ``path`` is moved aside first and restored on failure."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if tmp.is_file() and path.is_file():
        os.replace(tmp, path)  # one atomic rename
        return
    old = path.with_name(f".{path.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


# --------------------------------------------------------------------------- windows


def _check_window(horizon: int, pad_before: int, pad_after: int) -> None:
    for name, value in (("horizon", horizon), ("pad_before", pad_before), ("pad_after", pad_after)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if horizon < 1:
        raise ValueError(f"horizon must be >= 1, got {horizon}")
    for name, value in (("pad_before", pad_before), ("pad_after", pad_after)):
        if not 0 <= value < horizon:
            raise ValueError(
                f"{name} must be in [0, horizon - 1] = [0, {horizon - 1}], got {value} "
                "(a window must hold at least one real step)"
            )


def _check_mask(episode_mask: Any, n_episodes: int) -> np.ndarray:
    if episode_mask is None:
        return np.ones(n_episodes, dtype=bool)
    mask = np.asarray(episode_mask)
    if mask.dtype != bool or mask.shape != (n_episodes,):
        raise ValueError(f"episode_mask must be a bool array of shape ({n_episodes},), got {mask.dtype} {mask.shape}")
    return mask


def sequence_indices(
    episode_ends: Any, horizon: int, pad_before: int = 0, pad_after: int = 0, episode_mask: Any = None
) -> np.ndarray:
    """All windows of ``horizon`` steps, as int64 [N, 4] rows (buffer_start, buffer_end, sample_start, sample_end).

    For an episode of length L starting at buffer step s, windows start at every episode step
    ``j`` in ``-pad_before .. L - horizon + pad_after`` (none when that range is empty). Window
    ``j`` covers episode steps ``j .. j + horizon - 1``; the part inside the episode is
    ``buffer[buffer_start:buffer_end]`` and lands at ``window[sample_start:sample_end]``; the
    positions before / after it repeat the first / last real step. Episodes whose
    ``episode_mask`` entry is False are skipped. Same rows as Diffusion Policy's ``create_indices``.
    """
    _check_window(horizon, pad_before, pad_after)
    ends = np.asarray(episode_ends, dtype=np.int64)
    if ends.ndim != 1:
        raise ValueError(f"episode_ends must be 1-D, got shape {ends.shape}")
    if (np.diff(ends, prepend=0) <= 0).any():
        raise ValueError(f"episode_ends must be positive and strictly increasing, got {ends.tolist()}")
    mask = _check_mask(episode_mask, ends.size)
    lengths = np.diff(ends, prepend=0)  # (E,)
    starts = ends - lengths  # (E,) buffer index of each episode's first step
    counts = np.clip(lengths - horizon + pad_before + pad_after + 1, 0, None) * mask  # windows per episode
    episode = np.repeat(np.arange(ends.size), counts)  # (N,) episode of each window
    first = np.repeat(np.cumsum(counts) - counts, counts)  # (N,) row of the episode's first window
    j = np.arange(counts.sum()) - first - pad_before  # (N,) window start, in episode steps
    length = lengths[episode]
    rows = np.stack(
        [
            starts[episode] + np.maximum(j, 0),  # buffer_start
            starts[episode] + np.minimum(j + horizon, length),  # buffer_end
            np.maximum(-j, 0),  # sample_start: positions padded before
            horizon - np.maximum(j + horizon - length, 0),  # sample_end: horizon minus positions padded after
        ],
        axis=1,
    )
    return rows.astype(np.int64).reshape(-1, 4)


def episode_split(
    n_episodes: int, val_ratio: float, seed: int = 0, max_train: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Random train / validation masks over episodes: bool [E] each, disjoint.

    ``round(n_episodes * val_ratio)`` validation episodes, but at least one when ``val_ratio > 0``
    and never all of them (so none when there is a single episode). ``max_train`` keeps a random
    subset of the training episodes. Deterministic in ``seed``; for the same arguments the masks
    are those of Diffusion Policy's ``get_val_mask`` / ``downsample_mask``.
    """
    if n_episodes < 0:
        raise ValueError(f"n_episodes must be >= 0, got {n_episodes}")
    if not 0 <= val_ratio < 1:
        raise ValueError(f"val_ratio must be in [0, 1), got {val_ratio}")
    val = np.zeros(n_episodes, dtype=bool)
    if val_ratio > 0:
        n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
        val[np.random.default_rng(seed).choice(n_episodes, size=max(n_val, 0), replace=False)] = True
    train = ~val
    if max_train is not None:
        if max_train < 1:
            raise ValueError(f"max_train must be >= 1 or None, got {max_train}")
        if train.sum() > max_train:
            candidates = np.flatnonzero(train)
            keep = candidates[np.random.default_rng(seed).choice(candidates.size, size=max_train, replace=False)]
            train = np.zeros(n_episodes, dtype=bool)
            train[keep] = True
    return train, val


class TrajectoryDataset(torch.utils.data.Dataset):
    """Windows of ``horizon`` consecutive steps from a ReplayBuffer, edge-padded at episode ends.

    ``ds[i]`` is a dict key -> numpy array [horizon, ...] (a copy; text keys give a unicode array
    [horizon]). Windows never cross episodes: positions before the episode's first step repeat that
    step, positions after its last step repeat the last (see ``sequence_indices``).
    ``key_first_k={"image": 2}`` returns only the first ``k`` positions of the window for that key
    (shape [k, ...]; equal to ``full_window[:k]``) and reads only those steps, for observations of
    which only the first ``n_obs`` steps are used.
    """

    def __init__(
        self,
        buffer: ReplayBuffer,
        horizon: int,
        pad_before: int = 0,
        pad_after: int = 0,
        keys: Sequence[str] | None = None,
        key_first_k: Mapping[str, int] | None = None,
        episode_mask: Any = None,
    ) -> None:
        if not isinstance(buffer, ReplayBuffer):
            raise TypeError(f"buffer must be a ReplayBuffer, got {type(buffer).__name__}")
        self.keys = buffer.keys() if keys is None else list(keys)
        unknown = [k for k in self.keys if k not in buffer]
        if unknown:
            raise KeyError(f"keys {unknown} are not in the buffer; it has {buffer.keys()}")
        self.key_first_k = dict(key_first_k or {})
        for key, k in self.key_first_k.items():
            if key not in self.keys:
                raise KeyError(f"key_first_k names {key!r}, which is not among the dataset keys {self.keys}")
            if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
                raise ValueError(f"key_first_k[{key!r}] must be an int >= 1, got {k!r}")
        self.buffer = buffer
        self.horizon = horizon
        self.pad_before = pad_before
        self.pad_after = pad_after
        self.episode_mask = _check_mask(episode_mask, buffer.n_episodes)
        self.indices = sequence_indices(buffer.episode_ends, horizon, pad_before, pad_after, self.episode_mask)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        n = len(self.indices)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for a dataset of {n} windows")
        buffer_start, buffer_end, sample_start, _ = (int(v) for v in self.indices[index])
        out = {}
        for key in self.keys:
            count = min(self.key_first_k.get(key, self.horizon), self.horizon)
            # buffer step of each window position: the real steps, clamped at both ends (edge padding)
            steps = buffer_start + np.clip(np.arange(count) - sample_start, 0, buffer_end - buffer_start - 1)
            out[key] = self.buffer.data[key][steps]  # (count, ...)
        return out

    def __repr__(self) -> str:
        return (
            f"TrajectoryDataset(windows={len(self)}, horizon={self.horizon}, pad_before={self.pad_before}, "
            f"pad_after={self.pad_after}, keys={self.keys}, episodes={int(self.episode_mask.sum())}/"
            f"{self.buffer.n_episodes})"
        )


def collate_trajectories(samples: Sequence[Mapping[str, np.ndarray]]) -> dict[str, Any]:
    """DataLoader ``collate_fn``: numeric keys -> tensors [B, T, ...]; text keys -> unicode arrays [B, T].

    torch's default collate rejects numpy unicode arrays, hence this function.
    """
    if not samples:
        raise ValueError("collate_trajectories needs at least one sample")
    batch: dict[str, Any] = {}
    for key in samples[0]:
        values = [np.asarray(s[key]) for s in samples]
        shapes = {v.shape for v in values}
        if len(shapes) != 1:
            raise ValueError(f"cannot stack {key!r}: samples have shapes {sorted(shapes)}")
        stacked = np.stack(values)
        batch[key] = stacked if stacked.dtype.kind == "U" else torch.from_numpy(stacked)
    return batch
