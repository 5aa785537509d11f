"""Tokenizer specs: the names a study gives ``runs.X.tokenizer`` and what they imply.

This module knows the spelling of every spec (``char``, ``kmer<k>``, ``kmer<k>-overlap``,
``bpe<V>``, ``checkpoint``) and the vocabulary-size rules that hold before anything is
trained. It imports nothing of the toolkit but :mod:`toolkit.errors`, so that
:mod:`toolkit.config` validates a study with it and the tokenizers themselves
(:mod:`toolkit.tokenizers`) apply the same rules without an import cycle.
"""

from __future__ import annotations

import re

from toolkit.errors import ConfigError

TOKENIZER_PATTERN = re.compile(r"^(char|kmer(?P<k>[1-9]\d*)(?P<overlap>-overlap)?|bpe(?P<v>[1-9]\d*))$")
"""A toolkit tokenizer's spec; groups ``k`` and ``overlap`` (k-mers), ``v`` (BPE)."""
N_SPECIALS = 5  # UNK, PAD, CLS, SEP, MASK
"""Special tokens of every toolkit tokenizer, at ids 0..4 (:data:`toolkit.sequences.SPECIAL_TOKENS`)."""
N_BASES = 5
"""Single-base tokens of the k-mer vocabulary (``A C G T N``, ids 5..9)."""
MAX_K = 10  # 4**10 + 10 ids: a million-token vocabulary is already far beyond a BERT
"""Largest k of ``kmer<k>`` and ``kmer<k>-overlap``."""
CHECKPOINT_TOKENIZER = "checkpoint"
"""``runs.X.tokenizer`` value: tokenize with the tokenizer saved in the run's checkpoints."""


def tokenizer_vocab_size(spec: str) -> int:
    """Vocabulary size (specials included) implied by a tokenizer name, before training."""
    m = TOKENIZER_PATTERN.match(spec)
    if not m:
        raise ConfigError(f"unknown tokenizer '{spec}'; use char, kmer<k>, kmer<k>-overlap or bpe<V>")
    if m.group("v"):
        return int(m.group("v"))
    if m.group("k"):
        return 4 ** int(m.group("k")) + N_BASES + N_SPECIALS
    return -1  # char: depends on the corpus


def vocabulary_problem(spec: str) -> str | None:
    """Why a well-spelled spec's vocabulary cannot be built (None when it can).

    ``kmer<k>`` needs k <= :data:`MAX_K`; ``bpe<V>`` needs V larger than the
    :data:`N_SPECIALS` special tokens. The text follows ``'<spec>': `` in a message.
    """
    m = TOKENIZER_PATTERN.match(spec)
    if m is None:
        return None
    if m.group("k") and int(m.group("k")) > MAX_K:
        k = m.group("k")
        return f"k = {k} gives 4^{k} tokens; use k <= {MAX_K} (e.g. kmer6)"
    if m.group("v") and int(m.group("v")) <= N_SPECIALS:
        return (f"vocabulary {m.group('v')} is not larger than the {N_SPECIALS} special tokens; "
                "use e.g. bpe4096")
    return None
