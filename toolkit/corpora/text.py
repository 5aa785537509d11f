"""Text sources: :func:`clean_text`, and documents of text, JSONL and JSON files read
as text records or (``kind = "dna"``) as DNA records.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from toolkit.config import CorpusConfig
from toolkit.corpora.base import Record
from toolkit.corpora.dna import _check_dna, _Cutter
from toolkit.corpora.files import _decode, _Reader
from toolkit.errors import CorpusError

PUNCTUATION = ".,;:!?'\"()[]{}-\u2013\u2014/%&+=$#@*\u2018\u2019\u201c\u201d"
_SPACES = re.compile(r"[\u00a0\u2000-\u200a\u202f\u205f\u3000]")
_ODD = re.compile(r"[^\w\s" + re.escape(PUNCTUATION) + r"]|_")
_WS = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """The paper's text cleaning (docs/methods.md).

    Non-breaking and other Unicode spaces become plain spaces; every character that
    is not a letter, a digit, whitespace or common punctuation
    (``. , ; : ! ? ' " ( ) [ ] { } - – — / % & + = $ # @ *`` and curly quotes) is
    removed; whitespace runs (newlines included) collapse to one space; the result
    is stripped. Letters and digits are Unicode-aware (``é``, ``ß``, ``α`` stay).
    """
    text = _SPACES.sub(" ", text)
    text = _ODD.sub("", text)
    return _WS.sub(" ", text).strip()


def _documents(path: Path, fmt: str, cfg: CorpusConfig, field: str) -> Iterator[tuple[str, str, int]]:
    """(document id, raw text, line) of a text, JSONL or JSON file."""
    name = path.name
    any_content = False
    if fmt == "json":
        with _Reader(path) as reader:
            data = reader.read_all()
        if not data.strip():
            raise CorpusError(f"{path}: the file is empty; give a JSON list or object of documents")
        for i, raw_line in enumerate(data.split(b"\n"), 1):  # line-precise NUL / UTF-8 errors
            _decode(path, i, raw_line)
        try:
            doc = json.loads(data)
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path}: line {e.lineno}: not valid JSON ({e.msg}); fix the file "
                              "or use format 'jsonl' / 'text'") from e
        items: Any
        if isinstance(doc, dict):
            items = doc.items()
        elif isinstance(doc, list):
            items = ((f"{name}[{i}]", v) for i, v in enumerate(doc))
        else:
            raise CorpusError(f"{path}: JSON must be a list of documents or an object of "
                              f"documents, not {type(doc).__name__}")
        for key, value in items:
            if isinstance(value, dict):
                if field not in value:
                    raise CorpusError(f"{path}: record '{key}' has no field '{field}' (fields: "
                                      f"{', '.join(sorted(value))}); set text.field")
                text = value[field]
                key = value.get("title", value.get("id", key)) if isinstance(doc, list) else key
            else:
                text = value
            if not isinstance(text, str):
                raise CorpusError(f"{path}: record '{key}': field '{field}' is "
                                  f"{type(text).__name__}, not a string; fix the record")
            yield str(key), text, 0
        return
    with _Reader(path) as reader:
        para: list[str] = []
        para_line = 0
        for lineno, raw in reader.lines():
            line = _decode(path, lineno, raw)
            if line.strip():
                any_content = True
            if fmt == "jsonl":
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}: line {lineno}: not valid JSON ({e.msg}); each "
                                      "line of a JSONL file must be one JSON object") from e
                if isinstance(obj, str):
                    yield f"{name}:{lineno}", obj, lineno
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise CorpusError(f"{path}: line {lineno}: no string field '{field}'; "
                                      "set text.field to the field holding the document")
                yield str(obj.get("id", f"{name}:{lineno}")), obj[field], lineno
            elif cfg.text.documents == "line":
                if line.strip():
                    yield f"{name}:{lineno}", line.rstrip("\r\n"), lineno
            elif line.strip():
                para_line = para_line or lineno
                para.append(line.rstrip("\r\n"))
            elif para:
                yield f"{name}:{para_line}", "\n".join(para), para_line
                para, para_line = [], 0
        if para:
            yield f"{name}:{para_line}", "\n".join(para), para_line
    if not any_content:
        raise CorpusError(f"{path}: the file is empty; give at least one document")


def _read_text(path: Path, fmt: str, cfg: CorpusConfig, field: str) -> Iterator[Record]:
    for rid, text, _ in _documents(path, fmt, cfg, field):
        if cfg.text.clean:
            text = clean_text(text)
        if text.strip():
            yield Record(rid, text)


def _read_dna_documents(path: Path, fmt: str, cfg: CorpusConfig, field: str) -> Iterator[Record]:
    """kind = "dna" from non-FASTA files: each document is one DNA record."""
    cutter = _Cutter(cfg.dna)
    for rid, text, lineno in _documents(path, fmt, cfg, field):
        raw = text.encode("utf-8")
        _check_dna(path, raw, lineno, rid)
        seq = raw.translate(None, b" \t\r\n\f\v")
        if not seq:
            continue
        cutter.start(rid)
        yield from cutter.feed(seq)
        yield from cutter.finish()
