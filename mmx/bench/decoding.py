"""Decoding speed with key/value caches against re-running the prefix, and identical outputs.

Greedy decoding of exactly ``tokens`` tokens (END does not stop it) for a batch of inputs: with the
caches (each new token runs one decoder step: its own query against the cached keys and values of
the earlier tokens, and the encoder memory projected once), and without (each step re-runs the
decoder over the whole prefix and re-projects the memory). Also beam search both ways. Both ways
must produce the same tokens; then the decoding of one encoded batch is timed (the encoder runs
once, outside the timing; median of ``repeats`` after ``warmup``, alternating). Models: the
translation recipe's Seq2SeqTransformer and the captioning recipe's ImageCaptioner, randomly
initialised, in eval mode.
"""

from __future__ import annotations

import datetime as dt
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mmx.bench.report import Figure, Log, SuiteResult, log_info
from mmx.bench.timing import device_name, time_calls

__all__ = ["DecodingConfig", "build", "measure", "suite"]


@dataclass
class DecodingConfig:
    """Models, batch and sizes (scripts/bench_decoding.py's options)."""

    models: list[str] = field(default_factory=lambda: ["translation", "captioning"])
    batch: int = 16
    tokens: int = 32
    beam: int = 4
    d_model: int = 128
    heads: int = 4
    layers: int = 2
    vocab: int = 32
    source_len: int = 16
    image_size: int = 64


def build(kind: str, c: DecodingConfig, device: torch.device) -> tuple[torch.nn.Module, Callable[[], Any]]:
    """``(model, encode)``: a model of the recipe's size and a function giving the batch's memory."""
    from mmx.models import ImageCaptioner, Seq2SeqTransformer

    g = torch.Generator().manual_seed(0)
    size = dict(d_model=c.d_model, heads=c.heads, decoder_layers=c.layers, dropout=0.0)
    if kind == "translation":
        model = Seq2SeqTransformer(src_vocab_size=c.vocab, tgt_vocab_size=c.vocab, encoder_layers=c.layers, **size)
        lengths = torch.randint(c.source_len // 2, c.source_len + 1, (c.batch,), generator=g)
        src = torch.randint(4, c.vocab, (c.batch, c.source_len), generator=g)
        mask = torch.arange(c.source_len)[None] < lengths[:, None]  # sources of different lengths
        src = src.masked_fill(~mask, 0)
        inputs = (src.to(device), mask.to(device))
    elif kind == "captioning":
        model = ImageCaptioner(vocab_size=c.vocab, input_size=c.image_size, **size)
        inputs = (torch.rand(c.batch, 3, 32, 32, generator=g).mul(2).sub(1).to(device),)
    else:
        raise ValueError(f"unknown decoding model {kind!r}; valid models: translation, captioning")
    model = model.to(device).eval()
    return model, lambda: model.encode(*inputs)


def measure(
    config: DecodingConfig | None = None,
    warmup: int = 1,
    repeats: int = 5,
    device: torch.device | None = None,
    command: str | None = None,
    log: Log = log_info,
) -> dict[str, Any]:
    """Time cached against re-run decoding for each model and search.

    Raises:
        ValueError: cached and re-run decoding produced different tokens.

    Returns:
        ``{"meta", "results": per (model, search)}`` (the JSON of scripts/bench_decoding.py).
    """
    from mmx.decoding import beam_search, greedy_decode

    c = config or DecodingConfig()
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    log(
        f"# decoding {c.tokens} tokens, batch {c.batch}, d_model {c.d_model}, {c.layers} decoder layers; "
        f"{device_name(device)}; median of {repeats}"
    )
    log(f"{'model':12s} {'search':8s} {'cached ms':>10s} {'re-run ms':>10s} {'speed-up':>9s}  identical")
    for kind in c.models:
        model, encode = build(kind, c, device)
        searches = {
            "greedy": lambda memory, cache, model=model: greedy_decode(
                model, memory, max_len=c.tokens, use_cache=cache, stop_at_eos=False
            )
        }
        if c.beam > 0:
            searches[f"beam {c.beam}"] = lambda memory, cache, model=model: beam_search(
                model, memory, beam_size=c.beam, max_len=c.tokens, use_cache=cache
            )
        with torch.no_grad():
            memory = encode()  # encoded once: both ways decode the same memory, only decoding is timed
        for name, search in searches.items():
            cached, rerun = search(memory, True), search(memory, False)
            identical = bool(torch.equal(cached.tokens, rerun.tokens))
            if not identical:
                raise ValueError(f"{kind} {name}: cached and re-run decoding differ")

            def run(cache: bool, search=search, memory=memory) -> None:
                search(memory, cache)

            times = time_calls({"cached": lambda: run(True), "rerun": lambda: run(False)}, warmup, repeats, device)
            speedup = times["rerun"] / times["cached"]
            rows.append(
                {
                    "model": kind,
                    "search": name,
                    "tokens_generated": int(cached.tokens.shape[1]),
                    "cached_ms": times["cached"] * 1e3,
                    "rerun_ms": times["rerun"] * 1e3,
                    "speedup": speedup,
                    "identical": identical,
                }
            )
            log(
                f"{kind:12s} {name:8s} {times['cached'] * 1e3:10.1f} {times['rerun'] * 1e3:10.1f} "
                f"{speedup:8.2f}x  {identical}"
            )
    meta = {
        "date": dt.date.today().isoformat(),
        "torch": torch.__version__,
        "device": device_name(device),
        "command": command or " ".join(["python", *sys.argv]),
        **asdict(c),
        "warmup": warmup,
        "repeats": repeats,
    }
    meta["device"] = str(device)  # as the script always wrote it: the --device option
    meta["machine"] = device_name(device)
    return {"meta": meta, "results": rows}


def suite(device: torch.device, quick: bool = False, log: Log = log_info) -> SuiteResult:
    """``mmx bench decoding``: greedy and beam-search decoding with caches against re-running the prefix."""
    if quick:
        config, warmup, repeats = (
            DecodingConfig(batch=2, tokens=5, beam=2, d_model=16, heads=2, layers=1, image_size=32),
            0,
            1,
        )
    else:
        config, warmup, repeats = DecodingConfig(), 1, 3
    data = measure(config, warmup, repeats, device, command="", log=log)
    figures = [
        Figure(
            f"{r['model']} {r['search']}, {config.tokens} tokens x {config.batch}, with caches",
            r["cached_ms"],
            "re-running the prefix",
            r["rerun_ms"],
            "ms",
        )
        for r in data["results"]
    ]
    notes = [
        f"d_model {config.d_model}, {config.layers} decoder layers; identical tokens both ways; median of {repeats}"
    ]
    return SuiteResult("decoding", "decoding with key/value caches", figures, details=data, notes=notes)
