"""Decoding speed with key/value caches against re-running the prefix, and identical outputs.

Greedy decoding of exactly --tokens tokens (END does not stop it) for a batch of --batch inputs:
with the caches (each new token runs one decoder step: its own query against the cached keys and
values of the earlier tokens, and the encoder memory projected once), and without (each step re-runs
the decoder over the whole prefix and re-projects the memory). Also beam search (--beam) both ways.
The script first checks that both ways produce the same tokens, then times the decoding of one
encoded batch (the encoder runs once, outside the timing; median of --repeats after --warmup,
alternating). Models: the translation recipe's Seq2SeqTransformer and
the captioning recipe's ImageCaptioner, randomly initialised, in eval mode.

    python scripts/bench_decoding.py --json benchmarks/decoding-cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys

import torch
from _machine import device_name, time_calls  # scripts/ is on sys.path when a script runs

from mmx.decoding import beam_search, greedy_decode
from mmx.models import ImageCaptioner, Seq2SeqTransformer


def build(kind: str, args: argparse.Namespace, device: torch.device):
    """``(model, encode)``: a model of the recipe's size and a function giving the batch's memory."""
    g = torch.Generator().manual_seed(0)
    size = dict(d_model=args.d_model, heads=args.heads, decoder_layers=args.layers, dropout=0.0)
    if kind == "translation":
        model = Seq2SeqTransformer(src_vocab_size=args.vocab, tgt_vocab_size=args.vocab, encoder_layers=args.layers,
                                   **size)
        lengths = torch.randint(args.source_len // 2, args.source_len + 1, (args.batch,), generator=g)
        src = torch.randint(4, args.vocab, (args.batch, args.source_len), generator=g)
        mask = torch.arange(args.source_len)[None] < lengths[:, None]  # sources of different lengths
        src = src.masked_fill(~mask, 0)
        inputs = (src.to(device), mask.to(device))
    else:
        model = ImageCaptioner(vocab_size=args.vocab, input_size=args.image_size, **size)
        inputs = (torch.rand(args.batch, 3, 32, 32, generator=g).mul(2).sub(1).to(device),)
    model = model.to(device).eval()
    return model, lambda: model.encode(*inputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["translation", "captioning"], choices=["translation", "captioning"])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=32, help="output tokens per input (END does not stop decoding)")
    parser.add_argument("--beam", type=int, default=4, help="beam size of the beam-search rows (0: skip them)")
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2, help="decoder (and translation encoder) layers")
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--source-len", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64, help="captioner input size (ResNet layer1: size/4 grid)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    device = torch.device(args.device)

    rows = []
    print(f"# decoding {args.tokens} tokens, batch {args.batch}, d_model {args.d_model}, {args.layers} decoder layers; "
          f"{device_name(device)}; median of {args.repeats}")
    print(f"{'model':12s} {'search':8s} {'cached ms':>10s} {'re-run ms':>10s} {'speed-up':>9s}  identical")
    for kind in args.models:
        model, encode = build(kind, args, device)
        searches = {"greedy": lambda memory, cache: greedy_decode(model, memory, max_len=args.tokens, use_cache=cache,
                                                                  stop_at_eos=False)}
        if args.beam > 0:
            searches[f"beam {args.beam}"] = lambda memory, cache: beam_search(
                model, memory, beam_size=args.beam, max_len=args.tokens, use_cache=cache)
        with torch.no_grad():
            memory = encode()  # encoded once: both ways decode the same memory, only decoding is timed
        for name, search in searches.items():
            cached, rerun = search(memory, True), search(memory, False)
            identical = bool(torch.equal(cached.tokens, rerun.tokens))
            if not identical:
                raise SystemExit(f"{kind} {name}: cached and re-run decoding differ")

            def run(cache: bool, search=search):
                search(memory, cache)

            times = time_calls({"cached": lambda: run(True), "rerun": lambda: run(False)}, args.warmup, args.repeats, device)
            speedup = times["rerun"] / times["cached"]
            rows.append({"model": kind, "search": name, "tokens_generated": int(cached.tokens.shape[1]),
                         "cached_ms": times["cached"] * 1e3, "rerun_ms": times["rerun"] * 1e3,
                         "speedup": speedup, "identical": identical})
            print(f"{kind:12s} {name:8s} {times['cached'] * 1e3:10.1f} {times['rerun'] * 1e3:10.1f} {speedup:8.2f}x  {identical}")
    if args.json:
        meta = {"date": dt.date.today().isoformat(), "torch": torch.__version__, "device": device_name(device),
                "command": " ".join(["python", *sys.argv]), **{k: v for k, v in vars(args).items() if k != "json"}}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)
        print(f"# wrote {args.json}")


if __name__ == "__main__":
    main()
