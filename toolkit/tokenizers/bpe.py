"""The ``bpe<V>`` tokenizer: HuggingFace ``tokenizers`` BPE, trained on the training split.

The Whitespace pre-tokenizer splits the text (a DNA record has no whitespace, so it is one
"word", as in the paper); the vocabulary has exactly V entries including the specials at
0..4. When the corpus is too small for V - 5 tokens, the vocabulary is padded with
unreachable ``[unusedN]`` entries so that model shapes do not depend on the corpus.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from toolkit.errors import ConfigError
from toolkit.plumbing import release_freed_memory
from toolkit.sequences import SPECIAL_TOKENS
from toolkit.tokenizers.base import Tokenizer, _model_vocab, _specials
from toolkit.tokenizers.spec import N_SPECIALS, vocabulary_problem

log = logging.getLogger(__name__)


class BpeTokenizer(Tokenizer):
    """HuggingFace BPE (Whitespace pre-tokenizer)."""

    def __init__(self, json_text: str) -> None:
        vocab = _model_vocab(json.loads(json_text))
        super().__init__(f"bpe{len(vocab)}", json_text)

    def _encode_spans(self, seqs: Sequence[str], spans: bool = True) -> tuple[Any, Any, Any, np.ndarray]:
        encs = self.hf.encode_batch(list(seqs), add_special_tokens=False)
        counts = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in encs), dtype=np.int32,
                          count=int(counts.sum()))
        offs = np.fromiter(itertools.chain.from_iterable(itertools.chain.from_iterable(e.offsets)
                                                         for e in encs),
                           dtype=np.int64, count=2 * int(counts.sum())).reshape(-1, 2)
        return ids, offs[:, 0], offs[:, 1], counts


def train_bpe(v: int, train_texts: Iterable[str]) -> BpeTokenizer:
    """Train ``bpe<v>`` on ``train_texts`` (any iterable, consumed once, streamed to the trainer)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    problem = vocabulary_problem(f"bpe{v}")
    if problem:
        raise ConfigError(f"tokenizer 'bpe{v}': {problem}")
    hf = HFTokenizer(models.BPE(unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    # limit_alphabet keeps the initial alphabet inside V on corpora with many characters.
    trainer = trainers.BpeTrainer(vocab_size=v, special_tokens=_specials(), show_progress=False,
                                  limit_alphabet=v - N_SPECIALS)
    n = 0

    def counted() -> Iterable[str]:
        nonlocal n
        for t in train_texts:
            n += 1
            yield t

    hf.train_from_iterator(counted(), trainer=trainer)
    if n == 0:
        raise ConfigError(f"tokenizer 'bpe{v}': no training records to learn from")
    doc = json.loads(hf.to_str())
    # The trainer's word counts (about 1 GiB for 20 Mb of DNA) are freed here, but the C
    # allocator keeps them from the system while the corpus is encoded: give them back.
    del hf, trainer
    release_freed_memory()
    vocab = doc["model"]["vocab"]
    if any(vocab.get(t) != i for t, i in SPECIAL_TOKENS.items()):
        raise AssertionError("BPE trainer did not put the specials at ids 0..4")
    if len(vocab) > v:
        raise AssertionError(f"BPE trainer returned {len(vocab)} > {v} tokens")
    if len(vocab) < v:
        log.warning("bpe%d: the training records only support %d tokens; padding the vocabulary "
                    "with %d unreachable [unusedN] entries", v, len(vocab), v - len(vocab))
        # Multi-character entries without merge rules can never be produced by BPE.
        for i in range(v - len(vocab)):
            vocab[f"[unused{i}]"] = len(vocab)
    return BpeTokenizer(HFTokenizer.from_str(json.dumps(doc)).to_str())
