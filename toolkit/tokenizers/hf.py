"""The tokenizer of an external checkpoint (``tokenizer = "checkpoint"``).

A run that adopts published masked LMs (BERT, DNABERT, RoBERTa, ESM / Nucleotide
Transformer, ...) must feed them the ids of their own tokenizer. This module loads it
from the checkpoint folder with ``AutoTokenizer.from_pretrained`` (local files only: the
toolkit never reaches a model hub), encodes records with it, and gives it an identity.

Identity
    :func:`tokenizer_identity` is a canonical JSON document of everything that decides
    the ids: the tokenizer class, the full vocabulary (token -> id), the ids of the
    special roles, every special id and, for fast tokenizers, the serialised backend
    (normaliser, pre-tokenizer, model with its merges, added tokens). Its sha256 is the
    token store's ``tokenizer_hash``: two checkpoints share a tokenizer exactly when the
    hashes agree, whatever their file layout (a vocabulary of the same size with other
    ids is another tokenizer).

Special roles
    The token store records the ids of the five roles the toolkit uses under the same
    names as its own specials (``[PAD] [UNK] [CLS] [SEP] [MASK]``): ``[CLS]`` is the
    tokenizer's ``cls_token`` (else ``bos_token``), ``[SEP]`` its ``sep_token`` (else
    ``eos_token``), so a sequence is framed as the checkpoint's own tokenizer frames one
    sequence (BERT ``[CLS] .. [SEP]``, RoBERTa ``<s> .. </s>``, ESM ``<cls> .. <eos>``).
    ``[UNK]`` may be absent (-1). Every id the tokenizer calls special
    (``all_special_ids``) is never masked for evaluation.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from toolkit.errors import ConfigError, CorpusError

if TYPE_CHECKING:
    from toolkit.tokenizers.base import Tokenizer

log = logging.getLogger(__name__)

# Files of a checkpoint folder that hold weights, not the tokenizer (every other file is
# read by AutoTokenizer or may steer it, config.json included).
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt", ".onnx")
_NOT_TOKENIZER = ("checksums.json", "generation_config.json")
ROLES = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
# Any of these makes AutoTokenizer find a tokenizer in a folder (fast, WordPiece, BPE,
# SentencePiece layouts).
_TOKENIZER_MARKS = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json",
                    "tokenizer.model", "spiece.model", "sentencepiece.bpe.model")


def tokenizer_files(folder: Path, field: str) -> list[Path]:
    """The files of a checkpoint folder that define its tokenizer (all but the weights).

    Raises
    ------
    CorpusError
        ``folder`` is not a folder (``field`` names the setting that gave it).
    """
    if not folder.is_dir():
        raise CorpusError(f"{field}: {folder} is not a folder; give a save_pretrained folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(_WEIGHT_SUFFIXES) and p.name not in _NOT_TOKENIZER)


def has_tokenizer(folder: Path) -> bool:
    """Whether a checkpoint folder holds a tokenizer's files (``save_pretrained`` of one)."""
    return any((folder / name).is_file() for name in _TOKENIZER_MARKS)


def exported_identity(tokenizer: Tokenizer, model_max_length: int = 512) -> str:
    """The :attr:`CheckpointTokenizer.hash` that a folder exported with ``tokenizer``
    (:meth:`~toolkit.tokenizers.base.Tokenizer.save_pretrained`) has when loaded back.

    Comparing it with a checkpoint's own hash tells whether the checkpoint reads exactly
    the ids of a toolkit tokenizer (identity, not vocabulary size).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="toolkit-tokenizer-") as tmp:
        tokenizer.save_pretrained(tmp, model_max_length=model_max_length)
        return load_checkpoint_tokenizer(Path(tmp)).hash


def load_checkpoint_tokenizer(folder: Path) -> CheckpointTokenizer:
    """``AutoTokenizer.from_pretrained(folder)`` from local files only, wrapped.

    Raises
    ------
    ConfigError
        No loadable tokenizer in the folder, or one without a mask or padding token.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing below may try the hub
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        hf = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        why = " ".join(str(e).split())[:200]
        raise ConfigError(f"{folder}: no tokenizer can be loaded from this checkpoint folder ({why}); "
                          "save it next to the model with tokenizer.save_pretrained, or use a "
                          "toolkit tokenizer (kmer6, bpe4096, ...)") from e
    return CheckpointTokenizer(hf, folder)


class CheckpointTokenizer:
    """A HuggingFace tokenizer with the interface of :class:`toolkit.tokenizers.base.Tokenizer`.

    Attributes
    ----------
    spec
        ``checkpoint``.
    vocab_size
        ``len(tokenizer)``: every id it can produce is below it.
    hash
        sha256 of :attr:`identity_json` (the bytes saved as ``tokenizer.json``).
    special_tokens
        Role (``[PAD]`` ...) -> id (-1 when the tokenizer has no such token).
    special_ids
        Every id the tokenizer calls special, sorted.
    """

    spec = "checkpoint"

    def __init__(self, hf: Any, folder: Path) -> None:
        self.hf, self.folder = hf, folder

        def tid(*names: str) -> int:
            for name in names:
                value = getattr(hf, f"{name}_token_id", None)
                if isinstance(value, int):
                    return value
            return -1

        self.special_tokens = {"[PAD]": tid("pad"), "[UNK]": tid("unk"), "[CLS]": tid("cls", "bos"),
                               "[SEP]": tid("sep", "eos"), "[MASK]": tid("mask")}
        lacking = [r for r in ROLES if r != "[UNK]" and self.special_tokens[r] < 0]
        if lacking:
            raise ConfigError(f"{folder}: the checkpoint's tokenizer has no {' / '.join(lacking)} token "
                              "(masked-LM evaluation needs mask, padding, start and end tokens); "
                              "set them in its tokenizer_config.json")
        self.special_ids = sorted({int(i) for i in hf.all_special_ids}
                                  | {i for i in self.special_tokens.values() if i >= 0})
        self.vocab_size = len(hf)
        self.identity_json = tokenizer_identity(hf, self.special_tokens, self.special_ids)
        self.hash = hashlib.sha256(self.identity_json.encode("utf-8")).hexdigest()

    def encode_flat(self, seqs: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """All records' ids concatenated (int32) and the number of tokens of each (int64)."""
        if not seqs:
            return np.zeros(0, np.int32), np.zeros(0, np.int64)
        # verbose=False: records longer than model_max_length are fine here (sequences are
        # cut later), the warning would only repeat for every batch.
        enc = self.hf(list(seqs), add_special_tokens=False, verbose=False,
                      return_attention_mask=False, return_token_type_ids=False)["input_ids"]
        counts = np.fromiter((len(e) for e in enc), dtype=np.int64, count=len(enc))
        ids = np.fromiter((i for e in enc for i in e), dtype=np.int32, count=int(counts.sum()))
        return ids, counts

    def encode(self, seq: str) -> np.ndarray:
        """Token ids of one record (no specials), int32."""
        return self.encode_flat([seq])[0]

    def encode_spans(self, seq: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ids of one record and the character span of each token (fast tokenizers only)."""
        if not getattr(self.hf, "is_fast", False):
            raise ConfigError(f"{self.folder}: a {type(self.hf).__name__} gives no character offsets, "
                              "so soft-masked bases cannot be traced to tokens; set "
                              "corpora.<name>.dna.keep_softmask = false for this run's corpus")
        enc = self.hf(seq, add_special_tokens=False, verbose=False, return_offsets_mapping=True)
        offs = np.asarray(enc["offset_mapping"], dtype=np.int64).reshape(-1, 2)
        return np.asarray(enc["input_ids"], dtype=np.int32), offs[:, 0], offs[:, 1]

    def save(self, path: Path) -> None:
        """Write the identity document (its sha256 is :attr:`hash`)."""
        path.write_text(self.identity_json, encoding="utf-8")

    def __repr__(self) -> str:
        return f"CheckpointTokenizer({self.folder}, vocab_size={self.vocab_size}, hash={self.hash[:12]})"


def tokenizer_identity(hf: Any, special_tokens: dict[str, int], special_ids: list[int]) -> str:
    """Canonical JSON of what decides a tokenizer's ids (see the module docstring)."""
    doc: dict[str, Any] = {
        "format": "toolkit checkpoint tokenizer identity 1",
        "class": type(hf).__name__,
        "vocab": sorted((str(t), int(i)) for t, i in hf.get_vocab().items()),
        "special_tokens": special_tokens,
        "special_ids": special_ids,
    }
    if getattr(hf, "is_fast", False):
        doc["backend"] = json.loads(hf.backend_tokenizer.to_str())
    else:
        # Slow tokenizers: their vocabulary plus the scalar settings they were built with
        # (lower-casing, splitting rules); file paths are left out (they name the folder).
        doc["settings"] = {k: v for k, v in sorted(hf.init_kwargs.items())
                           if isinstance(v, bool | int | float | str) and not k.endswith("_file")
                           and k not in ("name_or_path", "_commit_hash", "model_max_length")}
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
