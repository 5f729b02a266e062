"""The queries and keys of every cross-attention call of a model: mmx's ``CrossAttention`` and diffusers' ``Attention``.

:func:`tap_cross_attention` is how the recorder (maps, no gradients) and the captures (losses on
the maps, with gradients) see each call. mmx layers report through :meth:`CrossAttention.add_hook`
the q/k the fused kernel used. diffusers' ``Attention`` gets a processor that projects q and k
the way diffusers' processors do (``to_q``, ``to_k`` of the normalised context, the additive mask
per head), reports them and then runs the original processor, so its output is untouched.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from mmx.nn.attention import CrossAttention

__all__ = ["Tap", "tap_cross_attention"]

Tap = Callable[[str, torch.Tensor, torch.Tensor, "torch.Tensor | None", float], None]
"""``tap(layer_name, q [B, H, L, D], k [B, H, S, D], mask (prepared) or None, scale)``."""


def tap_cross_attention(
    model: nn.Module, tap: Tap, keep: Callable[[str], bool] = lambda name: True
) -> list[Callable[[], None]]:
    """Report every cross-attention call of ``model`` (layers whose name ``keep`` accepts) to ``tap``.

    Returns one undo per attached layer (an empty list: the model has no cross-attention).
    """
    undo: list[Callable[[], None]] = []
    for name, module in model.named_modules():
        if not keep(name):
            continue
        if isinstance(module, CrossAttention) and module.is_cross:
            undo.append(module.add_hook(lambda m, q, k, mask, name=name: tap(name, q, k, mask, m.scale)))
        elif _is_diffusers_cross_attention(module):
            original = module.processor
            module.set_processor(_TappedProcessor(tap, name, original))
            undo.append(lambda m=module, p=original: m.set_processor(p))
    return undo


def _is_diffusers_cross_attention(module: nn.Module) -> bool:
    try:
        from diffusers.models.attention_processor import Attention
    except ImportError:  # pragma: no cover - diffusers is a dependency
        return False
    return isinstance(module, Attention) and getattr(module, "is_cross_attention", False)


class _TappedProcessor:
    """Wraps a diffusers attention processor: reports q and k, then runs the original."""

    def __init__(self, tap: Tap, name: str, original: Any) -> None:
        self.tap, self.name, self.original = tap, name, original

    def __call__(
        self,
        attn: Any,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None and hidden_states.ndim == 3:
            b = hidden_states.shape[0]
            context = encoder_hidden_states
            if attn.norm_cross:
                context = attn.norm_encoder_hidden_states(context)
            heads = attn.heads
            q = attn.to_q(hidden_states)
            k = attn.to_k(context)
            d = k.shape[-1] // heads
            q = q.view(b, -1, heads, d).transpose(1, 2)  # (B, H, L, D)
            k = k.view(b, -1, heads, d).transpose(1, 2)  # (B, H, S, D)
            mask = None
            if attention_mask is not None:
                mask = attn.prepare_attention_mask(attention_mask, k.shape[2], b)
                mask = mask.view(b, heads, -1, mask.shape[-1])  # (B, H, 1|L, S) additive
            self.tap(self.name, q, k, mask, attn.scale)
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
