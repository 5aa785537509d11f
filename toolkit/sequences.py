"""Model input sequences built from a token store, shared by training and evaluation.

A sequence is ``[CLS] t_1 ... t_n [SEP]`` followed by ``[PAD]`` up to ``seq_len``, with
the ids the token store records for these roles (the toolkit's 2, 3, 0; a checkpoint's
tokenizer brings its own, e.g. RoBERTa ``<s> </s> <pad>`` = 0, 2, 1).
Two modes:

- ``truncate`` (paper): one sequence per record, the record cut to ``seq_len - 2``
  tokens; no packing.
- ``pack``: the records of the split are concatenated (separated by ``[SEP]``) and
  cut into full-length sequences, so no position is wasted on padding.

Token stores can outgrow memory, so tokens are read chunk by chunk through a small
LRU cache of decompressed Zarr chunks.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

PAD, UNK, CLS, SEP, MASK = 0, 1, 2, 3, 4
SPECIAL_TOKENS = {"[PAD]": PAD, "[UNK]": UNK, "[CLS]": CLS, "[SEP]": SEP, "[MASK]": MASK}
TRAIN, EVAL, UNUSED = 0, 1, 2


def special_ids(attrs: Any) -> dict[str, int]:
    """Role (``[PAD]`` ...) -> id of a token store's recorded specials (its root attributes).

    The toolkit's own tokenizers use :data:`SPECIAL_TOKENS`; a checkpoint's tokenizer
    records its own ids (``tokenizer = "checkpoint"``). Missing roles fall back to ours.
    """
    recorded = dict(attrs.get("special_tokens") or {}) if hasattr(attrs, "get") else {}
    return {role: int(recorded.get(role, default)) for role, default in SPECIAL_TOKENS.items()}


def never_masked(attrs: Any) -> np.ndarray:
    """Sorted ids a token store marks as special (evaluation never masks them)."""
    ids = attrs.get("special_ids") if hasattr(attrs, "get") else None
    if ids is None:
        ids = [i for i in special_ids(attrs).values() if i >= 0]
    return np.unique(np.asarray(ids, dtype=np.int64))


class _ChunkReader:
    """Random access to a 1-D Zarr array through an LRU cache of whole chunks."""

    def __init__(self, array: Any, max_chunks: int = 16) -> None:
        self.array = array
        self.chunk = int(array.chunks[0])
        self.max_chunks = max_chunks
        self.cache: OrderedDict[int, np.ndarray] = OrderedDict()
        if array.shape[0] <= self.chunk * max_chunks:
            # Small enough: keep it all in memory once.
            self.whole: np.ndarray | None = np.asarray(array[...])
        else:
            self.whole = None

    def _get_chunk(self, c: int) -> np.ndarray:
        if c in self.cache:
            self.cache.move_to_end(c)
            return self.cache[c]
        data = np.asarray(self.array[c * self.chunk:(c + 1) * self.chunk])
        self.cache[c] = data
        if len(self.cache) > self.max_chunks:
            self.cache.popitem(last=False)
        return data

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.whole is not None:
            return self.whole[start:stop]
        parts = []
        pos = start
        while pos < stop:
            c = pos // self.chunk
            data = self._get_chunk(c)
            lo = pos - c * self.chunk
            hi = min(stop - c * self.chunk, data.shape[0])
            parts.append(data[lo:hi])
            pos = c * self.chunk + hi
        return np.concatenate(parts) if parts else np.empty(0, dtype=self.array.dtype)


@dataclass
class SequenceSet:
    """The sequences of one split of a token store, with random access.

    ``len(s)`` is the number of sequences; ``s.batch(indices)`` returns
    ``(input_ids, attention_mask)`` as int64 arrays of shape (B, seq_len).
    """

    reader: _ChunkReader
    starts: np.ndarray  # (S,) first token of each sequence's content in the flat array
    stops: np.ndarray   # (S,)
    seq_len: int
    mode: Literal["truncate", "pack"]
    record_ids: np.ndarray  # (S,) record of each sequence (first record for packed)
    sep_after: list[np.ndarray] | None = None  # pack mode: content positions of [SEP] separators
    cls: int = CLS  # framing ids: the store's recorded specials (a checkpoint's tokenizer has its own)
    sep: int = SEP
    pad: int = PAD

    def __len__(self) -> int:
        return int(self.starts.shape[0])

    def content(self, i: int) -> np.ndarray:
        """Tokens between [CLS] and [SEP] of sequence i (pack: with inner [SEP]s)."""
        toks = self.reader.read(int(self.starts[i]), int(self.stops[i])).astype(np.int64)
        if self.mode == "pack" and self.sep_after is not None and len(self.sep_after[i]):
            toks = np.insert(toks, self.sep_after[i], self.sep)
            toks = toks[: self.seq_len - 2]
        return toks

    def batch(self, indices: np.ndarray | list[int]) -> tuple[np.ndarray, np.ndarray]:
        ids = np.full((len(indices), self.seq_len), self.pad, dtype=np.int64)
        mask = np.zeros((len(indices), self.seq_len), dtype=np.int64)
        for row, i in enumerate(indices):
            toks = self.content(int(i))
            n = toks.shape[0]
            ids[row, 0] = self.cls
            ids[row, 1:n + 1] = toks
            ids[row, n + 1] = self.sep
            mask[row, : n + 2] = 1
        return ids, mask

    def n_tokens(self) -> int:
        """Non-padding tokens over all sequences (specials included)."""
        return int((self.stops - self.starts).sum() + 2 * len(self))


def load_sequences(group: Any, split: int, seq_len: int, mode: Literal["truncate", "pack"] = "truncate",
                   max_records: int | None = None, cache_chunks: int = 16) -> SequenceSet:
    """Sequences of ``split`` (TRAIN or EVAL) of an open token store group, in record order.

    Sequences are framed with the store's recorded [CLS]/[SEP]/[PAD] ids (:func:`special_ids`).
    """
    sp = special_ids(getattr(group, "attrs", {}))
    framing: dict[str, Any] = {"cls": sp["[CLS]"], "sep": sp["[SEP]"], "pad": sp["[PAD]"]}
    offsets = np.asarray(group["offsets"][...])
    which = np.flatnonzero(np.asarray(group["split"][...]) == split)
    if max_records is not None:
        which = which[:max_records]
    starts = offsets[which]
    lengths = offsets[which + 1] - starts
    keep = lengths > 0
    which, starts, lengths = which[keep], starts[keep], lengths[keep]
    reader = _ChunkReader(group["tokens"], cache_chunks)
    room = seq_len - 2
    if mode == "truncate":
        stops = starts + np.minimum(lengths, room)
        return SequenceSet(reader, starts, stops, seq_len, mode, which, **framing)
    # Pack: walk the records, each followed by a [SEP], cutting every `room` positions.
    # Packed sequences may span records that are not adjacent in the flat array, so
    # a sequence is described by (records, pieces); to keep random access simple we
    # restrict packing to runs of adjacent records (the common case: one split is
    # contiguous) and break a sequence where the next record is not adjacent.
    seq_starts: list[int] = []
    seq_stops: list[int] = []
    seq_records: list[int] = []
    seps: list[np.ndarray] = []
    cur_start = -1
    cur_len = 0  # content positions used, separators included
    cur_seps: list[int] = []
    cur_rec = -1
    prev_stop = -1

    def close(stop: int) -> None:
        nonlocal cur_start, cur_len, cur_seps
        seq_starts.append(cur_start)
        seq_stops.append(stop)
        seq_records.append(cur_rec)
        seps.append(np.array(cur_seps, dtype=np.int64))
        cur_start, cur_len, cur_seps = -1, 0, []

    for rec, s, n in zip(which.tolist(), starts.tolist(), lengths.tolist(), strict=True):
        pos = s
        remaining = n
        if cur_start >= 0 and s != prev_stop:
            close(prev_stop)
        while remaining > 0:
            if cur_start < 0:
                cur_start, cur_rec = pos, rec
            take = min(remaining, room - cur_len)
            cur_len += take
            pos += take
            remaining -= take
            if cur_len < room and remaining == 0:
                # record ends inside this sequence: a separator follows it
                cur_seps.append(pos - cur_start)
                cur_len += 1
            if cur_len >= room:
                close(pos)
        prev_stop = s + n
    if cur_start >= 0:
        close(prev_stop)
    # Separator positions are in original (separator-free) coordinates, as np.insert wants.
    return SequenceSet(reader, np.array(seq_starts, dtype=np.int64), np.array(seq_stops, dtype=np.int64),
                       seq_len, mode, np.array(seq_records, dtype=np.int64), seps, **framing)
