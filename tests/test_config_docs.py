"""Every field of every dataclass in toolkit/config.py has its own docstring.

The README sends users to ``toolkit/config.py`` for what each study setting means
("documents each field"); this keeps that true. A field's docstring is the string
literal statement directly below it (the file's convention, read by Sphinx autodoc).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import toolkit.config

CONFIG = Path(toolkit.config.__file__)


def _is_dataclass_decorator(node: ast.expr) -> bool:
    target = node.func if isinstance(node, ast.Call) else node
    return (isinstance(target, ast.Name) and target.id == "dataclass") or (
        isinstance(target, ast.Attribute) and target.attr == "dataclass")


def _docstring(stmt: ast.stmt | None) -> str | None:
    if (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant)
            and isinstance(stmt.value.value, str)):
        return stmt.value.value
    return None


def _dataclass_fields() -> dict[str, list[tuple[str, int, str | None]]]:
    """Class name -> [(field, line, docstring or None)] for every dataclass of the file."""
    tree = ast.parse(CONFIG.read_text(encoding="utf-8"), filename=str(CONFIG))
    out: dict[str, list[tuple[str, int, str | None]]] = {}
    for cls in ast.walk(tree):
        if not (isinstance(cls, ast.ClassDef)
                and any(_is_dataclass_decorator(d) for d in cls.decorator_list)):
            continue
        rows = []
        for i, stmt in enumerate(cls.body):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                nxt = cls.body[i + 1] if i + 1 < len(cls.body) else None
                rows.append((stmt.target.id, stmt.lineno, _docstring(nxt)))
        out[cls.name] = rows
    return out


def test_every_config_field_has_a_docstring() -> None:
    missing = [f"{CONFIG.name}:{line}: {cls}.{name}"
               for cls, rows in _dataclass_fields().items()
               for name, line, doc in rows if doc is None or not doc.strip()]
    assert not missing, ("dataclass fields without a docstring (add a string literal on the line "
                         "below each, saying what it does, its unit and where its default comes "
                         "from):\n  " + "\n  ".join(missing))


def test_the_parse_sees_every_dataclass_and_field() -> None:
    """The AST walk above must not miss a dataclass or a field (a decorator spelled otherwise,
    a field declared some other way): compare with what the module really defines."""
    parsed = {cls: [name for name, _, _ in rows] for cls, rows in _dataclass_fields().items()}
    real = {name: [f.name for f in dataclasses.fields(obj)]
            for name, obj in vars(toolkit.config).items()
            if inspect.isclass(obj) and dataclasses.is_dataclass(obj)
            and obj.__module__ == toolkit.config.__name__}
    assert parsed == real
    assert sum(len(v) for v in real.values()) >= 100  # the study settings, not an empty parse
