"""Attention masks: checked and shaped for ``[B, H, L, S]`` scores, rows with no key made safe, causal masks.

Bool masks say True = may attend; floating masks are added to the scores (``-inf`` = masked).
Letters: B batch, H heads, L queries, S keys.
"""

from __future__ import annotations

import torch

__all__ = ["causal_mask", "check_input_dtype", "fix_empty_rows", "prepare_mask"]


def check_input_dtype(name: str, tensor: torch.Tensor, weight: torch.Tensor) -> None:
    """Raise a TypeError naming ``name`` unless ``tensor`` can go through a layer whose weight is ``weight``.

    ``tensor`` must be floating point, and of the weight's dtype (under ``torch.autocast``, which
    casts float32/16 tensors by itself, only float64 ones must match). Without this check the
    error comes from deep inside ``nn.Linear`` / ``nn.LayerNorm`` ("expected m1 and m2 to have the
    same dtype").
    """
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (the weights are {weight.dtype}); got {tensor.dtype}. "
            f"Token ids must be embedded first; other values convert with .to({weight.dtype})."
        )
    # autocast casts float32/16 inputs and weights by itself, but never a float64 one
    autocast = torch.is_autocast_enabled(tensor.device.type) and torch.float64 not in (tensor.dtype, weight.dtype)
    if tensor.dtype != weight.dtype and weight.is_floating_point() and not autocast:
        raise TypeError(
            f"{name} is {tensor.dtype} but the weights are {weight.dtype}; cast the input with "
            f".to({weight.dtype}) or the module with .to({tensor.dtype}), or run under torch.autocast"
        )


def prepare_mask(
    mask: torch.Tensor | None, batch: int, heads: int, queries: int, keys: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """Check a user mask and shape it to broadcast against ``[B, H, L, S]``.

    Accepted forms (bool: True = may attend; floating: added to the scores, ``-inf`` = masked):
      * ``[B, S]`` key padding (the usual text mask),
      * ``[B, L, S]`` per query,
      * ``[B | 1, H | 1, L | 1, S]`` anything broadcastable to ``[B, H, L, S]``.
    A float mask is cast to ``dtype`` (the query dtype) as SDPA requires. Its values must be finite
    or ``-inf``: a NaN or ``+inf`` would turn whole rows of the output into NaN, so it is a
    ValueError (checking costs one host synchronisation, for float masks only; bool masks are the
    fast path).
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor or None; got {type(mask).__name__}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(
            f"mask must be bool (True = may attend) or floating (additive, -inf = masked); got {mask.dtype}. "
            "A 0/1 integer attention_mask from a tokenizer converts with mask.bool()."
        )
    expected = (batch, heads, queries, keys)
    if mask.ndim == 2:
        if tuple(mask.shape) != (batch, keys):
            raise ValueError(f"a 2-D mask is key padding [B, S] = {(batch, keys)}; got {tuple(mask.shape)}")
        mask = mask[:, None, None, :]  # (B, 1, 1, S)
    elif mask.ndim == 3:
        mask = mask[:, None, :, :]  # (B, 1, L, S)
    elif mask.ndim != 4:
        raise ValueError(
            f"mask must be [B, S], [B, L, S] or broadcastable to [B, H, L, S] = {expected}; "
            f"got {mask.ndim}-D shape {tuple(mask.shape)}"
        )
    if any(m not in (1, e) for m, e in zip(mask.shape, expected)) or mask.shape[-1] != keys:
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} cannot broadcast to [B, H, L, S] = {expected} "
            "(the key dimension S must match exactly)"
        )
    if mask.is_floating_point():
        if not bool((mask < float("inf")).all()):  # NaN compares False too
            bad = "NaN" if bool(mask.isnan().any()) else "+inf"
            raise ValueError(
                f"a float mask is added to the attention scores, so its values must be finite or -inf (masked); "
                f"this one holds {bad}. Use a bool mask (True = may attend) or -inf for masked keys."
            )
        if mask.dtype != dtype:
            mask = mask.to(dtype)
    return mask


def fix_empty_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unmask rows that have no key left, so softmax stays finite; return the mask and a row keep-factor.

    Returns ``(safe_mask, row_has_key)`` where ``row_has_key`` is ``[*, 1]`` broadcastable to the
    output ``[B, H, L, Dv]``; multiplying by it zeroes those rows (and their gradients).
    No host synchronisation: everything stays on the device.
    """
    allowed = mask if mask.dtype == torch.bool else ~torch.isneginf(mask)
    row_has_key = allowed.any(dim=-1, keepdim=True)  # (B|1, H|1, L|1, 1)
    if mask.dtype == torch.bool:
        safe = mask | ~row_has_key
    else:
        safe = mask.masked_fill(~row_has_key, 0.0)
    return safe, row_has_key


def causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """Bool ``[L, S]``: query i may see key j when ``j <= i + (S - L)`` (aligned to the last key).

    With L == S this is the usual lower triangle; with fewer queries than keys (decoding with a
    key/value cache) the queries are the last L positions of the sequence.
    """
    return torch.ones(queries, keys, dtype=torch.bool, device=device).tril(diagonal=keys - queries)
