"""File access for the readers: gunzipping, block and line reads with progress logs,
UTF-8 decoding, hashing, format detection and expanding a source into its files.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import logging
import os
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.errors import CorpusError
from toolkit.progress import LogProgress

# One logger for the whole package: log lines name "toolkit.corpora", whichever
# module of it writes them.
log = logging.getLogger("toolkit.corpora")

FASTA_SUFFIXES = (".fa", ".fasta", ".fna", ".ffn", ".frn")
_BLOCK = 1 << 22  # bytes read at a time from a FASTA file (then extended to a line end)
_LOG_EVERY_S = 10.0


def byte_progress(what: str, total: int | None) -> LogProgress:
    """The progress line of reading ``total`` bytes (MB, MB/s, ETA)."""
    return LogProgress(desc=what, total=total, unit="MB", scale=1e6, every_s=_LOG_EVERY_S, logger=log)


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
        self.progress = byte_progress(f"reading {path.name}", self.size)

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
            self.progress.moveto(self.raw.tell())
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
                self.progress.moveto(self.raw.tell())
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


DATA_SUFFIXES = (*FASTA_SUFFIXES, ".txt", ".text", ".jsonl", ".json")
"""File names (``.gz`` ignored) a folder source reads when ``format = "auto"``."""


def _is_zarr_dir(path: Path) -> bool:
    """A Zarr store (v2 or v3) or a folder inside one: never corpus data."""
    return path.name.lower().endswith(".zarr") or any(
        (path / marker).is_file() for marker in ("zarr.json", ".zgroup", ".zarray"))


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _loop_error(path: Path, source: str) -> CorpusError:
    return CorpusError(f"{path}: symbolic link loop (or a link to a missing file) in corpus source "
                       f"'{source}'; fix or remove the link")


def _walk(folder: Path, source: str, exclude: tuple[Path, ...], hidden: list[Path],
          seen: set[tuple[int, int]]) -> Iterator[Path]:
    """Every non-hidden file below ``folder``, sorted, links followed once.

    Links that loop or dangle are errors (a link the user placed is meant to be read);
    hidden entries are collected in ``hidden``; folders in ``exclude`` (the study's
    own output folder) are left out.
    """
    try:
        st = folder.stat()
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise CorpusError(f"{folder}: cannot list the corpus folder ({e.strerror or e}); "
                          "check the corpus source and its permissions") from e
    key = (st.st_dev, st.st_ino)
    if key in seen:  # a link back to a folder already being read: it would loop
        raise _loop_error(folder, source)
    seen = seen | {key}
    for entry in entries:
        path = Path(entry.path)
        if entry.name.startswith("."):
            hidden.append(path)
            continue
        try:
            is_dir, is_file = entry.is_dir(), entry.is_file()
        except OSError as e:  # ELOOP on some systems
            raise _loop_error(path, source) from e
        if not is_dir and not is_file:
            if entry.is_symlink():
                raise _loop_error(path, source)
            raise CorpusError(f"{path}: not a regular file (a socket, FIFO or device) in corpus "
                              f"folder '{source}'; move it out of the folder")
        real = Path(os.path.realpath(path))
        if any(_inside(real, ex) for ex in exclude):
            log.info("corpus %s: skipping %s, the study's own file or output folder", source, path)
            continue
        if is_dir:
            if _is_zarr_dir(path):
                raise CorpusError(f"{path}: a Zarr store inside corpus folder '{source}' is not "
                                  "corpus data; move it out, or select the data files with a glob "
                                  "(e.g. source = 'folder/*.fa')")
            yield from _walk(path, source, exclude, hidden, seen)
        else:
            yield path


def _expand(source: str, base_dir: Path, *, fmt: str = "auto",
            exclude: tuple[Path, ...] = ()) -> list[Path]:
    """The files a source names: one file, every non-hidden file below a folder, or a glob.

    Parameters
    ----------
    source, base_dir
        The corpus source and the folder relative sources are resolved against.
    fmt
        The corpus' ``format``. With ``auto``, a folder must hold only files whose name
        says their format (:data:`DATA_SUFFIXES`, optionally ``.gz``) and not mix FASTA
        with other files: a stray ``notes.txt`` or Zarr chunk beside the FASTA files is
        an error naming it, never silently read as data.
    exclude
        Files and folders never read (the study's own file and output folder, when
        they sit inside the corpus folder); they are skipped with an INFO line.

    Raises
    ------
    CorpusError
        Missing source, empty folder or glob, stray files, symlink loops.
    """
    pattern = str(base_dir / Path(source).expanduser())
    exclude = tuple(Path(os.path.realpath(ex)) for ex in exclude)
    if any(c in source for c in "*?["):
        files = []
        zarr_dirs: dict[Path, bool] = {}  # a glob can match thousands of files in few folders
        for p in sorted(glob.glob(pattern, recursive=True)):
            path = Path(p)
            if path.is_symlink() and not path.exists():
                raise _loop_error(path, source)
            real = Path(os.path.realpath(path))
            if not path.is_file() or any(_inside(real, ex) for ex in exclude):
                continue
            if any(zarr_dirs.setdefault(d, _is_zarr_dir(d)) for d in path.parents):
                raise CorpusError(f"{path}: the glob '{source}' matches a file inside a Zarr store, "
                                  "which is not corpus data; narrow the glob (e.g. '*.fa')")
            files.append(path)
        if not files:
            raise CorpusError(f"{pattern}: the glob matches no file; check the corpus source")
        return files
    try:
        path = Path(pattern).resolve()
    except (RuntimeError, OSError) as e:  # 3.11: RuntimeError("Symlink loop from ...")
        raise _loop_error(Path(pattern), source) from e
    if path.is_dir():
        if any(_inside(path, ex) for ex in exclude):
            raise CorpusError(f"{path}: the corpus folder is inside the study's own output folder; "
                              "point the source at the data, or set study.output_dir elsewhere")
        hidden: list[Path] = []
        files, real_seen = [], set()
        for f in _walk(path, source, exclude, hidden, set()):
            real_file = os.path.realpath(f)
            if real_file in real_seen:  # a link to a sibling folder: the same data read twice
                log.warning("corpus %s: %s is a second path to a file already read; skipped",
                            source, f)
                continue
            real_seen.add(real_file)
            files.append(f)
        if hidden:
            log.info("corpus %s: skipping %d hidden file(s) or folder(s): %s", source, len(hidden),
                     ", ".join(str(h.relative_to(path)) for h in hidden[:5]))
        if not files:
            raise CorpusError(f"{path}: the folder holds no files; check the corpus source")
        if fmt == "auto":
            _check_folder_files(path, files)
        return files
    if Path(pattern).is_symlink() and not path.exists():
        raise _loop_error(Path(pattern), source)
    if not path.exists():
        raise CorpusError(f"{path}: file not found; check the corpus source path")
    return [path]


def _check_folder_files(folder: Path, files: list[Path]) -> None:
    """A folder with ``format = "auto"``: every file a known data file, FASTA or not FASTA."""
    stray = [f for f in files if not _strip_gz(f).endswith(DATA_SUFFIXES)]
    if stray:
        more = f" (and {len(stray) - 1} more)" if len(stray) > 1 else ""
        raise CorpusError(f"{stray[0]}{more}: not a corpus file in folder {folder} (corpus files end "
                          f"in {', '.join(DATA_SUFFIXES)}, optionally .gz); move it out, set the "
                          "corpus format, or select the data files with a glob")
    fasta = [f for f in files if detect_format(f) == "fasta"]
    other = [f for f in files if detect_format(f) != "fasta"]
    if fasta and other:
        raise CorpusError(f"{other[0]}: folder {folder} mixes FASTA files ({fasta[0].name}"
                          f"{', ...' if len(fasta) > 1 else ''}) and other files ({other[0].name}"
                          f"{', ...' if len(other) > 1 else ''}); move one kind out, or select "
                          "files with a glob such as '*.fa'")
