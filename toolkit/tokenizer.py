"""Tokenizers: ``char``, ``kmer<k>``, ``kmer<k>-overlap`` and ``bpe<V>``.

Every tokenizer shares the five special tokens of :mod:`toolkit.sequences`
(``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``); :meth:`Tokenizer.encode` returns ids
WITHOUT specials (``[CLS]``/``[SEP]`` are added when sequences are built), although
``[UNK]`` can appear.

Vocabularies and rules
----------------------
``kmer<k>`` (paper's 6-mer tokenizer)
    ids 0..4 specials, 5..9 the single bases ``A C G T N``, then the ``4**k`` k-mers in
    lexicographic order (``AA..A`` = 10). Scanning left to right, the regex
    ``[ACGT]{k}|.`` decides the tokens: within each maximal ACGT run of length L,
    ``L // k`` k-mers from the run start, then ``L % k`` single bases; every ``N`` is a
    single base and any other character is one ``[UNK]``. Encoding is vectorised
    with numpy, no per-base Python loop: ids without spans (``encode``, ``encode_flat``)
    for k <= 8 hash each k-byte row of the padded records with one multiply and a lookup
    table (about 1 Gbase/s on one core, see ``_ROW_MAGIC`` in :mod:`toolkit.kmer`); spans,
    k > 8 and records holding N or other symbols work per run of ACGT.
``kmer<k>-overlap``
    Same vocabulary. Every window of k symbols (stride 1) is one token, so a record of
    length L gives ``L - k + 1`` tokens; a window that contains anything other than
    ``ACGT`` (e.g. an ``N``) is ``[UNK]``. A record shorter than k falls back to single
    bases. The token store's ``tokenizer.json`` carries the vocabulary, but its
    pre-tokenizer cannot produce overlapping windows: loaded with
    ``tokenizers.Tokenizer.from_file`` it encodes non-overlapping k-mers. Use
    :func:`load_tokenizer`, or the exported tokenizer (:meth:`Tokenizer.to_hf`), whose
    normaliser writes the windows out, for the exact ids.
``char``
    Specials, then the sorted set of characters seen in training (DNA: ``A C G T N``
    always included). Unseen characters map to ``[UNK]``.
``bpe<V>``
    HuggingFace ``tokenizers`` BPE with the Whitespace pre-tokenizer, trained on the
    training split; the vocabulary has exactly V entries including the specials at
    0..4 (a DNA record has no whitespace, so it is one "word", as in the paper). When
    the corpus is too small for V - 5 tokens, the vocabulary is padded with
    unreachable ``[unusedN]`` entries so that model shapes do not depend on the corpus.

The :attr:`Tokenizer.hash` is the sha256 of the saved ``tokenizer.json`` bytes and is
recorded in every downstream store. ``tokenizer.json`` is a regular HuggingFace
tokenizer file (WordLevel or BPE model) and gives the same ids (except the overlap
caveat above); :func:`load_tokenizer` recognises the spec from its structure.

Exported models
---------------
Every model folder a member exports (``best``, ``final``, ``flow/step-*``) also holds the
tokenizer as ``transformers`` loads it (:meth:`Tokenizer.save_pretrained`):
``AutoTokenizer.from_pretrained(folder)`` gives, for every spec, exactly the ids of
:meth:`Tokenizer.encode`, framed as training framed one record (``[CLS] ids [SEP]``; a
pair is ``[CLS] a [SEP] b [SEP]``, as packed records are, all token types 0), and cut to
``model_max_length`` (the model's positions) with ``truncation=True``, as ``truncate``
mode cut records to ``seq_len``. One deliberate difference: the literal text of a
special token (``[MASK]``...) in the input is that special token, as in every
HuggingFace tokenizer (``pipeline("fill-mask")`` depends on it), where the toolkit's
``char`` and ``kmer`` encoders read its characters (``[UNK]`` for DNA); ``bpe<V>``
already treats them as specials in both. See ``docs/methods.md`` and
``tests/test_hf_export.py``.

Modules: this one holds the :class:`Tokenizer` base class, ``char`` and ``bpe<V>``, and
building and loading; :mod:`toolkit.kmer` holds :class:`~toolkit.kmer.KmerTokenizer`
and its vectorised encoders (also importable from here).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np

from toolkit.errors import ConfigError, StoreError
from toolkit.sequences import CLS, SEP, SPECIAL_TOKENS, UNK
from toolkit.tokenizers.spec import MAX_K, N_SPECIALS, TOKENIZER_PATTERN

log = logging.getLogger(__name__)

BASES = "ACGTN"
_KMER_REGEX = "[ACGT]{{{k}}}|(?m:.)"  # Oniguruma: (?m) makes '.' match newlines too
_CHAR_REGEX = "(?m:.)"
_KMER_REGEX_RE = re.compile(r"^\[ACGT\]\{(\d+)\}\|\(\?m:\.\)$")


class Tokenizer:
    """A tokenizer with a fixed vocabulary (specials at 0..4).

    Attributes
    ----------
    spec
        ``char``, ``kmer<k>``, ``kmer<k>-overlap`` or ``bpe<V>``.
    vocab_size
        Number of ids, specials included; every id is below it.
    hash
        sha256 hex digest of the ``tokenizer.json`` bytes that :meth:`save` writes.
    """

    def __init__(self, spec: str, json_text: str) -> None:
        self.spec = spec
        self._json = json_text.encode("utf-8")
        self.hash = hashlib.sha256(self._json).hexdigest()
        vocab = _model_vocab(json.loads(json_text))
        self.vocab_size = len(vocab)
        self._hf: Any = None
        self._names: list[str] | None = None

    # -- encoding -----------------------------------------------------------------
    def encode(self, seq: str) -> np.ndarray:
        """Token ids of one record (no specials), int32, shape (n_tokens,)."""
        ids, _ = self.encode_flat([seq])
        return ids

    def encode_batch(self, seqs: Sequence[str]) -> list[np.ndarray]:
        """:meth:`encode` of every record."""
        ids, counts = self.encode_flat(seqs)
        return np.split(ids, np.cumsum(counts)[:-1]) if len(seqs) else []

    def encode_flat(self, seqs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All records' ids concatenated (int32) and the number of tokens of each (int64)."""
        ids, _, _, counts = self._encode_spans(seqs, spans=False)
        return ids, counts

    def encode_spans(self, seq: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids of one record and, per token, the symbols it covers: ``seq[start:end]``."""
        ids, starts, ends, _ = self._encode_spans([seq])
        return ids, starts, ends

    def symbols_per_token(self, seqs: Sequence[str]) -> float:
        """Mean symbols (bases or characters) per token over ``seqs``."""
        _, counts = self.encode_flat(seqs)
        total = int(counts.sum())
        return sum(len(s) for s in seqs) / total if total else float("nan")

    def _encode_spans(self, seqs: Sequence[str], spans: bool = True) -> tuple[Any, Any, Any, np.ndarray]:
        # -> (ids (T,) int32, token starts (T,) or None, token ends (T,) or None, tokens per record (R,))
        raise NotImplementedError

    # -- vocabulary and files ------------------------------------------------------
    @property
    def hf(self) -> Any:
        """The ``tokenizers.Tokenizer`` of the saved JSON (same ids, except kmer<k>-overlap)."""
        if self._hf is None:
            from tokenizers import Tokenizer as HFTokenizer

            self._hf = HFTokenizer.from_str(self._json.decode("utf-8"))
        return self._hf

    def id_to_token(self) -> list[str]:
        """The token string of every id, in id order (a new list each call)."""
        if self._names is None:
            vocab = _model_vocab(json.loads(self._json))
            self._names = [""] * len(vocab)
            for tok, i in vocab.items():
                self._names[i] = tok
        return list(self._names)

    # -- HuggingFace export -----------------------------------------------------------
    def to_hf(self) -> Any:
        """The ``tokenizers.Tokenizer`` of an exported model folder.

        It encodes a record to exactly the ids of :meth:`encode` (every spec, the overlap
        windows included), framed with ``[CLS]``/``[SEP]`` as training framed it; the five
        specials are declared special tokens at ids 0..4. The token store's
        ``tokenizer.json`` (whose sha256 is :attr:`hash`) is left as it is.

        Returns
        -------
        tokenizers.Tokenizer
            A new object each call.
        """
        from tokenizers import AddedToken, processors

        hf = self._hf_pipeline()
        # Declared special (and so matched in the input text): the fill-mask pipeline
        # finds the mask by its id in the encoded text.
        hf.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _specials()])
        hf.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",  # type ids 0: type_vocab_size 1
            special_tokens=[("[CLS]", CLS), ("[SEP]", SEP)])
        return hf

    def _hf_pipeline(self) -> Any:
        """A ``tokenizers.Tokenizer`` giving :meth:`encode`'s ids (no specials, none declared)."""
        from tokenizers import Tokenizer as HFTokenizer

        return HFTokenizer.from_str(self._json.decode("utf-8"))

    def save_pretrained(self, folder: str | Path, model_max_length: int) -> list[Path]:
        """Write the files ``AutoTokenizer.from_pretrained(folder)`` reads.

        Parameters
        ----------
        folder
            An existing folder (an exported model's).
        model_max_length
            The model's positions (specials included): ``truncation=True`` cuts to it.

        Returns
        -------
        list of Path
            ``tokenizer.json`` (:meth:`to_hf`), ``tokenizer_config.json`` (class
            ``PreTrainedTokenizerFast``, the specials, ``model_max_length``, and this
            tokenizer's spec and :attr:`hash`, which tie it to the token store) and
            ``special_tokens_map.json``.
        """
        folder = Path(folder)
        roles = {"pad_token": "[PAD]", "unk_token": "[UNK]", "cls_token": "[CLS]",
                 "sep_token": "[SEP]", "mask_token": "[MASK]"}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": int(model_max_length),
                  **roles, "clean_up_tokenization_spaces": False,
                  "toolkit_tokenizer": self.spec, "toolkit_tokenizer_hash": self.hash}
        files = [folder / "tokenizer.json", folder / "tokenizer_config.json",
                 folder / "special_tokens_map.json"]
        try:
            self.to_hf().save(str(files[0]), pretty=False)
            files[1].write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
            files[2].write_text(json.dumps(roles, indent=1) + "\n", encoding="utf-8")
        except OSError as e:
            raise StoreError(f"{folder}: cannot write the tokenizer ({e.strerror}); "
                             "choose a writable output folder") from e
        return files

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` (a HuggingFace tokenizer file; its sha256 is :attr:`hash`)."""
        path = Path(path)
        try:
            path.write_bytes(self._json)
        except OSError as e:
            raise StoreError(f"{path}: cannot write the tokenizer ({e.strerror}); "
                             "choose a writable output folder") from e

    def __repr__(self) -> str:
        return f"Tokenizer({self.spec!r}, vocab_size={self.vocab_size}, hash={self.hash[:12]})"


def _record_index(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Start of each record in the concatenation, and the position of every symbol in its record."""
    starts = np.zeros(len(lengths), dtype=np.int64)
    np.cumsum(lengths[:-1], out=starts[1:])
    n = int(lengths.sum())
    pos = np.arange(n, dtype=np.int64) - np.repeat(starts, lengths)
    return starts, pos


# --------------------------------------------------------------------------- char and BPE


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


# --------------------------------------------------------------------------- building


def _specials() -> list[str]:
    return sorted(SPECIAL_TOKENS, key=SPECIAL_TOKENS.__getitem__)


def _word_level_json(vocab: dict[str, int], regex: str, wrap: bool = False) -> str:
    """A HuggingFace WordLevel tokenizer whose pre-tokenizer isolates every regex match."""
    from tokenizers import Regex, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
    # The overlap tokenizer marks itself by wrapping its Split in a Sequence (a no-op
    # for HuggingFace), so load_tokenizer can tell kmer<k> and kmer<k>-overlap apart.
    hf.pre_tokenizer = pre_tokenizers.Sequence([split]) if wrap else split
    # The specials are plain vocabulary entries, not "added tokens": HuggingFace would
    # otherwise match a literal "[UNK]" in a text record as one token, unlike our encoders.
    return hf.to_str()


def _model_vocab(doc: dict[str, Any]) -> dict[str, int]:
    try:
        vocab = doc["model"]["vocab"]
    except (KeyError, TypeError):
        raise StoreError("tokenizer file has no model vocabulary; not a tokenizer.json") from None
    return dict(vocab)


def _kmer_vocab(k: int) -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(_specials())}
    for b in BASES:
        # k = 1: the 1-mers A C G T own those strings; their single-base twins are unreachable.
        vocab[f"[single-{b}]" if k == 1 and b != "N" else b] = len(vocab)
    for t in itertools.product("ACGT", repeat=k):
        vocab["".join(t)] = len(vocab)
    return vocab


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
        if k > MAX_K:
            raise ConfigError(f"tokenizer '{spec}': k = {k} gives 4^{k} tokens; use k <= {MAX_K}")
        overlap = bool(m.group("overlap"))
        text = _word_level_json(_kmer_vocab(k), _KMER_REGEX.format(k=k), wrap=overlap)
        from toolkit.kmer import KmerTokenizer  # here: toolkit.kmer imports this module

        return KmerTokenizer(k, overlap, text)
    if train_texts is None:
        raise ConfigError(f"tokenizer '{spec}' must be trained: give the training texts")
    if spec == "char":
        seen: set[str] = set(BASES) if kind == "dna" else set()
        for t in train_texts:
            seen.update(t)
        vocab = {t: i for i, t in enumerate(_specials())}
        for ch in sorted(seen):
            vocab[ch] = len(vocab)
        return CharTokenizer(_word_level_json(vocab, _CHAR_REGEX))
    return _train_bpe(int(m.group("v")), train_texts)


def _train_bpe(v: int, train_texts: Iterable[str]) -> BpeTokenizer:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    if v <= N_SPECIALS:
        raise ConfigError(f"tokenizer 'bpe{v}': vocabulary {v} is not larger than the "
                          f"{N_SPECIALS} special tokens; use e.g. bpe4096")
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
        from toolkit.kmer import KmerTokenizer  # here: toolkit.kmer imports this module

        return KmerTokenizer(int(km.group(1)), wrapped, text)
    raise StoreError(f"{path}: not a tokenizer written by this toolkit (model {model!r}); "
                     "rebuild it with `toolkit prepare --force`")


# --------------------------------------------------------------------------- k-mer names

# Names of toolkit.kmer also offered here. Resolved on first use, because toolkit.kmer
# subclasses Tokenizer and so imports this module. Patch tunables (_ROW_BLOCK...) on
# toolkit.kmer itself: setting them here changes nothing.
_KMER_NAMES = frozenset({"KmerTokenizer", "_row_lut"})


def __getattr__(name: str) -> Any:
    if name in _KMER_NAMES:
        from toolkit import kmer

        return getattr(kmer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
