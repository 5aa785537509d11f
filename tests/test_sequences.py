"""Sequences built from a real Zarr token store, against a naive reconstruction."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from toolkit import store
from toolkit.sequences import CLS, EVAL, PAD, SEP, TRAIN, load_sequences

ATTRS = {"corpus": "c", "source": "s", "kind": "dna", "tokenizer": "kmer3", "tokenizer_hash": "h",
         "vocab_size": 74, "special_tokens": {}, "provenance": [], "split": {},
         "entropy_profile": {}, "toolkit_version": "test"}


def make_store(path: Path, lengths: list[int], split: list[int], chunk: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 74, size=sum(lengths)).astype(np.uint16)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    with store.writing(path, "tokens", ATTRS) as g:
        store.create_array(g, "tokens", "tokens", data=tokens, chunks=(chunk,))
        store.create_array(g, "tokens", "offsets", data=offsets)
        store.create_array(g, "tokens", "split", data=np.array(split, dtype=np.uint8))
        store.create_array(g, "tokens", "record_symbols", data=np.array(lengths) * 3)
    return tokens, offsets


@pytest.mark.parametrize("chunk", [7, 1000])  # 7: forces the chunked LRU reader
def test_truncate_is_cls_record_prefix_sep(tmp_path: Path, chunk: int) -> None:
    lengths = [5, 30, 0, 12, 9, 40]
    split = [0, 0, 0, 1, 0, 1]
    tokens, offsets = make_store(tmp_path / "t.zarr", lengths, split, chunk)
    g = store.open_store(tmp_path / "t.zarr", "tokens")
    seqs = load_sequences(g, TRAIN, 16, "truncate", cache_chunks=2)
    records = [r for r in range(len(lengths)) if split[r] == TRAIN and lengths[r] > 0]
    assert list(seqs.record_ids) == records
    ids, mask = seqs.batch(np.arange(len(seqs)))
    for row, r in enumerate(records):
        body = tokens[offsets[r]:offsets[r + 1]][:14]
        want = np.full(16, PAD)
        want[0], want[1:len(body) + 1], want[len(body) + 1] = CLS, body, SEP
        assert np.array_equal(ids[row], want)
        assert mask[row].sum() == len(body) + 2
    assert len(load_sequences(g, EVAL, 16, max_records=1)) == 1


def test_pack_covers_every_token_once_with_separators(tmp_path: Path) -> None:
    lengths = [5, 30, 12, 9, 40, 3]
    split = [0, 0, 0, 1, 0, 0]  # record 3 is eval: packing breaks there
    tokens, offsets = make_store(tmp_path / "t.zarr", lengths, split, 11)
    g = store.open_store(tmp_path / "t.zarr", "tokens")
    seqs = load_sequences(g, TRAIN, 16, "pack", cache_chunks=2)
    ids, mask = seqs.batch(np.arange(len(seqs)))
    assert (ids[:, 0] == CLS).all() and ids.shape[1] == 16
    content = [row[1:m.sum() - 1] for row, m in zip(ids, mask, strict=True)]
    flat = np.concatenate(content)
    # Every training token appears exactly once, in order; records end with [SEP].
    want = np.concatenate([np.append(tokens[offsets[r]:offsets[r + 1]], SEP)
                           for r in range(len(lengths)) if split[r] == TRAIN])
    kept = flat[flat != SEP]
    assert np.array_equal(kept, want[want != SEP])
    assert (flat == SEP).sum() <= (want == SEP).sum()
    # Only the last sequence of each contiguous block may be short.
    assert (mask.sum(1)[:-1] == 16).sum() >= len(seqs) - 2
