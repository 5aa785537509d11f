"""Tokenizers: ``char``, ``kmer<k>``, ``kmer<k>-overlap``, ``bpe<V>`` and a checkpoint's own.

:func:`build_tokenizer` builds (and trains) a toolkit tokenizer from its spec,
:func:`load_tokenizer` reads back the ``tokenizer.json`` it saved. The package, in the
order its modules import each other (none imports a later pipeline stage):

- :mod:`~toolkit.tokenizers.spec`: the spec names (``TOKENIZER_PATTERN``, ``N_SPECIALS``,
  ``MAX_K``, ``CHECKPOINT_TOKENIZER``) and the vocabulary-size rules; imports only
  :mod:`toolkit.errors`, so :mod:`toolkit.config` validates studies with it.
- :mod:`~toolkit.tokenizers.base`: the :class:`Tokenizer` base class (encoding interface,
  ``tokenizer.json`` and its hash, the HuggingFace export) and the shared helpers.
- :mod:`~toolkit.tokenizers.char`, :mod:`~toolkit.tokenizers.kmer`,
  :mod:`~toolkit.tokenizers.bpe`: one tokenizer each, with its vocabulary and rules
  (documented in the module), its encoder and its builder or trainer.
- :mod:`~toolkit.tokenizers.hf`: a published checkpoint's tokenizer
  (``tokenizer = "checkpoint"``), its files and its identity.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from toolkit.errors import ConfigError, StoreError
from toolkit.tokenizers.base import Tokenizer
from toolkit.tokenizers.bpe import BpeTokenizer, train_bpe
from toolkit.tokenizers.char import _CHAR_REGEX, CharTokenizer, train_char
from toolkit.tokenizers.hf import (
    CheckpointTokenizer,
    exported_identity,
    has_tokenizer,
    load_checkpoint_tokenizer,
    tokenizer_files,
    tokenizer_identity,
)
from toolkit.tokenizers.kmer import _KMER_REGEX_RE, KmerTokenizer, kmer_tokenizer
from toolkit.tokenizers.spec import (
    CHECKPOINT_TOKENIZER,
    MAX_K,
    N_SPECIALS,
    TOKENIZER_PATTERN,
    tokenizer_vocab_size,
    vocabulary_problem,
)

__all__ = [
    "CHECKPOINT_TOKENIZER", "MAX_K", "N_SPECIALS", "TOKENIZER_PATTERN",
    "BpeTokenizer", "CharTokenizer", "CheckpointTokenizer", "KmerTokenizer", "Tokenizer",
    "build_tokenizer", "exported_identity", "has_tokenizer", "load_checkpoint_tokenizer",
    "load_tokenizer", "tokenizer_files", "tokenizer_identity", "tokenizer_vocab_size",
]


def build_tokenizer(spec: str, kind: Literal["dna", "text"],
                    train_texts: Iterable[str] | None = None) -> Tokenizer:
    """Build (and for ``char`` and ``bpe<V>`` train) a tokenizer.

    Parameters
    ----------
    spec
        ``char``, ``kmer<k>``, ``kmer<k>-overlap`` or ``bpe<V>``.
    kind
        ``dna`` or ``text``; k-mer tokenizers need DNA.
    train_texts
        The training split's records (``char`` and ``bpe<V>`` learn from them; any
        iterable, consumed once and streamed to the BPE trainer).

    Raises
    ------
    ConfigError
        Unknown spec, k-mers on text, a BPE vocabulary not larger than the specials,
        or a trainable tokenizer without training texts.
    """
    m = TOKENIZER_PATTERN.match(spec)
    if not m:
        raise ConfigError(f"unknown tokenizer '{spec}'; use char, kmer<k> (e.g. kmer6), "
                          "kmer<k>-overlap or bpe<V> (e.g. bpe4096)")
    if m.group("k"):
        k = int(m.group("k"))
        if kind != "dna":
            raise ConfigError(f"tokenizer '{spec}' needs a DNA corpus, this one is {kind}; "
                              "use char or bpe<V> for text")
        problem = vocabulary_problem(spec)
        if problem:
            raise ConfigError(f"tokenizer '{spec}': {problem}")
        return kmer_tokenizer(k, bool(m.group("overlap")))
    if train_texts is None:
        raise ConfigError(f"tokenizer '{spec}' must be trained: give the training texts")
    if spec == "char":
        return train_char(kind, train_texts)
    return train_bpe(int(m.group("v")), train_texts)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json`` written by :meth:`Tokenizer.save`; the spec is recognised
    from the file's structure and :attr:`Tokenizer.hash` is the sha256 of its bytes."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
        doc = json.loads(text)
    except FileNotFoundError as e:
        raise StoreError(f"{path}: no tokenizer here; run `toolkit prepare` first") from e
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise StoreError(f"{path}: not a readable tokenizer.json ({e}); rebuild it with "
                         "`toolkit prepare --force`") from e
    model = (doc.get("model") or {}).get("type") if isinstance(doc, dict) else None
    if model == "BPE":
        return BpeTokenizer(text)
    pre = doc.get("pre_tokenizer") or {} if model == "WordLevel" else {}
    wrapped = pre.get("type") == "Sequence"
    if wrapped and len(pre.get("pretokenizers", [])) == 1:
        pre = pre["pretokenizers"][0]
    pattern = (pre.get("pattern") or {}).get("Regex") if pre.get("type") == "Split" else None
    if pattern == _CHAR_REGEX and not wrapped:
        return CharTokenizer(text)
    km = _KMER_REGEX_RE.match(pattern or "")
    if km:
        return KmerTokenizer(int(km.group(1)), wrapped, text)
    raise StoreError(f"{path}: not a tokenizer written by this toolkit (model {model!r}); "
                     "rebuild it with `toolkit prepare --force`")
