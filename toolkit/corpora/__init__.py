"""Streaming corpus readers: FASTA, text, JSON(L), builtin data packages, synthetic sources.

A :class:`Corpus` yields :class:`Record` objects, one at a time, deterministically;
``records()`` restarts from the beginning on every call and honours ``max_records``.

Sources (``CorpusConfig.source``):

- ``builtin:NAME``: files shipped in installed data packages (:data:`BUILTINS`).
- ``synthetic:markov``: an order-k Markov chain with a known entropy rate.
- ``shuffle:CORPUS``: another corpus of the study, symbols shuffled within each record.
- a file, a folder (every non-hidden file below it, sorted) or a glob pattern. With
  ``format = "auto"`` a folder must hold only corpus files (FASTA, text, JSON(L), each
  optionally ``.gz``), all FASTA or none: a stray file is an error naming it. Zarr
  stores, looping or dangling links are errors; the study's own output folder is
  never read; hidden files are skipped (listed in an INFO line).

DNA (FASTA, optionally gzipped) is streamed block by block: memory is bounded by
the read block plus one piece, whatever the size of a record. Each record is
upper-cased (soft-masked lowercase kept as a flag array when ``dna.keep_softmask``),
IUPAC ambiguity codes become ``N``, the record is split into *segments* at runs of
``N`` longer than ``dna.n_run_split`` (shorter runs stay), and each segment is cut
into pieces by this rule: piece lengths are drawn uniformly from
``[piece_min, piece_max]`` by a generator seeded with a stable hash (BLAKE2b) of
``(record id, segment index)``; a piece is emitted as soon as the segment holds that
many bases; the segment's remainder is kept if at least ``piece_min`` long, else
dropped. A piece's id is ``<record id>:<start>-<end>`` in 0-based, end-exclusive
coordinates of the original record (``NC_003070.9:0-1873``).

Text files (plain or gzipped) hold one document per line or blank-line separated
documents (``text.documents``); JSONL holds one object per line (``text.field``);
JSON is a list of strings or objects, or an object of objects (read whole, not
streamed). Documents are cleaned by :func:`clean_text` (``text.clean``); documents
that are empty after cleaning are skipped. With ``kind = "dna"`` such documents are
DNA records instead, cleaned and cut like FASTA records.

Errors (:class:`CorpusError`) name the file, the line or record, and what to do.

Modules: :mod:`~toolkit.corpora.base` (:class:`Record`, :class:`Corpus`, splits),
:mod:`~toolkit.corpora.builtin` (``builtin:NAME``), :mod:`~toolkit.corpora.files`
(file access, format detection), :mod:`~toolkit.corpora.dna` (FASTA, cleaning and
cutting DNA), :mod:`~toolkit.corpora.text` (text, JSON(L)),
:mod:`~toolkit.corpora.synthetic` (``synthetic:markov``) and
:mod:`~toolkit.corpora.sources` (opening a source or a study's corpus).
"""

from toolkit.corpora.base import Corpus, Record, split_assignment
from toolkit.corpora.builtin import BUILTINS, Builtin, builtin_names, builtin_path
from toolkit.corpora.files import FASTA_SUFFIXES, detect_format
from toolkit.corpora.sources import FileCorpus, ShuffledCorpus, open_corpus, open_source
from toolkit.corpora.synthetic import MarkovCorpus, markov_transitions, stationary_contexts
from toolkit.corpora.text import PUNCTUATION, clean_text

__all__ = [
    "BUILTINS",
    "FASTA_SUFFIXES",
    "PUNCTUATION",
    "Builtin",
    "Corpus",
    "FileCorpus",
    "MarkovCorpus",
    "Record",
    "ShuffledCorpus",
    "builtin_names",
    "builtin_path",
    "clean_text",
    "detect_format",
    "markov_transitions",
    "open_corpus",
    "open_source",
    "split_assignment",
    "stationary_contexts",
]
