"""File access for the readers: gunzipping, block and line reads with progress logs,
UTF-8 decoding, hashing, format detection and expanding a source into its files.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import logging
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.errors import CorpusError

# One logger for the whole package: log lines name "toolkit.corpora", whichever
# module of it writes them.
log = logging.getLogger("toolkit.corpora")

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".frn")
_BLOCK = 1 << 22  # bytes read at a time from a FASTA file (then extended to a line end)
_LOG_EVERY_S = 10.0


class _Progress:
    """INFO log line every ~10 s with rate and ETA, for long reads."""

    def __init__(self, what: str, total: int | None, unit: str = "MB", scale: float = 1e6) -> None:
        self.what, self.total, self.unit, self.scale = what, total, unit, scale
        self.t0 = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if now - self.last < _LOG_EVERY_S:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        if self.total:
            eta = (self.total - done) / max(rate, 1e-9)
            log.info("%s: %.1f%% (%.1f %s/s, ETA %.0f s)", self.what, 100 * done / self.total,
                     rate / self.scale, self.unit, eta)
        else:
            log.info("%s: %.1f %s (%.1f %s/s)", self.what, done / self.scale, self.unit,
                     rate / self.scale, self.unit)


class _Reader:
    """A binary file, transparently gunzipped, that turns read failures into CorpusError."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.raw = open(path, "rb")  # noqa: SIM115 (closed in close())
        except FileNotFoundError as e:
            raise CorpusError(f"{path}: file not found; check the corpus source path") from e
        except OSError as e:
            raise CorpusError(f"{path}: cannot open ({e.strerror}); check permissions") from e
        self.size = path.stat().st_size
        self.gz = self.raw.read(2) == b"\x1f\x8b"
        self.raw.seek(0)
        self.f: io.BufferedIOBase = gzip.GzipFile(fileobj=self.raw, mode="rb") if self.gz else self.raw
        self.progress = _Progress(f"reading {path.name}", self.size)

    def _guard(self, call: Any) -> bytes:
        try:
            return call()
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise CorpusError(f"{self.path}: compressed file is truncated or corrupt ({e}); "
                              "re-download or re-compress it") from e
        except OSError as e:
            raise CorpusError(f"{self.path}: read error ({e}); check the file") from e

    def blocks(self) -> Iterator[bytes]:
        """Blocks of about 4 MiB, each ending at a line end (or the end of the file)."""
        while True:
            block = self._guard(lambda: self.f.read(_BLOCK))
            if not block:
                return
            if not block.endswith(b"\n"):
                block += self._guard(self.f.readline)
            self.progress.update(self.raw.tell())
            yield block

    def lines(self) -> Iterator[tuple[int, bytes]]:
        """(1-based line number, raw line) pairs."""
        lineno = 0
        while True:
            line = self._guard(self.f.readline)
            if not line:
                return
            lineno += 1
            if lineno % 4096 == 0:
                self.progress.update(self.raw.tell())
            yield lineno, line

    def read_all(self) -> bytes:
        return self._guard(self.f.read)

    def close(self) -> None:
        self.f.close()
        self.raw.close()

    def __enter__(self) -> _Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _decode(path: Path, lineno: int, line: bytes) -> str:
    if b"\x00" in line:
        raise CorpusError(f"{path}: line {lineno}: binary data (NUL byte); this is not a text "
                          "file: give a text, JSON(L) or FASTA file")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: line {lineno}: not valid UTF-8 (byte {line[e.start]:#04x} at "
                          f"column {e.start + 1}); convert the file to UTF-8") from e


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _strip_gz(path: Path) -> str:
    name = path.name.lower()
    return name[:-3] if name.endswith(".gz") else name


def detect_format(path: Path) -> str:
    """``fasta``, ``jsonl``, ``json`` or ``text`` from the file name (``.gz`` ignored)."""
    name = _strip_gz(path)
    if name.endswith(FASTA_SUFFIXES):
        return "fasta"
    if name.endswith(".jsonl"):
        return "jsonl"
    if name.endswith(".json"):
        return "json"
    return "text"


def _expand(source: str, base_dir: Path) -> list[Path]:
    """The files a source names: one file, every non-hidden file below a folder, or a glob."""
    pattern = str(base_dir / Path(source).expanduser())
    if any(c in source for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise CorpusError(f"{pattern}: the glob matches no file; check the corpus source")
        return files
    path = Path(pattern).resolve()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file()
                       and not any(part.startswith(".") for part in p.relative_to(path).parts))
        if not files:
            raise CorpusError(f"{path}: the folder holds no files; check the corpus source")
        return files
    if not path.exists():
        raise CorpusError(f"{path}: file not found; check the corpus source path")
    return [path]
