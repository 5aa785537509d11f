"""Evaluation masks: the masked inputs every member of a corpus x tokenizer is evaluated on.

Built once per token store and mask settings, at
``tokens/<corpus>--<tokenizer>/masks-<settings digest>.zarr``, from the
evaluation split (``toolkit.sequences``, truncate mode) and deterministically from
``analysis.mask_seed``, so that every member of every run on that token store sees
exactly the same masked inputs (docs/methods.md, "Evaluation inputs": "identical masked positions for every
member"). Three sets (storage_schemas/masks.json):

- ``distribution``: every evaluation sequence, ``distribution_mask_rate`` of its
  maskable positions replaced by [MASK] (paper: 10%);
- ``fisher``: the first ``fisher_records`` sequences, ``fisher_mask_rate`` masked (15%);
- ``contextual``: the first ``contextual_records`` sequences, unmasked.

Maskable positions are real tokens that are not special tokens ([UNK] included: a
model is not asked to predict "unknown"); the special ids and the [MASK] id are the
token store's recorded ones (a checkpoint's tokenizer has its own). Each sequence with
at least one maskable position gets exactly ``max(1, round(rate * n_maskable))`` masked positions, so rates
hold per sequence and no sequence is left without a prediction. Selected positions
become [MASK] only (no 80/10/10 as in training).

The store is a prepare-stage output: the prepare unit of the token store builds it
(:func:`write_masks`, all-or-nothing through :func:`toolkit.store.writing`) under its
own lock, after the token store and tokenizer, and its content digest is the unit's
``masks`` output, which evaluate and measure units read. The file name carries a digest
of the mask settings (:func:`masks_digest`), so a store rebuilt after a change of
``analysis.*`` mask settings appears beside the old one and never replaces a store
another job may still be reading; a prepare unit rerun for a mask setting alone builds
only the masks and leaves the token store as it is (:mod:`toolkit.units`). Evaluate
only opens the store (:func:`open_masks`): a missing one, or one whose attributes
disagree with its name, is refused, never rebuilt or mixed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import store
from toolkit.config import StudyConfig
from toolkit.errors import StoreError
from toolkit.plumbing import IGNORE
from toolkit.sequences import EVAL, MASK, load_sequences, never_masked, special_ids
from toolkit.study import Layout, checkpoint_run, run_tokenizer, token_key
from toolkit.tokenizers.spec import CHECKPOINT_TOKENIZER, N_SPECIALS

log = logging.getLogger(__name__)

_READ_BLOCK = 1024  # sequences materialised at a time while building
# Attributes that decide the content of the store; an existing store must match all of them.
CHECKED_ATTRS = ("tokenizer_hash", "seq_len", "mask_seed", "distribution_mask_rate",
                 "fisher_mask_rate", "eval_records", "fisher_records", "contextual_records")


def mask_settings(study: StudyConfig, corpus: str, tokenizer: str) -> dict[str, Any]:
    """The settings that decide the masks of the token store ``<corpus>--<tokenizer>``."""
    a = study.analysis
    return {
        "corpus": corpus,
        # A run's tokenizer spec ("checkpoint" for a checkpoint's own tokenizer), as recorded
        # when evaluate built the masks: the digests of existing stores stay valid.
        "tokenizer": CHECKPOINT_TOKENIZER if checkpoint_run(tokenizer) is not None else tokenizer,
        "seq_len": study.eval_seq_len,
        "mask_seed": a.mask_seed,
        "distribution_mask_rate": a.distribution_mask_rate,
        "fisher_mask_rate": a.fisher_mask_rate,
        "eval_records": a.eval_records,
        "fisher_records": a.fisher_records,
        "contextual_records": a.contextual_records,
    }


def masks_digest(study: StudyConfig, corpus: str, tokenizer: str) -> str:
    """The digest in the masks store's name: 12 hex digits of sha256 over :func:`mask_settings`."""
    settings = mask_settings(study, corpus, tokenizer)
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def masks_store(study: StudyConfig, corpus: str, tokenizer: str) -> Path:
    """Where the prepare unit ``<corpus>--<tokenizer>`` writes its masks under the current settings."""
    return Layout(study).masks_store(corpus, tokenizer, masks_digest(study, corpus, tokenizer))


def run_token_key(study: StudyConfig, run: str) -> tuple[str, str]:
    """(corpus, tokenizer) of the token store ``run`` reads: its prepare unit's key parts."""
    return study.runs[run].corpus, run_tokenizer(study, run)


def masks_path(study: StudyConfig, run: str) -> Path:
    """Where the evaluation masks of ``run``'s token store live under the current settings."""
    return masks_store(study, *run_token_key(study, run))


def expected_attrs(study: StudyConfig, corpus: str, tokenizer: str,
                   tokens_attrs: dict[str, Any]) -> dict[str, Any]:
    """The root attributes a masks store of the token store ``<corpus>--<tokenizer>``
    (root attributes ``tokens_attrs``) built under the current config has."""
    settings = mask_settings(study, corpus, tokenizer)
    head = {k: settings.pop(k) for k in ("corpus", "tokenizer")}  # the order of earlier stores
    return {**head, "tokenizer_hash": tokens_attrs.get("tokenizer_hash"), **settings}


def select_positions(input_ids: np.ndarray, attention_mask: np.ndarray, rate: float,
                     rng: np.random.Generator, special: np.ndarray | None = None) -> np.ndarray:
    """Choose the masked positions of a block of sequences.

    Parameters
    ----------
    input_ids, attention_mask
        (S, T) unmasked inputs and their padding mask.
    rate
        Fraction of each sequence's maskable positions to mask.
    rng
        Source of randomness; one (S, T) draw is taken from it.
    special
        Ids never masked (the token store's specials, :func:`toolkit.sequences.never_masked`);
        None: the toolkit's own, ids below 5.

    Returns
    -------
    numpy.ndarray
        (S, T) boolean: True where the position is masked. Row i has exactly
        ``max(1, floor(rate * n_i + 0.5))`` True entries, ``n_i`` its maskable
        positions (non-padding, non-special), or none when ``n_i`` is 0.
    """
    is_special = input_ids < N_SPECIALS if special is None else np.isin(input_ids, special)  # (S, T)
    maskable = (attention_mask != 0) & ~is_special  # (S, T)
    n = maskable.sum(axis=1)  # (S,)
    k = np.where(n > 0, np.maximum(1, np.floor(rate * n + 0.5)), 0).astype(np.int64)  # (S,)
    # Random keys, +inf where not maskable: the k smallest keys of a row are a uniform
    # random k-subset of its maskable positions.
    keys = rng.random(input_ids.shape)
    keys[~maskable] = np.inf
    order = np.argsort(keys, axis=1, kind="stable")  # (S, T)
    rank = np.argsort(order, axis=1)  # (S, T) rank of each position's key within its row
    return rank < k[:, None]


def _read_inputs(seqs: Any, count: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, T) int32 input ids and uint8 attention mask of the first ``count`` sequences."""
    ids = np.empty((count, seqs.seq_len), dtype=np.int32)
    att = np.empty((count, seqs.seq_len), dtype=np.uint8)
    for lo in range(0, count, _READ_BLOCK):
        hi = min(count, lo + _READ_BLOCK)
        b_ids, b_att = seqs.batch(np.arange(lo, hi))  # (b, T) int64 each
        ids[lo:hi] = b_ids
        att[lo:hi] = b_att
    return ids, att


def _apply(ids: np.ndarray, chosen: np.ndarray, mask_id: int = MASK) -> tuple[np.ndarray, np.ndarray]:
    """Masked inputs (``mask_id`` where chosen) and labels (-100 where not chosen)."""
    masked = np.where(chosen, mask_id, ids).astype(np.int32)
    labels = np.where(chosen, ids, IGNORE).astype(np.int32)
    return masked, labels


def build_masks(study: StudyConfig, corpus: str, tokenizer: str, tokens: Any, path: Path) -> None:
    """Build the masks store of the token store ``<corpus>--<tokenizer>`` at ``path`` (which
    must not exist) from that open token store, all-or-nothing."""
    a = study.analysis
    seq_len = study.eval_seq_len
    if seq_len < 3:
        raise StoreError(f"analysis.seq_len = {seq_len}: evaluation sequences need room for "
                         "[CLS], one token and [SEP]; use at least 3")
    seqs = load_sequences(tokens, EVAL, seq_len, "truncate", max_records=a.eval_records)
    if len(seqs) == 0:
        raise StoreError(f"{Layout(study).tokens_store(corpus, tokenizer)}: the evaluation split has no "
                         f"non-empty records; raise corpora.{corpus}.eval_records and prepare again")
    t0 = time.perf_counter()
    ids, att = _read_inputs(seqs, len(seqs))  # (S, T)
    n_fisher = min(a.fisher_records, len(seqs))
    n_ctx = min(a.contextual_records, len(seqs))
    # One independent stream per set, so changing one rate never moves the other set's positions.
    dist_rng = np.random.default_rng(np.random.SeedSequence([a.mask_seed, 0]))
    fish_rng = np.random.default_rng(np.random.SeedSequence([a.mask_seed, 1]))
    # The store's own specials: a checkpoint's tokenizer has other ids than the toolkit's 0..4.
    special = never_masked(tokens.attrs)
    mask_id = special_ids(tokens.attrs)["[MASK]"]
    dist_chosen = select_positions(ids, att, a.distribution_mask_rate, dist_rng, special)  # (S, T)
    fish_chosen = select_positions(ids[:n_fisher], att[:n_fisher], a.fisher_mask_rate, fish_rng, special)
    dist_ids, dist_labels = _apply(ids, dist_chosen, mask_id)
    fish_ids, fish_labels = _apply(ids[:n_fisher], fish_chosen, mask_id)
    seq_of, off_of = np.nonzero(dist_chosen)  # row-major: sorted by (sequence, seq_pos)
    attrs = {**expected_attrs(study, corpus, tokenizer, dict(tokens.attrs)), "n_sequences": int(len(seqs)),
             "n_positions": int(seq_of.shape[0]), "n_fisher_sequences": int(n_fisher),
             "n_fisher_masked_tokens": int(fish_chosen.sum()), "n_contextual_sequences": int(n_ctx)}
    with store.writing(path, "masks", attrs) as g:
        store.create_array(g, "masks", "distribution/input_ids", data=dist_ids)
        store.create_array(g, "masks", "distribution/attention_mask", data=att)
        store.create_array(g, "masks", "distribution/labels", data=dist_labels)
        store.create_array(g, "masks", "distribution/record", data=seqs.record_ids.astype(np.int64))
        store.create_array(g, "masks", "distribution/position_sequence", data=seq_of.astype(np.int64))
        store.create_array(g, "masks", "distribution/position_offset", data=off_of.astype(np.int32))
        store.create_array(g, "masks", "fisher/input_ids", data=fish_ids)
        store.create_array(g, "masks", "fisher/attention_mask", data=att[:n_fisher])
        store.create_array(g, "masks", "fisher/labels", data=fish_labels)
        store.create_array(g, "masks", "contextual/input_ids", data=ids[:n_ctx])
        store.create_array(g, "masks", "contextual/attention_mask", data=att[:n_ctx])
    log.info("masks %s: %d sequences, %d distribution positions, %d fisher tokens (%.1f s)",
             token_key(corpus, tokenizer), len(seqs), seq_of.shape[0], int(fish_chosen.sum()), time.perf_counter() - t0)


def _rerun_hint(corpus: str, tokenizer: str) -> str:
    return (f"rerun `toolkit run STUDY` (or `toolkit run STUDY --force prepare:{token_key(corpus, tokenizer)}`) "
            "to build them")


def check_masks(path: Path, expected: dict[str, Any], hint: str = "") -> Any:
    """Open an existing masks store and refuse it unless it was built with ``expected``."""
    # Sizes only: the caller reading the masks (evaluate) checks their bytes when it opens them.
    group = store.open_store(path, "masks", verify="size")
    attrs = dict(group.attrs)
    for key in CHECKED_ATTRS:
        if attrs.get(key) != expected[key]:
            raise StoreError(
                f"{path}: built with {key} = {attrs.get(key)!r}, the study now says "
                f"{expected[key]!r}; {hint or 'rebuild the masks with `toolkit run STUDY --force prepare`'} "
                "(every member's evaluation must then be redone) or restore the old setting")
    return group


def write_masks(study: StudyConfig, corpus: str, tokenizer: str, folder: Path | None = None, *,
                verify: store.Verify = "full") -> Path:
    """Build the evaluation masks of a token store under the current settings (a prepare unit's step).

    Parameters
    ----------
    study
        The study; its ``analysis`` table fixes the sequence length, rates, seed and set sizes.
    corpus, tokenizer
        The prepare unit's key parts: runs sharing a corpus and tokenizer share one masks store.
    folder
        The folder holding ``tokens.zarr``, where the masks are written: the unit's
        ``tokens/<corpus>--<tokenizer>/`` (default) or the temporary folder of a prepare
        that is building everything.
    verify
        How the token store is checked before its bytes are read (``"size"`` for a store
        this process has just written).

    Returns
    -------
    pathlib.Path
        ``<folder>/masks-<settings digest>.zarr``. A store already there that validates and
        was built from this token store with these settings is kept (masks are a
        deterministic function of both); any other is rebuilt.

    Raises
    ------
    StoreError
        The token store is missing or damaged, or its evaluation split is empty.
    """
    folder = Layout(study).tokens_dir(corpus, tokenizer) if folder is None else folder
    tokens_path = Layout.tokens_store_in(folder)
    tokens = store.open_store(tokens_path, "tokens", verify=verify)
    expected = expected_attrs(study, corpus, tokenizer, dict(tokens.attrs))
    path = Layout.masks_store_in(folder, masks_digest(study, corpus, tokenizer))
    key = token_key(corpus, tokenizer)
    if path.exists():
        try:
            store.verify_store(path, "masks", "full")
            check_masks(path, expected)
            log.info("masks %s: kept %s (built from this token store with these settings)", key, path.name)
            return path
        except StoreError as e:
            log.warning("masks %s: existing %s unusable (%s); rebuilding it", key, path.name, e)
            shutil.rmtree(path)
    build_masks(study, corpus, tokenizer, tokens, path)
    return path


def open_masks(study: StudyConfig, run: str) -> Path:
    """The evaluation masks of ``run``'s token store under the current settings, checked.

    The prepare unit builds them; this only finds and checks them.

    Raises
    ------
    StoreError
        No masks store for the current settings (one line: the path and the command that
        builds it), or one whose attributes disagree with the token store or the settings.
    """
    corpus, tokenizer = run_token_key(study, run)
    tokens = store.open_store(Layout(study).tokens_store(corpus, tokenizer), "tokens", verify="size")
    path = masks_store(study, corpus, tokenizer)
    hint = _rerun_hint(corpus, tokenizer)
    if not path.exists():
        raise StoreError(f"{path}: no evaluation masks for the current analysis settings "
                         f"(the prepare unit {token_key(corpus, tokenizer)} builds them); {hint}")
    check_masks(path, expected_attrs(study, corpus, tokenizer, dict(tokens.attrs)), hint)
    return path
