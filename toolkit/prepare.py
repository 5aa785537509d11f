"""``toolkit prepare`` and ``toolkit corpus-stats``: corpora -> tokenizer -> token stores.

One prepare unit is one (corpus, tokenizer) pair of the study. It writes the folder
``tokens/<corpus>--<tokenizer>/`` all-or-nothing (``<tokenizer>`` is ``checkpoint-<run>``
for a run with ``tokenizer = "checkpoint"``: the corpus is encoded with its
checkpoints' own tokenizer, :mod:`toolkit.tokenizers.hf`, whose identity document is
saved as ``tokenizer.json`` and whose special ids are recorded in the store)::

    tokens.zarr          tokens, record offsets, split, symbols per record, the token text of every
                         id, each record's source name and coordinates (storage_schemas/tokens.json)
    tokenizer.json       the tokenizer (its sha256 is the store's tokenizer_hash)
    masks-<digest>.zarr  the evaluation masks under the current mask settings (:mod:`toolkit.masks`)
    complete.json        the completion marker, written last

The folder is built under a hidden temporary name next to it and renamed into place
once complete, so a killed prepare never leaves a folder that has ``complete.json``;
the next prepare removes the dead temporary folder. A unit stale only for its mask
settings (or whose masks store is missing) keeps the folder and builds only the masks
store in it (``masks_only``, decided by :func:`toolkit.units.masks_only`): the token
store and tokenizer are current, and training, which reads only them, stays done.

Memory stays bounded: records are streamed, encoded in batches and appended to the
Zarr array a whole chunk at a time. Trainable tokenizers (``char``, ``bpe<V>``) read
the corpus once more beforehand: a pass counting records (the split needs their
number) and a pass over the training split to train on.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import store
from toolkit.config import StudyConfig
from toolkit.errors import ConfigError, StoreError
from toolkit.plumbing import write_json_atomic
from toolkit.progress import LogProgress
from toolkit.sequences import EVAL, SPECIAL_TOKENS, TRAIN
from toolkit.study import Layout, checkpoint_run, token_key
from toolkit.tokenizers.spec import TOKENIZER_PATTERN, tokenizer_vocab_size

log = logging.getLogger(__name__)

RAW_SAMPLE_SYMBOLS = 1_000_000  # lzma preset 9 runs at well under 1 MB/s on DNA: 1 MB is enough
STATS_SYMBOLS = 4_000_000  # corpus-stats without --max-records reads about this many symbols
BATCH_SYMBOLS = 1 << 20  # symbols encoded per vectorised batch
LOG_EVERY_S = 10.0


# --------------------------------------------------------------------------- helpers


def _check_spec(spec: str) -> None:
    """Fail fast, before any corpus is read, on a spec no tokenizer can have."""
    if checkpoint_run(spec) is not None:
        return  # a checkpoint's own tokenizer: checked when it is loaded
    m = TOKENIZER_PATTERN.match(spec)
    if not m:
        tokenizer_vocab_size(spec)  # raises the ConfigError listing the valid specs
    if m and m.group("v") and int(m.group("v")) <= len(SPECIAL_TOKENS):
        raise ConfigError(f"tokenizer '{spec}': vocabulary {m.group('v')} is not larger than the "
                          f"{len(SPECIAL_TOKENS)} special tokens; use e.g. bpe4096")


def _needs_training(spec: str) -> bool:
    return not spec.startswith("kmer") and checkpoint_run(spec) is None


def _batches(records: Iterator[Any]) -> Iterator[list[Any]]:
    batch: list[Any] = []
    size = 0
    for rec in records:
        batch.append(rec)
        size += len(rec.seq)
        if size >= BATCH_SYMBOLS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class _Appender:
    """Append to a 1-D Zarr array whole chunks at a time (no read-modify-write of chunks)."""

    def __init__(self, array: Any, dtype: str) -> None:
        self.array, self.dtype = array, dtype
        self.chunk = int(array.chunks[0])
        self.parts: list[np.ndarray] = []
        self.buffered = 0
        self.written = 0

    def add(self, data: np.ndarray) -> None:
        self.parts.append(data.astype(self.dtype, copy=False))
        self.buffered += len(data)
        if self.buffered >= self.chunk:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        data = np.concatenate(self.parts) if self.parts else np.zeros(0, self.dtype)
        n = len(data) if final else (len(data) // self.chunk) * self.chunk
        if n:
            self.array.resize((self.written + n,))
            self.array[self.written:self.written + n] = data[:n]
            self.written += n
        self.parts = [data[n:]] if n < len(data) else []
        self.buffered = len(data) - n

    def close(self) -> int:
        self._flush(final=True)
        return self.written


def _profile_records(offsets: np.ndarray, split: np.ndarray, max_tokens: int | None) -> np.ndarray:
    """Training records the entropy profile reads: in order, until ``max_tokens`` is reached."""
    idx = np.flatnonzero(split == TRAIN)
    if max_tokens is not None:
        cum = np.cumsum(offsets[idx + 1] - offsets[idx])
        idx = idx[: int(np.searchsorted(cum, max_tokens)) + 1]
    return idx


def _read_records(tokens: Any, offsets: np.ndarray, which: np.ndarray) -> Iterator[np.ndarray]:
    """Tokens of records ``which`` (ascending), read back from the Zarr array block by block."""
    block = max(int(tokens.chunks[0]), 1)
    lo = hi = 0
    buf = np.zeros(0, dtype=np.int64)
    for r in which:
        a, b = int(offsets[r]), int(offsets[r + 1])
        if a < lo or b > hi:
            lo, hi = a, min(max(b, a + block), int(offsets[-1]))
            buf = np.asarray(tokens[lo:hi])
        yield buf[a - lo:b - lo]


# --------------------------------------------------------------------------- prepare


def _clean_stale(parent: Path, key: str) -> None:
    """Remove temporary folders of this unit left by prepares that died on this host."""
    host = socket.gethostname()
    for tmp in parent.glob(f".{key}.tmp-*"):
        rest = tmp.name[len(f".{key}.tmp-"):]
        h, _, tail = rest.rpartition("-")[0].rpartition("-")
        pid = tail
        if h != host or not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            log.info("removing %s left by a prepare that died", tmp)
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:
            pass


def prepare_unit(study: StudyConfig, corpus: str, tokenizer: str, *, masks_only: bool = False) -> Path:
    """Build ``tokens/<corpus>--<tokenizer>/`` (replacing an existing one) and return it.

    With ``masks_only`` the token store and tokenizer already there are kept and only the
    evaluation masks of the current settings are built beside them (the caller has
    checked that nothing else the unit reads changed: :func:`toolkit.units.masks_only`).

    Raises
    ------
    ConfigError
        Invalid tokenizer spec (e.g. a BPE vocabulary not larger than the specials).
    CorpusError
        The corpus cannot be read.
    StoreError
        The output folder cannot be written.
    """
    from toolkit.corpora import open_corpus
    from toolkit.masks import write_masks

    _check_spec(tokenizer)
    layout = Layout(study)
    final = layout.tokens_dir(corpus, tokenizer)
    key = token_key(corpus, tokenizer)
    if masks_only:
        log.info("prepare %s: the token store and tokenizer are current; building only the "
                 "evaluation masks", key)
        try:
            path = write_masks(study, corpus, tokenizer)
        except OSError as e:
            store.raise_if_no_space(e, final)
            raise
        log.info("prepare %s: done -> %s", key, path)
        return final
    parent = final.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{parent}: cannot create the token folder ({e.strerror}); "
                         "choose a writable output_dir (--out)") from e
    if not os.access(parent, os.W_OK):
        raise StoreError(f"{parent}: folder is not writable; choose a writable output_dir (--out)")
    _clean_stale(parent, key)
    src = open_corpus(corpus, study)
    tmp = parent / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _build_unit(study, corpus, tokenizer, src, tmp)
        write_masks(study, corpus, tokenizer, tmp, verify="size")  # tokens.zarr was just written
        write_json_atomic(Layout.prepare_marker_in(tmp), {
            "unit": f"prepare:{key}", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "host": socket.gethostname(), "tokenizer_hash": _read_hash(tmp)})
        store.replace_folder(tmp, final)
    except OSError as e:
        store.raise_if_no_space(e, final)  # a full disk is one line naming the mount, not a traceback
        raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("prepare %s: done -> %s", key, final)
    return final


def _read_hash(folder: Path) -> str:
    import hashlib

    return hashlib.sha256(Layout.tokenizer_file_in(folder).read_bytes()).hexdigest()


def _build_unit(study: StudyConfig, name: str, spec: str, src: Any, out: Path) -> None:
    """Write tokenizer.json and tokens.zarr of one unit into the (temporary) folder ``out``."""
    from toolkit import __version__

    cfg = study.corpora[name]
    what = f"prepare {token_key(name, spec)}"
    ckpt_run = checkpoint_run(spec)
    if ckpt_run is not None:
        tok, split = _checkpoint_tokenizer(study, ckpt_run), None
        vocab_size = _checkpoint_vocab_size(study, ckpt_run, tok)
        specials: dict[str, Any] = {"special_tokens": dict(tok.special_tokens),
                                    "special_ids": list(tok.special_ids)}
    else:
        tok, split = _make_tokenizer(spec, src, cfg, what)
        vocab_size = tok.vocab_size
        specials = {"special_tokens": dict(SPECIAL_TOKENS)}
    tok.save(Layout.tokenizer_file_in(out))
    attrs = {
        "corpus": name, "source": cfg.source, "kind": src.kind, "tokenizer": spec,
        "tokenizer_hash": tok.hash, "vocab_size": vocab_size, **specials,
        "provenance": src.provenance(), "toolkit_version": __version__,
    }
    with store.writing(Layout.tokens_store_in(out), "tokens", attrs) as group:
        keep_mask = src.kind == "dna" and cfg.dna.keep_softmask
        counts, record_symbols, sample = _write_tokens(group, tok, src, keep_mask, what,
                                                       len(split) if split is not None else None)
        texts = token_texts(tok, vocab_size)
        store.create_array(group, "tokens", "token_text", data=texts)
        n_rec = len(counts)
        if split is None:
            from toolkit.corpora import split_assignment

            split = split_assignment(n_rec, cfg)
        elif len(split) != n_rec:
            raise StoreError(f"corpus {name}: {n_rec} records on the encoding pass but {len(split)} "
                             "on the counting pass; the source changed while it was read")
        offsets = np.zeros(n_rec + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        store.create_array(group, "tokens", "offsets", data=offsets)
        store.create_array(group, "tokens", "split", data=split)
        store.create_array(group, "tokens", "record_symbols", data=record_symbols)
        group.attrs.update({
            "split": {"method": cfg.split, "seed": cfg.split_seed,
                      "train_records": int((split == TRAIN).sum()),
                      "eval_records": int((split == EVAL).sum()),
                      "requested_train_records": cfg.train_records,
                      "requested_eval_records": cfg.eval_records},
            "n_records": n_rec, "n_tokens": int(offsets[-1]), "n_symbols": int(record_symbols.sum()),
        })
        raw = ("" if src.kind == "dna" else "\n").join(s for i, s in sample if split[i] == TRAIN)
        which = _profile_records(offsets, split, study.analysis.entropy_max_tokens)
        from toolkit.entropy import entropy_profile
        from toolkit.entropy.rate import rate_view

        rate_split, rate_spt = rate_view(spec, [str(t) for t in texts])
        profile = entropy_profile(
            _read_records(group["tokens"], offsets, which),
            n_symbols=int(record_symbols[which].sum()), vocab_size=vocab_size,
            orders=study.analysis.entropy_orders,
            raw_sample=raw.encode("utf-8"), raw_sample_symbols=len(raw),
            analytic_entropy_rate=src.analytic_entropy_rate, max_tokens=study.analysis.entropy_max_tokens,
            rate_split_ids=rate_split, rate_symbols_per_token=rate_spt,
            rate_symbol_records=[s for i, s in sample if split[i] == TRAIN])
        group.attrs["entropy_profile"] = {"corpus": name, "source": cfg.source, "kind": src.kind,
                                          "tokenizer": spec, "split": "train", **profile}


def _checkpoint_tokenizer(study: StudyConfig, run: str) -> Any:
    """The tokenizer shared by every checkpoint of ``run``; a run mixing two is refused."""
    from toolkit.tokenizers import load_checkpoint_tokenizer

    if run not in study.runs or not study.runs[run].checkpoints:
        raise ConfigError(f"tokenizer 'checkpoint-{run}': no run '{run}' with checkpoints in this study; "
                          "give runs.<name>.checkpoints with tokenizer = \"checkpoint\"")
    folders = [study.resolve_path(f) for f in study.runs[run].checkpoints]
    first = load_checkpoint_tokenizer(folders[0])
    for folder in folders[1:]:
        other = load_checkpoint_tokenizer(folder)
        if other.hash != first.hash:
            raise ConfigError(
                f"runs.{run}.checkpoints: {folder} has another tokenizer than {folders[0]} (identity "
                f"{other.hash[:12]} vs {first.hash[:12]}, vocabularies {other.vocab_size} and "
                f"{first.vocab_size}); the members of a run must share one tokenizer, so put "
                "these checkpoints in separate runs")
    log.info("run %s: tokenizer %r of its %d checkpoints", run, first, len(folders))
    return first


def _checkpoint_vocab_size(study: StudyConfig, run: str, tok: Any) -> int:
    """The width of the checkpoints' output layer (``config.json`` vocab_size).

    It may exceed the tokenizer's ids (vocabularies padded to a multiple of 8 or 64): the
    extra rows are ids no record contains, like the ``[unusedN]`` entries of a padded BPE.
    """
    import json

    folder = study.resolve_path(study.runs[run].checkpoints[0])
    try:
        width = int(json.loads((folder / "config.json").read_text(encoding="utf-8"))["vocab_size"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{folder / 'config.json'}: no readable vocab_size ({e}); give a "
                          "save_pretrained checkpoint folder") from e
    if width < tok.vocab_size:
        raise ConfigError(f"{folder}: the model's vocabulary ({width}) is smaller than its tokenizer's "
                          f"({tok.vocab_size}); the checkpoint and its tokenizer do not belong together")
    return width


def _make_tokenizer(spec: str, src: Any, cfg: Any, what: str) -> tuple[Any, np.ndarray | None]:
    """The unit's tokenizer and, for trainable ones, the split (needed first to train on it)."""
    from toolkit.corpora import split_assignment
    from toolkit.tokenizers import build_tokenizer

    if not _needs_training(spec):
        return build_tokenizer(spec, src.kind), None
    # The split depends on the number of records: count them first.
    progress = LogProgress(desc=f"{what}: counting records", unit="records", every_s=LOG_EVERY_S,
                           logger=log)
    n = 0
    for _ in src.records():
        n += 1
        if n % 4096 == 0:
            progress.moveto(n)
    progress.moveto(n)
    progress.close()
    split = split_assignment(n, cfg)
    chosen = tokenizer_sample(split, cfg.tokenizer_train_records)
    log.info("%s: %d records; training the %s tokenizer on %d of the %d training records", what, n, spec,
             int(chosen.sum()), int((split == TRAIN).sum()))
    texts = (r.seq for i, r in enumerate(src.records()) if i < n and chosen[i])
    return build_tokenizer(spec, src.kind, texts), split


def tokenizer_sample(split: np.ndarray, limit: int | None) -> np.ndarray:
    """Which records a trainable tokenizer learns from: the training split, thinned to at
    most ``limit`` records evenly spaced over it (deterministic; None keeps them all)."""
    train = np.flatnonzero(split == TRAIN)
    if limit is not None and len(train) > limit:
        train = train[np.linspace(0, len(train) - 1, limit).round().astype(np.int64)]
    chosen = np.zeros(len(split), dtype=bool)
    chosen[train] = True
    return chosen


def token_texts(tok: Any, vocab_size: int) -> np.ndarray:
    """The vocabulary entry of every id below ``vocab_size`` ('' for ids the tokenizer lacks)."""
    if hasattr(tok, "id_to_token"):  # the toolkit's tokenizers
        names = tok.id_to_token()
    else:  # a checkpoint's HuggingFace tokenizer
        names = [""] * vocab_size
        for text, i in tok.hf.get_vocab().items():
            if 0 <= int(i) < vocab_size:
                names[int(i)] = str(text)
    names = list(names[:vocab_size]) + [""] * max(0, vocab_size - len(names))
    return np.asarray(names, dtype=str)


def spans_follow_from_ids(spec: str) -> bool:
    """Whether a tokenizer's token spans follow from its ids alone (``char``, ``kmer<k>``,
    ``kmer<k>-overlap``: :func:`toolkit.results.token_source`); for the others (``bpe<V>``,
    a checkpoint's tokenizer) prepare stores every token's span (``token_start``, ``token_end``)."""
    return spec == "char" or spec.startswith("kmer")


def _write_tokens(group: Any, tok: Any, src: Any, keep_mask: bool, what: str,
                  total: int | None) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str]]]:
    """Stream the corpus into the ``tokens`` (and ``softmasked``, ``token_start``/``token_end``)
    arrays and each record's source name and coordinates (``record_*``).

    Returns tokens per record, symbols per record and the first records' text
    (about RAW_SAMPLE_SYMBOLS symbols, with their indices) for the compression estimate.
    """
    from toolkit import store

    dtype = "uint16" if tok.vocab_size <= 1 << 16 else "int32"
    chunk = int(store.schema("tokens")["arrays"]["tokens"]["chunks"][0])
    rec_chunk = int(store.schema("tokens")["arrays"]["record_name"]["chunks"][0])

    def token_array(name: str, dt: str) -> _Appender:
        return _Appender(store.create_array(group, "tokens", name, shape=(0,), dtype=dt,
                                            chunks=(chunk,)), dt)

    tokens = token_array("tokens", dtype)
    masks = token_array("softmasked", "uint8") if keep_mask else None
    # Spans not implied by the ids (bpe, a checkpoint's tokenizer): stored, so that every
    # token maps back to its characters (and through record_start to the source record).
    # A slow (Python) HuggingFace tokenizer gives no spans: its tokens then have none stored.
    has_spans = getattr(getattr(tok, "hf", None), "is_fast", True)
    spans = (None if spans_follow_from_ids(str(getattr(tok, "spec", ""))) or not has_spans
             else (token_array("token_start", "int32"), token_array("token_end", "int32")))
    names = _Appender(store.create_array(group, "tokens", "record_name", shape=(0,),
                                         chunks=(rec_chunk,)), "str")
    counts: list[np.ndarray] = []
    symbols: list[np.ndarray] = []
    starts: list[np.ndarray] = []
    sample: list[tuple[int, str]] = []
    sample_size = n_rec = n_tok = 0
    progress = LogProgress(desc=what, total=total, unit="records", every_s=LOG_EVERY_S, logger=log)
    for batch in _batches(src.records()):
        seqs = [r.seq for r in batch]
        if masks is None and spans is None:
            ids, cnt = tok.encode_flat(seqs)
        else:
            ids, cnt, flags, (t0, t1) = _encode_with_spans(tok, batch)
            if masks is not None:
                masks.add(flags)
            if spans is not None:
                spans[0].add(t0)
                spans[1].add(t1)
        tokens.add(ids)
        counts.append(cnt)
        symbols.append(np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs)))
        starts.append(np.fromiter((r.start for r in batch), dtype=np.int64, count=len(batch)))
        names.add(np.asarray([r.source_name for r in batch], dtype=str))
        for s in seqs:
            if sample_size < RAW_SAMPLE_SYMBOLS:
                sample.append((n_rec, s))
                sample_size += len(s)
            n_rec += 1
        n_tok += len(ids)
        progress.moveto(n_rec, counts={"tokens": n_tok})
    progress.close()
    written = tokens.close()
    for extra in (masks, *(spans or ())):
        if extra is not None:
            assert extra.close() == n_tok, (extra.array.name, n_tok)
    assert names.close() == n_rec, n_rec
    assert written == n_tok, (written, n_tok)
    empty = np.zeros(0, dtype=np.int64)
    record_symbols = np.concatenate(symbols) if symbols else empty
    record_start = np.concatenate(starts) if starts else empty
    store.create_array(group, "tokens", "record_start", data=record_start)
    store.create_array(group, "tokens", "record_end", data=record_start + record_symbols)
    return np.concatenate(counts) if counts else empty, record_symbols, sample


def _encode_with_spans(tok: Any, batch: list[Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray,
                                                           tuple[np.ndarray, np.ndarray]]:
    """Ids, tokens per record, per token 1 if any of its bases was soft-masked, and each
    token's span ``seq[start:end]`` in its record."""
    ids_all, counts, flags, span0, span1 = [], [], [], [], []
    for rec in batch:
        ids, starts, ends = tok.encode_spans(rec.seq)
        mask = rec.softmask if rec.softmask is not None else np.zeros(len(rec.seq), dtype=bool)
        cum = np.zeros(len(mask) + 1, dtype=np.int64)
        np.cumsum(mask, out=cum[1:])
        flags.append((cum[ends] > cum[starts]).astype(np.uint8))
        ids_all.append(ids)
        counts.append(len(ids))
        span0.append(np.asarray(starts, dtype=np.int32))
        span1.append(np.asarray(ends, dtype=np.int32))

    def cat(parts: list[np.ndarray], dtype: Any) -> np.ndarray:
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    return (cat(ids_all, np.int32), np.asarray(counts, dtype=np.int64), cat(flags, np.uint8),
            (cat(span0, np.int32), cat(span1, np.int32)))


# --------------------------------------------------------------------------- corpus-stats


def corpus_stats(source: str, *, tokenizer: str = "char", kind: str = "auto",
                 max_records: int | None = None, orders: int = 4) -> dict[str, Any]:
    """The entropy profile of any corpus source (``toolkit corpus-stats``).

    Every record read counts (no split); ``char`` and ``bpe<V>`` are trained on them.
    Without ``max_records`` reading stops after about 4 M symbols, so builtins print
    in seconds.

    Parameters
    ----------
    source
        A file, folder, glob, ``builtin:NAME`` or ``synthetic:markov``.
    tokenizer
        ``char``, ``kmer<k>``, ``kmer<k>-overlap`` or ``bpe<V>``.
    kind
        ``auto``, ``dna`` or ``text``.
    max_records
        Read at most this many records.
    orders
        Conditional entropies for 1..orders tokens of context.

    Returns
    -------
    dict
        The profile of :func:`toolkit.entropy.entropy_profile`, plus ``source``,
        ``kind`` and ``tokenizer``.
    """
    from toolkit.corpora import open_source
    from toolkit.entropy import entropy_profile
    from toolkit.tokenizers import build_tokenizer

    _check_spec(tokenizer)
    if orders < 0:
        raise ConfigError(f"--orders {orders}: must be 0 or more")
    src = open_source(source, kind=kind, max_records=max_records)
    seqs: list[str] = []
    size = 0
    for rec in src.records():
        seqs.append(rec.seq)
        size += len(rec.seq)
        if max_records is None and size >= STATS_SYMBOLS:
            log.info("corpus-stats: stopping after %d records (%d symbols); --max-records reads more",
                     len(seqs), size)
            break
    tok = build_tokenizer(tokenizer, src.kind, seqs if _needs_training(tokenizer) else None)
    ids, counts = tok.encode_flat(seqs)
    records = np.split(ids, np.cumsum(counts)[:-1]) if len(seqs) else []
    raw, raw_size = [], 0
    for s in seqs:
        if raw_size >= RAW_SAMPLE_SYMBOLS:
            break
        raw.append(s)
        raw_size += len(s)
    raw_text = ("" if src.kind == "dna" else "\n").join(raw)
    from toolkit.entropy.rate import rate_view

    rate_split, rate_spt = rate_view(tok.spec, [str(t) for t in token_texts(tok, tok.vocab_size)])
    profile = entropy_profile(records, n_symbols=size, vocab_size=tok.vocab_size, orders=orders,
                              raw_sample=raw_text.encode("utf-8"), raw_sample_symbols=len(raw_text),
                              analytic_entropy_rate=src.analytic_entropy_rate,
                              rate_split_ids=rate_split, rate_symbols_per_token=rate_spt,
                              rate_symbol_records=raw)
    return {"source": source, "kind": src.kind, "tokenizer": tok.spec, **profile}


def _width(profile: dict[str, Any]) -> float | None:
    low, high = profile.get("entropy_rate_low"), profile.get("entropy_rate_high")
    return None if low is None or high is None else high - low


def format_profile(profile: dict[str, Any]) -> str:
    """A readable table of an entropy profile (``corpus-stats`` without ``--json``)."""

    def f(x: Any, fmt: str = ".4f") -> str:
        return "-" if x is None else format(x, fmt)

    head = [
        f"corpus      {profile.get('source', profile.get('corpus', '?'))} ({profile.get('kind', '?')}), "
        f"tokenizer {profile.get('tokenizer', '?')}, vocabulary {profile['vocab_size']} "
        f"({profile.get('vocab_used', '?')} used)",
        f"records     {profile.get('records', '?')}, symbols {profile['symbols']}, tokens "
        f"{profile['tokens_total']} ({profile['tokens']} used for estimates), "
        f"{f(profile['symbols_per_token'], '.3f')} symbols/token",
        f"unigram     {f(profile['unigram_bits'])} bits/token, "
        f"{f(profile['unigram_bits_per_symbol'])} bits/symbol",
        f"lzma -9     {f(profile['compression_bits_per_symbol'])} bits/symbol "
        f"(sample of {profile.get('compression_sample_symbols', 0)} symbols)",
        f"analytic    {f(profile['analytic_entropy_rate_bits_per_symbol'])} bits/symbol",
        f"rate        {f(profile.get('entropy_rate_bits_per_symbol'))} bits/symbol, interval "
        f"[{f(profile.get('entropy_rate_low'))}, {f(profile.get('entropy_rate_high'))}] "
        f"(width {f(_width(profile))}; on {profile.get('entropy_rate_tokens') or 0} tokens)",
        f"            {profile.get('entropy_rate_method') or 'not estimated'}",
        f"PPMd        {f(profile.get('entropy_rate_ppmd_bits_per_symbol'))} bits/symbol; held-out "
        f"order-{profile.get('entropy_rate_heldout_order', '-')} model "
        f"{f(profile.get('entropy_rate_heldout_bits_per_symbol'))} bits/symbol",
        "",
        "  j  H(X|j prev) bits/token  plug-in  bits/symbol  contexts   tokens/context",
    ]
    rows = []
    n = len(profile["conditional_bits"])
    for j, (mm, pi, ps, ctx, cov, ok) in enumerate(zip(
            profile["conditional_bits"], profile["conditional_bits_plugin"],
            profile.get("conditional_bits_per_symbol", [None] * n),
            profile["contexts_seen"], profile["context_coverage"],
            profile.get("conditional_reliable", [True] * n), strict=True), 1):
        warn = "" if ok else "  <- too few tokens per context for this vocabulary: biased low"
        rows.append(f"{j:3d}  {f(mm):>22}  {f(pi):>7}  {f(ps):>11}  {ctx:>8}  {f(cov, '>14.1f')}{warn}")
    return "\n".join(head + rows)
