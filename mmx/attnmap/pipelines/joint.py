"""Image-to-text attention probabilities of a joint (or plain cross-) attention call, without the full matrix.

In SD3's MMDiT and Flux's double- and single-stream blocks, image and text tokens attend together:
every query reads ``L = L_img + L_txt`` keys. The map a person wants is the image -> text block
of the probabilities, each row normalised over all ``L`` keys. :func:`image_text_probs` computes
exactly that block from the queries and keys the fused kernel received (after QK-norm and RoPE):
for a chunk of image queries it forms the scores against every key, takes their log-sum-exp and
keeps only the text columns. The chunk is sized so that the temporary scores never exceed the
``L_img x L_txt`` result, so the extra memory of a layer-step is ``O(L_img * L_txt)``, never
``O(L^2)``. Heads are summed as each chunk is done.

Letters: B batch, H heads, L queries, S keys, D head width.
"""

from __future__ import annotations

import math

import torch

__all__ = ["image_text_probs", "chunk_size"]


def chunk_size(img: int, txt: int, keys: int, heads: int, batch: int = 1) -> int:
    """Image queries per chunk: the ``[B, H, chunk, keys]`` scores hold at most as many numbers as the
    ``[B, img, txt]`` result (at least one query)."""
    return max(1, min(img, (img * txt) // max(1, heads * keys)))


@torch.no_grad()
def image_text_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    img: slice,
    txt: slice,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """``[B, L_img, S_txt]`` probabilities that the image queries give the text keys, summed over heads.

    Args:
        q: ``[B, H, L, D]`` queries of the whole joint sequence, as the kernel got them.
        k: ``[B, H, S, D]`` keys, as the kernel got them (``S = L`` for joint attention).
        img: the positions of the image queries in ``q``.
        txt: the positions of the text keys in ``k``.
        scale: the kernel's scale (None: ``1 / sqrt(D)``, as SDPA's default).
        mask: the kernel's mask, bool (True = may attend) or additive, broadcastable to ``[B, H, L, S]``.
        chunk: image queries per chunk (default: :func:`chunk_size`).

    Each row is normalised over every key of ``k``, as the kernel normalises it (softmax in
    float32), so the text block of a joint call sums to less than one per row and head.
    """
    b, h, _, d = q.shape
    keys = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    q_img = q[:, :, img]  # (B, H, L_img, D)
    n_img = q_img.shape[2]
    n_txt = len(range(keys)[txt])
    step = chunk or chunk_size(n_img, n_txt, keys, h, 1)
    kf = k.float()
    out = torch.empty(b, n_img, n_txt, dtype=torch.float32, device=q.device)
    for start in range(0, n_img, step):
        rows = slice(start, min(start + step, n_img))
        scores = torch.matmul(q_img[:, :, rows].float(), kf.transpose(-1, -2)) * scale  # (B, H, c, S)
        if mask is not None:
            part = _rows_of(mask, img, rows)
            scores = scores.masked_fill(~part, float("-inf")) if part.dtype == torch.bool else scores + part.float()
        lse = torch.logsumexp(scores, dim=-1, keepdim=True)  # (B, H, c, 1)
        probs = torch.exp(scores[..., txt] - lse).nan_to_num_(0.0)  # a row with no key reads nothing
        out[:, rows] = probs.sum(dim=1)
    return out


def _rows_of(mask: torch.Tensor, img: slice, rows: slice) -> torch.Tensor:
    """The part of a kernel mask that the chunk ``rows`` of the image queries ``img`` sees."""
    if mask.ndim < 4:
        mask = mask.view(*(1,) * (4 - mask.ndim), *mask.shape)
    if mask.shape[2] == 1:
        return mask
    return mask[:, :, img][:, :, rows]
