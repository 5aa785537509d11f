"""The :class:`Tokenizer` base class and the helpers every tokenizer shares.

Every tokenizer shares the five special tokens of :mod:`toolkit.sequences`
(``[PAD]=0 [UNK]=1 [CLS]=2 [SEP]=3 [MASK]=4``); :meth:`Tokenizer.encode` returns ids
WITHOUT specials (``[CLS]``/``[SEP]`` are added when sequences are built), although
``[UNK]`` can appear. The vocabulary and rules of each spec are described in its module:
:mod:`toolkit.tokenizers.char`, :mod:`toolkit.tokenizers.kmer`,
:mod:`toolkit.tokenizers.bpe`.

The :attr:`Tokenizer.hash` is the sha256 of the saved ``tokenizer.json`` bytes and is
recorded in every downstream store. ``tokenizer.json`` is a regular HuggingFace
tokenizer file (WordLevel or BPE model) and gives the same ids (except the
``kmer<k>-overlap`` caveat in :mod:`toolkit.tokenizers.kmer`);
:func:`toolkit.tokenizers.load_tokenizer` recognises the spec from its structure.

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
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import StoreError
from toolkit.sequences import CLS, SEP, SPECIAL_TOKENS

BASES = "ACGTN"
"""The symbols every DNA vocabulary holds as single tokens (``char`` and the k-mers)."""


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
