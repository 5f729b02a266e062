"""Decoding speed with key/value caches against re-running the prefix, and identical outputs.

Greedy decoding of exactly --tokens tokens (END does not stop it) for a batch of --batch inputs:
with the caches (each new token runs one decoder step: its own query against the cached keys and
values of the earlier tokens, and the encoder memory projected once), and without (each step re-runs
the decoder over the whole prefix and re-projects the memory). Also beam search (--beam) both ways.
The script first checks that both ways produce the same tokens, then times the decoding of one
encoded batch (the encoder runs once, outside the timing; median of --repeats after --warmup,
alternating). Models: the translation recipe's Seq2SeqTransformer and
the captioning recipe's ImageCaptioner, randomly initialised, in eval mode. The code lives in
``mmx.bench.decoding`` (also run by ``mmx bench decoding``).

    python scripts/bench_decoding.py --json benchmarks/decoding-cpu.json
"""

from __future__ import annotations

import argparse

import torch
from _machine import measure_and_save  # scripts/ is on sys.path when a script runs

from mmx.bench.decoding import DecodingConfig, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--models", nargs="+", default=["translation", "captioning"], choices=["translation", "captioning"]
    )
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
    measure_and_save(measure, DecodingConfig, args)


if __name__ == "__main__":
    main()
