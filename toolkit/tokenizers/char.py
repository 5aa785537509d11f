"""The ``char`` tokenizer: one token per character.

Vocabulary: the specials, then the sorted set of characters seen in training (DNA:
``A C G T N`` always included). Unseen characters map to ``[UNK]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import numpy as np

from toolkit.sequences import UNK
from toolkit.tokenizers.base import (
    BASES,
    Tokenizer,
    _model_vocab,
    _record_index,
    _specials,
    _word_level_json,
)
from toolkit.tokenizers.spec import N_SPECIALS

_CHAR_REGEX = "(?m:.)"  # Oniguruma: (?m) makes '.' match newlines too


class CharTokenizer(Tokenizer):
    """One token per character; unseen characters are ``[UNK]``."""

    def __init__(self, json_text: str) -> None:
        super().__init__("char", json_text)
        vocab = _model_vocab(json.loads(json_text))
        chars = sorted((tok, i) for tok, i in vocab.items() if i >= N_SPECIALS)
        self._cps = np.array([ord(t) for t, _ in chars], dtype=np.uint32)
        self._ids = np.array([i for _, i in chars], dtype=np.int32)
        order = np.argsort(self._cps)
        self._cps, self._ids = self._cps[order], self._ids[order]

    def _encode_spans(self, seqs: Sequence[str], spans: bool = True) -> tuple[Any, Any, Any, np.ndarray]:
        cps = np.frombuffer("".join(seqs).encode("utf-32-le"), dtype="<u4")
        counts = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
        where = np.minimum(np.searchsorted(self._cps, cps), max(len(self._cps) - 1, 0))
        if len(self._cps):
            ids = np.where(self._cps[where] == cps, self._ids[where], UNK).astype(np.int32)
        else:
            ids = np.full(len(cps), UNK, dtype=np.int32)
        _, local = _record_index(counts)
        return ids, local, local + 1, counts

    def _hf_pipeline(self) -> Any:
        from tokenizers import decoders

        hf = super()._hf_pipeline()
        hf.decoder = decoders.Fuse()  # decode() gives the text back, not characters spaced out
        return hf


def train_char(kind: Literal["dna", "text"], train_texts: Iterable[str]) -> CharTokenizer:
    """The ``char`` tokenizer of the characters in ``train_texts`` (DNA: ``A C G T N`` too)."""
    seen: set[str] = set(BASES) if kind == "dna" else set()
    for t in train_texts:
        seen.update(t)
    vocab = {t: i for i, t in enumerate(_specials())}
    for ch in sorted(seen):
        vocab[ch] = len(vocab)
    return CharTokenizer(_word_level_json(vocab, _CHAR_REGEX))
