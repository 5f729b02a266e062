"""A local diffusers pipeline folder, loaded offline, and one traced call of it (``mmx attend --pipeline``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from mmx.attnmap.pipelines.trace import trace

__all__ = ["attend_pipeline", "load_pipeline"]


def load_pipeline(folder: str | Path, device: str = "cpu", dtype: torch.dtype | None = None) -> Any:
    """The pipeline saved in ``folder`` (one with a ``model_index.json``), loaded from local files only."""
    from diffusers import DiffusionPipeline

    folder = Path(folder)
    index = folder / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder} is not a diffusers pipeline folder: {index} not found")
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError) as err:
        raise ValueError(f"{index} names no pipeline class (_class_name): {err}") from None
    kwargs = {"local_files_only": True}
    if dtype is not None:
        kwargs["torch_dtype"] = dtype
    try:
        pipe = DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load the {name} in {folder}: {err}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def attend_pipeline(
    folder: str | Path,
    prompt: str,
    out: str | Path,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    height: int | None = None,
    width: int | None = None,
    word: str | None = None,
    gif: bool = False,
) -> tuple[list[str], list[Path]]:
    """Generate one image for ``prompt`` with the pipeline in ``folder`` while tracing it; save the maps.

    Writes words.json, a grid of every word's overlay, an overlay per word (or only ``word``) and,
    with ``gif``, a GIF per word over windows of steps. Returns the lines to print and the paths.
    """
    pipe = load_pipeline(folder)
    call: dict[str, Any] = {"generator": torch.Generator().manual_seed(seed)}
    for key, value in (
        ("num_inference_steps", steps),
        ("guidance_scale", guidance),
        ("height", height),
        ("width", width),
    ):
        if value is not None:
            call[key] = value
    window = max(1, (steps or 8) // 8) if gif else None
    with trace(pipe, window=window) as maps:
        pipe(prompt, **call)
    if word is not None and word not in maps.words(0):
        raise ValueError(f"--word {word!r} is not a word of the prompt; its words: {maps.words(0)}")
    paths = maps.save(out, word=word, gif=gif)
    lines = [
        f"{maps.family} pipeline from {folder}: {maps.steps} steps, {maps.layers} attention layers traced, "
        f"maps on a {maps.total.shape[-2]}x{maps.total.shape[-1]} grid",
        f"words: {' '.join(maps.words(0))}",
    ]
    truncated = {k: v for k, v in maps.tokens()[0].truncated.items() if v}
    if truncated:
        lines.append(f"truncated: {truncated} tokens did not fit")
    lines.append(f"wrote {len(paths)} files")
    return lines, paths
