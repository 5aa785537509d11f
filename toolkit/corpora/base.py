"""What every corpus shares: the :class:`Record` it yields, the :class:`Corpus` base
class, and :func:`split_assignment` of records to train / eval.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import numpy as np

from toolkit.config import CorpusConfig
from toolkit.errors import CorpusError

# One logger for the whole package: log lines name "toolkit.corpora", whichever
# module of it writes them.
log = logging.getLogger("toolkit.corpora")


@dataclass(frozen=True, slots=True)
class Record:
    """One corpus record: a DNA piece or a text document."""

    id: str
    """Source record and coordinates (``NC_003070.9:120000-121873``) or a document id."""
    seq: str
    """DNA: upper case, only A C G T N. Text: the (cleaned) document."""
    softmask: np.ndarray | None = None
    """DNA with ``dna.keep_softmask``: bool per base, True where the FASTA had lowercase."""
    source: str = ""
    """The source record it was cut from: FASTA header id, document id or title ('' = ``id``)."""
    start: int = 0
    """0-based coordinate of ``seq[0]`` in the source record (bases for DNA, characters of
    the cleaned document for text); ``seq`` spans ``[start, start + len(seq))`` there."""

    @property
    def source_name(self) -> str:
        """:attr:`source`, or :attr:`id` for records that are a whole source record."""
        return self.source or self.id


class Corpus:
    """A named, re-iterable stream of records.

    Attributes
    ----------
    name : the corpus name (study key, or derived from the source)
    kind : ``"dna"`` or ``"text"``
    source : the source string it was opened from
    analytic_entropy_rate : bits per symbol for synthetic sources, else None
    config : the :class:`CorpusConfig` it was opened with
    """

    def __init__(self, name: str, kind: Literal["dna", "text"], config: CorpusConfig,
                 analytic_entropy_rate: float | None = None) -> None:
        self.name, self.kind, self.config = name, kind, config
        self.source = config.source
        self.analytic_entropy_rate = analytic_entropy_rate

    def records(self) -> Iterator[Record]:
        """Every record, in a fixed order; each call starts again from the first."""
        it = self._generate()
        limit = self.config.max_records
        return it if limit is None else itertools.islice(it, limit)

    def provenance(self) -> list[dict]:
        """``[{"path", "size", "sha256"}]`` of every file the corpus reads ([] if synthetic)."""
        return []

    def _generate(self) -> Iterator[Record]:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, kind={self.kind!r}, source={self.source!r})"


def split_assignment(n_records: int, cfg: CorpusConfig) -> np.ndarray:
    """Which split each record belongs to: uint8, 0 train, 1 eval, 2 unused.

    ``sequential`` (paper): the first ``train_records`` records train, the next
    ``eval_records`` evaluate, the rest are unused. ``random``: the same counts on a
    permutation seeded by ``split_seed``.

    Too few records: evaluation keeps ``min(eval_records, n_records // 2)`` records
    and training gets ``min(train_records, n_records - n_eval)``, so both splits have
    at least one record (a warning is logged). Fewer than 2 records is an error.
    """
    if n_records < 2:
        raise CorpusError(f"corpus {cfg.source}: {n_records} record(s); need at least 2 (one to "
                          "train, one to evaluate): raise max_records or use a larger corpus")
    n_train, n_eval = cfg.train_records, cfg.eval_records
    if n_records < n_train + n_eval:
        n_eval = min(n_eval, n_records // 2)
        n_train = min(n_train, n_records - n_eval)
        log.warning("corpus %s: %d records, fewer than train_records + eval_records = %d; "
                    "using %d for training and %d for evaluation", cfg.source, n_records,
                    cfg.train_records + cfg.eval_records, n_train, n_eval)
    order = (np.arange(n_records) if cfg.split == "sequential"
             else np.random.default_rng(cfg.split_seed).permutation(n_records))
    out = np.full(n_records, 2, dtype=np.uint8)
    out[order[:n_train]] = 0
    out[order[n_train:n_train + n_eval]] = 1
    return out
