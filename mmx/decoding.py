"""Autoregressive decoding for encoder-decoder models: greedy and beam search, with key/value caches.

Works with any model that offers

* ``encode(inputs[, inputs_mask]) -> Context`` (the memory),
* ``decode(tokens [B, T], memory, cache=...) -> logits [B, T, V]``,
* ``new_cache() -> DecoderCache`` (with ``reorder(index)``),
* ``config.bos_id``, ``config.eos_id``, ``config.pad_id``,

such as :class:`mmx.models.Seq2SeqTransformer` and :class:`mmx.models.ImageCaptioner`.

With ``use_cache=True`` every step feeds one token: the self-attention keys/values of the prefix
and the projected memory are kept in the cache. ``use_cache=False`` re-runs the whole prefix each
step and re-projects the memory (the baseline); both give the same tokens.

Decoding runs under ``torch.no_grad()`` and does not touch the model's train/eval mode: put the
model in ``eval()`` first, or dropout makes the output random.

Letters: B batch, K beams, T generated tokens, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from mmx.context import Context

__all__ = ["Decoded", "greedy_decode", "beam_search", "generate", "DECODING_METHODS"]

# Finished rows are checked on the host once every this many steps (each check synchronises).
_CHECK_EVERY = 4


@dataclass
class Decoded:
    """Generated sequences, one per input.

    Attributes:
        tokens: ``[B, T]`` long, the generated ids WITHOUT the BOS; END is included when produced,
            ``pad_id`` fills the positions after it. T is the longest length produced.
        lengths: ``[B]`` long, tokens up to and including END (all generated tokens when no END).
        scores: ``[B]`` float32: the sum of the tokens' log-probabilities (greedy), or the
            length-penalised score used for ranking (beam search).
    """

    tokens: torch.Tensor
    lengths: torch.Tensor
    scores: torch.Tensor

    def to_lists(self) -> list[list[int]]:
        """Per input, the ids up to and including END (padding dropped)."""
        return [row[:n] for row, n in zip(self.tokens.tolist(), self.lengths.tolist())]


def _special_ids(model: Any) -> tuple[int, int, int]:
    config = getattr(model, "config", None)
    try:
        return int(config.bos_id), int(config.eos_id), int(config.pad_id)
    except AttributeError as e:
        raise TypeError(
            f"decoding needs a model with config.bos_id / eos_id / pad_id; {type(model).__name__} has none ({e})"
        ) from e


def _check_decode_args(memory: Context, max_len: int) -> None:
    if not isinstance(memory, Context):
        raise TypeError(f"memory must be the Context returned by model.encode(...); got {type(memory).__name__}")
    if not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1:
        raise ValueError(f"max_len must be an int >= 1; got {max_len!r}")


def _finish(tokens: torch.Tensor, lengths: torch.Tensor, scores: torch.Tensor) -> Decoded:
    """Trim the columns after the longest sequence (one host synchronisation)."""
    longest = int(lengths.max()) if lengths.numel() else 0
    return Decoded(tokens=tokens[:, :longest].contiguous(), lengths=lengths, scores=scores)


@torch.no_grad()
def greedy_decode(
    model: Any, memory: Context, max_len: int = 64, use_cache: bool = True, stop_at_eos: bool = True
) -> Decoded:
    """The most probable next token at each step, from BOS, for every memory row.

    Args:
        model: an encoder-decoder (see the module docstring), in eval mode.
        memory: ``model.encode(...)`` output, B rows.
        max_len: the most tokens generated per row (END included).
        use_cache: feed one token per step with a :class:`~mmx.nn.seq2seq.DecoderCache`; False
            re-runs the whole prefix each step (same tokens, slower).
        stop_at_eos: a row that produced END is finished: it emits ``pad_id`` from then on
            (log-prob 0) and decoding stops once every row is finished. False: END does not
            finish a row and exactly ``max_len`` tokens are produced (for benchmarks).

    Returns:
        :class:`Decoded` with ``scores`` the sum of log-probabilities of the generated tokens.
    """
    _check_decode_args(memory, max_len)
    bos, eos, pad = _special_ids(model)
    b, device = memory.batch_size, memory.device
    cache = model.new_cache() if use_cache else None
    tokens = torch.full((b, 1 + max_len), pad, dtype=torch.long, device=device)  # BOS, then one column per step
    tokens[:, 0] = bos
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    lengths = torch.zeros(b, dtype=torch.long, device=device)
    scores = torch.zeros(b, dtype=torch.float32, device=device)
    for step in range(max_len):
        if cache is not None:
            logits = model.decode(tokens[:, step : step + 1], memory, cache=cache)[:, -1]  # (B, V)
        else:
            logits = model.decode(tokens[:, : step + 1], memory)[:, -1]
        logp = logits.float().log_softmax(dim=-1)
        best_logp, best = logp.max(dim=-1)  # (B,)
        if stop_at_eos:
            best = best.masked_fill(finished, pad)
            scores += best_logp.masked_fill(finished, 0.0)
            lengths += (~finished).long()
            finished |= best == eos
        else:
            scores += best_logp
            lengths += 1
        tokens[:, step + 1] = best
        if stop_at_eos and (step + 1) % _CHECK_EVERY == 0 and bool(finished.all()):
            break
    return _finish(tokens[:, 1:], lengths, scores)


def _length_penalty(lengths: torch.Tensor, alpha: float) -> torch.Tensor:
    """GNMT length penalty ``((5 + len) / 6) ** alpha`` (Wu et al., 2016)."""
    return ((5.0 + lengths.float()) / 6.0) ** alpha


@torch.no_grad()
def beam_search(
    model: Any,
    memory: Context,
    beam_size: int = 4,
    max_len: int = 64,
    length_penalty: float = 1.0,
    use_cache: bool = True,
) -> Decoded:
    """Beam search: keep the ``beam_size`` best partial hypotheses per input; return the best one.

    Each step scores every continuation of every beam (``K * V`` candidates per input) and keeps the
    top K. Hypotheses are ranked by ``sum of log-probs / lp(len)`` with the GNMT length penalty
    ``lp(len) = ((5 + len) / 6) ** length_penalty`` (Wu et al., 2016; ``length_penalty=0``
    ranks by the plain sum, larger values favour longer outputs), ``len`` counting the generated
    tokens up to and including END. A hypothesis that produced END is finished: it stays in the
    beam with its score and is continued by ``pad_id`` only (log-prob 0), competing with the open
    ones at every step. Decoding stops when every beam of every input is finished or after
    ``max_len`` tokens; the highest-ranked beam is returned. ``beam_size=1`` is greedy decoding.

    Args:
        model: an encoder-decoder (see the module docstring), in eval mode.
        memory: ``model.encode(...)`` output, B rows (padded memories are fine: the mask is kept).
        beam_size: K.
        max_len: the most tokens generated per hypothesis (END included).
        length_penalty: the exponent ``alpha`` of the GNMT penalty.
        use_cache: reorder a :class:`~mmx.nn.seq2seq.DecoderCache` with the surviving beams
            (:meth:`DecoderCache.reorder`) instead of re-running each prefix.

    Returns:
        :class:`Decoded` with the best hypothesis per input; ``scores`` are the length-penalised
        scores used for ranking.
    """
    _check_decode_args(memory, max_len)
    if not isinstance(beam_size, int) or isinstance(beam_size, bool) or beam_size < 1:
        raise ValueError(f"beam_size must be an int >= 1; got {beam_size!r}")
    bos, eos, pad = _special_ids(model)
    b, k, device = memory.batch_size, beam_size, memory.device
    rows = torch.arange(b, device=device).repeat_interleave(k)  # (B*K,) input of each beam
    beam_memory = memory[rows]  # B*K rows, beams of one input adjacent
    cache = model.new_cache() if use_cache else None
    tokens = torch.full((b * k, 1), bos, dtype=torch.long, device=device)
    finished = torch.zeros(b * k, dtype=torch.bool, device=device)
    lengths = torch.zeros(b * k, dtype=torch.long, device=device)
    # Raw sums of log-probs; all beams start from the same BOS, so only beam 0 is open at first.
    beam_scores = torch.zeros(b, k, dtype=torch.float32, device=device)
    beam_scores[:, 1:] = float("-inf")
    base = (torch.arange(b, device=device) * k)[:, None]  # (B, 1) first flat row of each input
    for step in range(max_len):
        if cache is not None:
            logits = model.decode(tokens[:, -1:], beam_memory, cache=cache)[:, -1]  # (B*K, V)
        else:
            logits = model.decode(tokens, beam_memory)[:, -1]
        logp = logits.float().log_softmax(dim=-1)
        v = logp.shape[-1]
        # A finished hypothesis can only be continued by pad, at no cost.
        forced = torch.full_like(logp, float("-inf"))
        forced[:, pad] = 0.0
        logp = torch.where(finished[:, None], forced, logp)
        cand = beam_scores.view(b * k, 1) + logp  # (B*K, V) raw sums
        cand_len = torch.where(finished, lengths, torch.full_like(lengths, step + 1))  # (B*K,)
        ranked = cand / _length_penalty(cand_len, length_penalty)[:, None]
        _, top = ranked.view(b, k * v).topk(k, dim=-1)  # (B, K)
        src = (base + top // v).view(-1)  # (B*K,) flat row each new beam continues
        new_tok = (top % v).view(-1)
        beam_scores = cand.view(b, k * v).gather(1, top)
        was_finished = finished[src]
        lengths = cand_len[src]
        finished = was_finished | (new_tok == eos)
        tokens = torch.cat([tokens[src], new_tok[:, None]], dim=1)
        if cache is not None:
            cache.reorder(src, memory=False)  # beams move within their input: its memory rows are equal
        if (step + 1) % _CHECK_EVERY == 0 and bool(finished.all()):
            break
    final = beam_scores.view(-1) / _length_penalty(lengths, length_penalty)  # (B*K,)
    best = base.view(-1) + final.view(b, k).argmax(dim=-1)  # (B,)
    return _finish(tokens[best, 1:], lengths[best], final[best])


DECODING_METHODS = {"greedy": greedy_decode, "beam": beam_search}


def generate(
    model: Any,
    inputs: Any,
    inputs_mask: torch.Tensor | None = None,
    method: str = "greedy",
    **kwargs: Any,
) -> Decoded:
    """Encode ``inputs`` and decode: ``model.encode(inputs[, inputs_mask])`` then greedy or beam search.

    Args:
        model: an encoder-decoder in eval mode.
        inputs: what ``model.encode`` takes: source ids ``[B, S]`` (Seq2SeqTransformer), images
            ``[B, 3, H, W]`` (ImageCaptioner).
        inputs_mask: passed to ``encode`` only when given (e.g. a source padding mask).
        method: ``"greedy"`` (:func:`greedy_decode`) or ``"beam"`` (:func:`beam_search`).
        **kwargs: the chosen method's options (``max_len``, ``beam_size``, ``use_cache``, ...).
    """
    if method not in DECODING_METHODS:
        raise ValueError(f"unknown decoding method {method!r}; valid: {', '.join(DECODING_METHODS)}")
    with torch.no_grad():
        memory = model.encode(inputs) if inputs_mask is None else model.encode(inputs, inputs_mask)
    return DECODING_METHODS[method](model, memory, **kwargs)
