"""Opening corpora: a source string (file, folder, glob, ``builtin:``, ``synthetic:``)
or a study's corpus (``shuffle:`` included) becomes a :class:`~toolkit.corpora.base.Corpus`.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np

from toolkit.config import CorpusConfig, StudyConfig
from toolkit.corpora.base import Corpus, Record
from toolkit.corpora.builtin import BUILTINS, builtin_path
from toolkit.corpora.dna import _read_fasta
from toolkit.corpora.files import _expand, _sha256, _strip_gz, detect_format
from toolkit.corpora.synthetic import MarkovCorpus
from toolkit.corpora.text import _read_dna_documents, _read_text
from toolkit.errors import CorpusError

# One logger for the whole package: log lines name "toolkit.corpora", whichever
# module of it writes them.
log = logging.getLogger("toolkit.corpora")


class FileCorpus(Corpus):
    """Records read from files: FASTA, plain text, JSONL, JSON (each optionally gzipped)."""

    def __init__(self, name: str, config: CorpusConfig, files: list[tuple[Path, str]],
                 kind: Literal["dna", "text"], field: str) -> None:
        super().__init__(name, kind, config)
        self.files, self.field = files, field
        self._hashes: dict[tuple[str, int, int], str] = {}

    def _generate(self) -> Iterator[Record]:
        for path, fmt in self.files:
            log.debug("corpus %s: reading %s (%s)", self.name, path, fmt)
            if fmt == "fasta":
                yield from _read_fasta(path, self.config.dna)
            elif self.kind == "dna":
                yield from _read_dna_documents(path, fmt, self.config, self.field)
            else:
                yield from _read_text(path, fmt, self.config, self.field)

    def provenance(self) -> list[dict]:
        """Every file of the source (a read with max_records may stop before the last)."""
        out = []
        for path, _ in self.files:
            st = path.stat()
            key = (str(path), st.st_size, st.st_mtime_ns)
            if key not in self._hashes:
                self._hashes[key] = _sha256(path)
            out.append({"path": str(path), "size": st.st_size, "sha256": self._hashes[key]})
        return out


class ShuffledCorpus(Corpus):
    """``shuffle:OTHER``: OTHER's records with symbols permuted within each record.

    Same per-record symbol counts, no structure between positions. Record i is
    permuted by a generator seeded with (split_seed, i); a soft-mask follows its bases.
    """

    def __init__(self, name: str, config: CorpusConfig, base: Corpus) -> None:
        super().__init__(name, base.kind, config)
        self.base = base

    def _generate(self) -> Iterator[Record]:
        for i, rec in enumerate(self.base.records()):
            rng = np.random.default_rng([self.config.split_seed, i])
            chars = np.frombuffer(rec.seq.encode("utf-32-le"), dtype="<u4")
            perm = rng.permutation(len(chars))
            mask = rec.softmask[perm] if rec.softmask is not None else None
            yield Record(rec.id, chars[perm].tobytes().decode("utf-32-le"), mask,
                         source=rec.source, start=rec.start)

    def provenance(self) -> list[dict]:
        return self.base.provenance()


def _file_corpus(name: str, cfg: CorpusConfig, paths: list[Path], field: str,
                 fixed_format: str | None = None) -> FileCorpus:
    fmt_cfg = fixed_format or cfg.format
    files = [(p, detect_format(p) if fmt_cfg == "auto" else fmt_cfg) for p in paths]
    is_fasta = {fmt == "fasta" for _, fmt in files}
    kind: Literal["dna", "text"]
    if cfg.kind != "auto":
        kind = cfg.kind
    elif is_fasta == {True, False}:
        raise CorpusError(f"corpus {name}: {cfg.source} mixes FASTA and text files; set kind, "
                          "or point the source at one kind of file")
    else:
        kind = "dna" if True in is_fasta else "text"
    if kind == "text" and True in is_fasta:
        bad = next(p for p, fmt in files if fmt == "fasta")
        raise CorpusError(f"corpus {name}: {bad} is FASTA (DNA) but kind = 'text'; "
                          "set kind = 'dna' or 'auto'")
    return FileCorpus(name, cfg, files, kind, field)


def _open(name: str, cfg: CorpusConfig, base_dir: Path, exclude: tuple[Path, ...] = ()) -> Corpus:
    source = cfg.source
    scheme, _, rest = source.partition(":")
    if scheme == "builtin":
        path = builtin_path(rest)
        b = BUILTINS[rest]
        if cfg.kind not in ("auto", b.kind):
            raise CorpusError(f"corpus {name}: builtin:{rest} is {b.kind}, not {cfg.kind}; "
                              "set kind = 'auto'")
        cfg = dataclasses.replace(cfg, kind=b.kind)
        return _file_corpus(name, cfg, [path], b.field or cfg.text.field, fixed_format=b.format)
    if scheme == "synthetic":
        if rest != "markov":
            raise CorpusError(f"corpus {name}: unknown synthetic source '{source}'; valid: "
                              "synthetic:markov")
        return MarkovCorpus(name, cfg)
    if scheme == "shuffle":
        raise CorpusError(f"corpus {name}: '{source}' names another corpus of a study; "
                          "open it with open_corpus(name, study)")
    files = _expand(source, base_dir, fmt=cfg.format, exclude=exclude)
    return _file_corpus(name, cfg, files, cfg.text.field)


def open_corpus(name: str, study: StudyConfig) -> Corpus:
    """Open the corpus ``study.corpora[name]``.

    Relative paths are resolved against the study file's folder; ``shuffle:OTHER``
    opens OTHER of the same study and shuffles it. The study's output folder and
    study file are never read, even when they lie inside a corpus folder.
    """
    return _open_in_study(name, study, ())


def _open_in_study(name: str, study: StudyConfig, chain: tuple[str, ...]) -> Corpus:
    if name not in study.corpora:
        raise CorpusError(f"unknown corpus '{name}'; the study defines: "
                          f"{', '.join(sorted(study.corpora)) or 'none'}")
    if name in chain:
        raise CorpusError(f"corpora.{name}: shuffle sources form a cycle "
                          f"({' -> '.join((*chain, name))}); point one at a real source")
    cfg = study.corpora[name]
    if cfg.source.startswith("shuffle:"):
        base = _open_in_study(cfg.source.split(":", 1)[1], study, (*chain, name))
        return ShuffledCorpus(name, cfg, base)
    # The study's own outputs (token stores, reports) and its own study file never become
    # its data, even with source = "." and the output folder inside the corpus folder.
    own = (study.root, *((Path(study.source_file),) if study.source_file else ()))
    return _open(name, cfg, study.base_dir, exclude=own)


def open_source(source: str, *, kind: str = "auto", max_records: int | None = None,
                base_dir: Path | None = None) -> Corpus:
    """Open a source with default :class:`CorpusConfig` settings (``toolkit corpus-stats``).

    Parameters
    ----------
    source
        ``builtin:NAME``, ``synthetic:markov``, a file, a folder or a glob.
    kind
        ``auto``, ``dna`` or ``text``.
    max_records
        Stop after this many records.
    base_dir
        Folder relative paths are resolved against (default: the current directory).
    """
    if kind not in ("auto", "dna", "text"):
        raise CorpusError(f"kind '{kind}' is not valid; use auto, dna or text")
    if max_records is not None and max_records < 1:
        raise CorpusError(f"max_records must be at least 1, not {max_records}")
    cfg = CorpusConfig(source=source, kind=kind, max_records=max_records)  # type: ignore[arg-type]
    scheme, _, rest = source.partition(":")
    if scheme == "builtin":
        name = rest
    elif scheme == "synthetic":
        name = "markov"
    else:
        name = _strip_gz(Path(source)).split(".")[0] or "corpus"
    return _open(name, cfg, base_dir or Path.cwd())
