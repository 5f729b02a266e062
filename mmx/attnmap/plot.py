"""Pictures of attention: per-word overlays with a colour bar, a grid per prompt, a GIF over steps."""

from __future__ import annotations

import re
import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

from mmx.attnmap.words import WordMap

__all__ = ["file_label", "save_overlay", "save_word_grid", "save_steps_gif"]


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _rgb(image: torch.Tensor):
    """``[3, H, W]`` in [-1, 1] -> ``[H, W, 3]`` float in [0, 1] (numpy)."""
    return ((image.detach().float().cpu().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()


def _draw(ax, image: torch.Tensor, heat: torch.Tensor, title: str, alpha: float):
    ax.imshow(_rgb(image), interpolation="nearest")
    shown = ax.imshow(
        heat.detach().float().cpu().numpy(), cmap="jet", alpha=alpha, vmin=0.0, vmax=1.0, interpolation="bilinear"
    )
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    return shown


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp" + path.suffix)
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    _plt().close(fig)
    tmp.replace(path)
    return path


def save_overlay(image: torch.Tensor, word_map: WordMap, path: str | Path, alpha: float = 0.5) -> Path:
    """One PNG: the image, the word's heat map over it (min-max normalised maps) and a colour bar."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(3.4, 3.0))
    shown = _draw(ax, image, word_map.map, f"“{word_map.word}”", alpha)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="attention (normalised)")
    return _save(fig, Path(path))


def save_word_grid(
    image: torch.Tensor,
    maps: Sequence[WordMap],
    caption: str,
    path: str | Path,
    alpha: float = 0.5,
    scores: dict[int, float] | None = None,
) -> Path:
    """One PNG per prompt: the image, then every word's overlay; ``scores`` (word index -> IoU) in titles."""
    plt = _plt()
    n = len(maps) + 1
    columns = min(n, 6)
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.2 * columns, 2.4 * rows + 0.5), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes.flat[0].imshow(_rgb(image), interpolation="nearest")
    axes.flat[0].set_title("image", fontsize=9)
    shown = None
    for ax, word_map in zip(list(axes.flat)[1:], maps):
        title = word_map.word
        if scores and word_map.index in scores:
            title += f"\nIoU {scores[word_map.index]:.2f}"
        shown = _draw(ax, image, word_map.map, title, alpha)
    if shown is not None:
        fig.colorbar(shown, ax=list(axes.flat), fraction=0.02, pad=0.02, label="attention (normalised)")
    fig.suptitle("\n".join(textwrap.wrap(caption, 90)), fontsize=10)
    return _save(fig, Path(path))


def save_steps_gif(
    image: torch.Tensor,
    frames: Sequence[torch.Tensor],
    word: str,
    path: str | Path,
    labels: Sequence[str] | None = None,
    duration_ms: int = 400,
) -> Path:
    """A GIF of one word's map across windows of denoising steps (``frames``: ``[H, W]`` in [0, 1])."""
    import io

    from PIL import Image

    plt = _plt()
    pictures = []
    for i, heat in enumerate(frames):
        fig, ax = plt.subplots(figsize=(3.0, 3.0))
        _draw(ax, image, heat, f"“{word}” {labels[i] if labels else i}", 0.5)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
        plt.close(fig)
        buffer.seek(0)
        pictures.append(Image.open(buffer).convert("RGB"))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pictures[0].save(path, save_all=True, append_images=pictures[1:], duration=duration_ms, loop=0)
    return path


def file_label(word: str, limit: int = 40) -> str:
    """``word`` as a safe part of a file name: letters, digits, '-' and '_' only, at most ``limit`` characters.

    A prompt word such as ``x/../../y`` or a 400-letter word must not pick the folder or break the name.
    """
    label = re.sub(r"[^\w-]+", "_", word).strip("_")[:limit]
    return label or "word"
