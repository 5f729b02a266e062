"""Which observation token, image region or instruction word each action step read.

The recorder runs in sequence mode on the policy's UNet1D: every cross-attention layer's maps are
resampled to the horizon, summed over heads, layers and denoising steps, and each action step's
row is normalised to sum to 1 over the observation tokens (the average attention distribution).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmx.attnmap.plot import _plt, _save
from mmx.attnmap.recorder import AttentionRecorder
from mmx.context import WordSpan

__all__ = ["PolicyAttention", "attend_policy", "save_token_heatmap", "save_region_overlays"]


@dataclass
class PolicyAttention:
    """Attention of the action chunk over the observation tokens.

    Attributes:
        weights: ``[B, T, S]`` float32; row ``t`` is action step t's average attention over tokens.
        segments: where each observation source's tokens sit (:class:`mmx.encoders.observation.Segment`).
        words: per sample, the instruction's word spans (token indices into S), or None.
    """

    weights: torch.Tensor
    segments: list[Any]
    words: list[list[WordSpan]] | None

    def groups(self, b: int = 0) -> tuple[list[str], torch.Tensor]:
        """Column labels and ``[T, G]`` weights summed per readable group: each low-dim step, each
        image step (all its regions) and each instruction word (its tokens); special tokens are
        grouped as ``<text special>``."""
        w = self.weights[b]  # (T, S)
        labels, columns = [], []
        for seg in self.segments:
            if seg.kind in ("lowdim", "rgb"):
                steps = seg.grid[0]
                per = (seg.end - seg.start) // steps
                for i in range(steps):
                    ago = steps - 1 - i
                    labels.append(f"{seg.name} t-{ago}" if ago else f"{seg.name} t")
                    columns.append(w[:, seg.start + i * per : seg.start + (i + 1) * per].sum(-1))
            elif seg.kind == "text":
                spans = [] if self.words is None else [s for s in self.words[b] if seg.start <= s.start < seg.end]
                covered = torch.zeros(w.shape[1], dtype=torch.bool)
                for span in spans:
                    labels.append(span.word)
                    columns.append(w[:, span.start : span.end].sum(-1))
                    covered[span.start : span.end] = True
                rest = torch.zeros(w.shape[1], dtype=torch.bool)
                rest[seg.start : seg.end] = True
                rest &= ~covered
                if rest.any():
                    labels.append("<text special>")
                    columns.append(w[:, rest].sum(-1))
        return labels, torch.stack(columns, -1)

    def region_maps(self, key: str, b: int = 0, action_steps: slice | None = None) -> torch.Tensor:
        """``[To, h, w]`` attention mass on each region of image source ``key`` (summed over action steps)."""
        seg = next((s for s in self.segments if s.name == key and s.kind == "rgb"), None)
        if seg is None:
            raise KeyError(f"no image source {key!r}; sources: {[s.name for s in self.segments]}")
        w = self.weights[b, action_steps or slice(None), seg.start : seg.end].sum(0)  # (To*h*w,)
        return w.view(*seg.grid)


def attend_policy(
    policy: Any,
    obs: Mapping[str, Any],
    generator: torch.Generator | None = None,
    num_inference_steps: int | None = None,
) -> tuple[dict[str, torch.Tensor], PolicyAttention]:
    """Predict one action chunk per observation history while recording cross-attention."""
    if getattr(policy.unet, "config", None) is None or policy.unet.config.context_dim is None:
        raise ValueError(
            "this policy has no cross-attention (conditioning: film): there is no attention to show; "
            "train with model.conditioning=cross_attention or both"
        )
    with torch.no_grad():
        context, segments = policy.obs_encoder.encode(policy.prepare_obs(obs))
    with AttentionRecorder(policy.unet, image_size=policy.horizon) as recorder:
        out = policy.predict_action(
            obs,
            generator=generator,
            num_inference_steps=num_inference_steps,
            callback=recorder.callback,
            context=context,
        )
    maps = recorder.maps()[:, :, 0, :]  # (B, S, T)
    weights = maps.transpose(1, 2)  # (B, T, S)
    weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-12)
    return out, PolicyAttention(weights.float().cpu(), segments, context.words)


def save_token_heatmap(
    matrix: torch.Tensor,
    columns: Sequence[str],
    path: str | Path,
    title: str = "",
    executed: tuple[int, int] | None = None,
) -> Path:
    """A heat map ``[T, G]``: rows are action steps, columns observation groups / tokens.

    ``executed`` = (first, last) action steps that are executed; they are bracketed on the axis.
    """
    plt = _plt()
    t, g = matrix.shape
    fig, ax = plt.subplots(figsize=(max(4.0, 0.42 * g + 2.0), max(3.0, 0.26 * t + 1.4)))
    shown = ax.imshow(matrix.numpy(), aspect="auto", cmap="viridis", vmin=0.0)
    ax.set_xticks(range(g))
    ax.set_xticklabels(columns, rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(t))
    ax.set_yticklabels([f"a{i}" for i in range(t)], fontsize=7)
    ax.set_ylabel("action step of the chunk")
    if executed is not None:
        ax.axhspan(executed[0] - 0.5, executed[1] + 0.5, fill=False, edgecolor="white", linewidth=1.5)
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="attention share")
    ax.set_title(title, fontsize=9)
    return _save(fig, Path(path))


def save_region_overlays(frames: Sequence[np.ndarray], maps: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Each observation step's image (uint8 ``[H, W, 3]``) with its region attention ``[h, w]`` over it."""
    import torch.nn.functional as F

    plt = _plt()
    n = len(frames)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.2), squeeze=False)
    vmax = float(maps.max()) or 1.0
    shown = None
    for i, (ax, frame) in enumerate(zip(axes[0], frames)):
        h, w = frame.shape[:2]
        heat = F.interpolate(maps[i][None, None].float(), size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        ax.imshow(frame, interpolation="nearest")
        shown = ax.imshow(heat.numpy(), cmap="jet", alpha=0.5, vmin=0.0, vmax=vmax, interpolation="bilinear")
        ago = n - 1 - i
        ax.set_title(f"observation t-{ago}" if ago else "observation t", fontsize=9)
        ax.axis("off")
    if shown is not None:
        fig.colorbar(shown, ax=list(axes[0]), fraction=0.03, pad=0.02, label="attention mass")
    fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))
