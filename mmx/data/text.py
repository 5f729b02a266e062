"""Word-level vocabularies for the built-in sequence tasks, on Hugging Face ``tokenizers``.

The shapes captions and their translations are closed template languages, so one token per
whitespace word is the natural unit (and lets an alignment picture label every row and column
with a whole word). The vocabulary is a ``tokenizers`` ``WordLevel`` model, saved and loaded as
a standard ``tokenizer.json``.

Ids: ``<pad>`` 0, ``<s>`` (BEGIN) 1, ``</s>`` (END) 2, ``<unk>`` 3, then the words in the order given.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

__all__ = ["WordTokenizer", "PAD", "BOS", "EOS", "UNK"]

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)


class WordTokenizer:
    """Whitespace words <-> ids, with padding, BEGIN/END tokens and batch encoding to tensors.

    Args:
        words: the vocabulary (duplicates and special tokens are ignored; order is kept).

    >>> tok = WordTokenizer(["a", "red", "circle"])
    >>> ids, mask = tok.encode(["a red circle", "a circle"], eos=True)  # [2, 4] long, [2, 4] bool
    >>> tok.decode(ids)
    ['a red circle', 'a circle']
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, words: Iterable[str] | None = None, *, _tokenizer=None) -> None:
        from tokenizers import Tokenizer
        from tokenizers.models import WordLevel
        from tokenizers.pre_tokenizers import WhitespaceSplit

        if _tokenizer is None:
            vocab = {token: i for i, token in enumerate(SPECIALS)}
            for word in words or ():
                if not isinstance(word, str) or not word or any(c.isspace() for c in word):
                    raise ValueError(f"a vocabulary word must be a non-empty string without whitespace; got {word!r}")
                vocab.setdefault(word, len(vocab))
            _tokenizer = Tokenizer(WordLevel(vocab, unk_token=UNK))
            _tokenizer.pre_tokenizer = WhitespaceSplit()
            _tokenizer.add_special_tokens([PAD, BOS, EOS])
        self._tok = _tokenizer
        vocab = self._tok.get_vocab()
        for i, token in enumerate(SPECIALS):
            if vocab.get(token) != i:
                raise ValueError(f"{token!r} must have id {i} in an mmx word vocabulary; got {vocab.get(token)}")

    # -- files ------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``tokenizer.json`` (a folder path gets ``tokenizer.json`` inside it)."""
        path = Path(path)
        if path.suffix != ".json":
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        self._tok.save(str(tmp))
        tmp.replace(path)
        return path

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> WordTokenizer:
        """Load a ``tokenizer.json`` written by :meth:`save` (or a folder holding one)."""
        from tokenizers import Tokenizer

        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a plain Exception on malformed JSON
            raise ValueError(f"{path} is not a valid tokenizer.json ({e})") from e
        return cls(_tokenizer=tok)

    # -- vocabulary -------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self._tok.get_vocab_size()

    @property
    def words(self) -> list[str]:
        """Every token, ordered by id."""
        vocab = self._tok.get_vocab()
        return sorted(vocab, key=vocab.__getitem__)

    def unknown_words(self, text: str) -> list[str]:
        """The words of ``text`` that are not in the vocabulary (they would become ``<unk>``)."""
        vocab = self._tok.get_vocab()
        return [w for w in text.split() if w not in vocab]

    # -- encoding ---------------------------------------------------------------------------------
    def encode(
        self, texts: Sequence[str] | str, bos: bool = False, eos: bool = False, padding_side: str = "right"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Ids ``[B, T]`` (long, padded with ``pad_id``) and mask ``[B, T]`` (bool, True = real token)."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("encode needs at least one text")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right'; got {padding_side!r}")
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings; got {type(text).__name__}")
        rows = [
            [self.bos_id] * bos + enc.ids + [self.eos_id] * eos
            for enc in self._tok.encode_batch(list(texts), add_special_tokens=False)
        ]
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, row in enumerate(rows):
            span = slice(0, len(row)) if padding_side == "right" else slice(width - len(row), width)
            ids[i, span] = torch.tensor(row, dtype=torch.long)
            mask[i, span] = True
        return ids, mask

    def tokens(self, ids: Sequence[int] | torch.Tensor) -> list[str]:
        """The tokens of one row of ids, cut after the first END, without padding or BEGIN."""
        out = []
        vocab = self.words
        for i in ids.tolist() if isinstance(ids, torch.Tensor) else ids:
            if i == self.eos_id:
                break
            if i in (self.pad_id, self.bos_id):
                continue
            if not 0 <= i < len(vocab):
                raise ValueError(f"token id {i} is outside the vocabulary of {len(vocab)} tokens")
            out.append(vocab[i])
        return out

    def decode(self, ids: torch.Tensor | Sequence[Sequence[int]]) -> list[str]:
        """Texts of a batch of id rows ``[B, T]``: each cut at its first END, padding and BEGIN dropped."""
        if isinstance(ids, torch.Tensor) and ids.ndim == 1:
            ids = ids[None]
        return [" ".join(self.tokens(row)) for row in ids]

    def __repr__(self) -> str:
        return f"WordTokenizer({len(self)} tokens)"
