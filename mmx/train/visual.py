"""Pictures a person would rather look at than read: sample grids with captions, rollout panels."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path

import torch

__all__ = ["save_grid", "save_panels", "save_rollouts", "to_uint8"]


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` in [-1, 1] -> ``[B, H, W, C]`` uint8 on the CPU."""
    return ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)


def save_grid(
    images: torch.Tensor,
    captions: Sequence[str],
    path: str | Path,
    correct: Sequence[bool] | None = None,
    title: str | None = None,
    columns: int = 4,
) -> Path:
    """A PNG grid: each image ``[B, C, H, W]`` in [-1, 1] with its caption, framed green/red by ``correct``."""
    return save_panels(list(to_uint8(images).numpy()), captions, path, correct, title, columns)


def save_panels(
    pictures: Sequence,
    captions: Sequence[str],
    path: str | Path,
    correct: Sequence[bool] | None = None,
    title: str | None = None,
    columns: int = 4,
) -> Path:
    """Write a PNG grid of uint8 ``[H, W, 3]`` pictures with captions (and green/red frames); atomic."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = list(pictures)
    n = len(pixels)
    columns = max(1, min(columns, n))
    rows = (n + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.7 * rows + (0.4 if title else 0)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for i, ax in enumerate(axes.flat[:n]):
        ax.imshow(pixels[i], interpolation="nearest")
        ax.set_title("\n".join(textwrap.wrap(captions[i], 26)), fontsize=7)
        if correct is not None:
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor("tab:green" if correct[i] else "tab:red")
                spine.set_linewidth(3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


def save_rollouts(result, path: str | Path, title: str | None = None, columns: int = 4) -> Path | None:
    """Panels of a :class:`mmx.eval.rollout.RolloutResult`'s rendered episodes, framed by success."""
    n = len(result.frames)
    if n == 0:
        return None
    captions = []
    for i in range(n):
        info = result.infos[i]
        detail = ", ".join(
            ["collided"] * bool(info.get("collided"))
            + [
                f"{info[k]}" if k == "instruction" else f"{k} {info[k]}"
                for k in ("route", "instruction")
                if info.get(k) is not None
            ]
        )
        captions.append(
            f"seed {result.seeds[i]}: {'success' if result.success[i] else 'failure'}"
            + (f" ({detail})" if detail else "")
        )
    return save_panels(result.frames, captions, path, result.success[:n], title, columns)
