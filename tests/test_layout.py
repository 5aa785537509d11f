"""toolkit.study.Layout owns the names of the study folder: its paths, and a rule that no
other module spells one (a second spelling is how a rename leaves a reader behind)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import tiny_study
from toolkit.study import Layout, Member

REPO = Path(__file__).resolve().parents[1]

# File names of the study folder: a string literal (outside docstrings, without
# whitespace, so not a message) that is or ends with one of these builds a study path.
_NAMES = ("study.json", "manifest.json", "index.html", "driver.log", "complete.json",
          "summary.zarr", "tokens.zarr", "train.zarr", "predictions.zarr", "embeddings.zarr",
          "fisher.zarr", "tokenizer.json")
# Folder names of the study folder: words with other meanings too (store kinds, settings,
# commands), so flagged only where joined onto a path with ``/``.
_FOLDERS = {"members", "tokens", "analysis", "logs", "report", "checkpoints", "dask"}
# In f-strings also the pieces that name a store or a member folder: f"{kind}.zarr", f"seed{n}".

# Modules that may spell these names, and which (None: any).
ALLOWED: dict[str, set[str] | None] = {
    # the owner of the study folder's names
    "toolkit/study.py": None,
    # names inside a checkpoint folder (model.safetensors, state.json, the HF export's tokenizer.json)
    "toolkit/checkpoint.py": None,
    # the files of a HuggingFace tokenizer or model folder (an export), not the study folder's
    "toolkit/tokenizers/base.py": {"tokenizer.json"},
    "toolkit/tokenizers/hf.py": {"tokenizer.json"},
}


def _docstrings(tree: ast.AST) -> set[int]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                out.add(id(body[0].value))
    return out


def study_names(source: str) -> list[tuple[int, str]]:
    """(line, literal) of every study-folder name spelled in a module's code."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found: list[tuple[int, str]] = []

    def plain(node: ast.AST) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            text = node.value
            return None if any(c.isspace() for c in text) else text
        return None

    pieces: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            for i, part in enumerate(node.values):
                pieces.add(id(part))
                text = plain(part)
                if text is None:
                    continue
                seed = (text == "seed" or text.endswith("/seed")) and i + 1 < len(node.values) \
                    and isinstance(node.values[i + 1], ast.FormattedValue)
                if seed or text.endswith((*_NAMES, ".zarr")):
                    found.append((part.lineno, text))
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            for side in (node.left, node.right):
                text = plain(side)
                if text in _FOLDERS:
                    found.append((side.lineno, text))
    for node in ast.walk(tree):
        if id(node) in pieces:
            continue
        text = plain(node)
        if text is not None and text.endswith(_NAMES):
            found.append((node.lineno, text))  # type: ignore[attr-defined]
    return sorted(set(found))


def test_no_module_but_layout_spells_a_study_folder_name() -> None:
    bad = []
    for path in sorted((REPO / "toolkit").rglob("*.py")):
        rel = path.relative_to(REPO).as_posix()
        allowed = ALLOWED.get(rel, set())
        if allowed is None:
            continue
        for line, text in study_names(path.read_text(encoding="utf-8")):
            if text not in allowed:
                bad.append(f"{rel}:{line}: {text!r}")
    assert not bad, ("study-folder names spelled outside toolkit/study.py; use a Layout "
                     "method (add one at the end of Layout if missing):\n" + "\n".join(bad))


def test_allow_list_names_files_that_exist() -> None:
    assert [p for p in ALLOWED if not (REPO / p).is_file()] == []


@pytest.mark.parametrize("code", [
    'root / "members" / run',
    'x = root / "summary.zarr"',
    'layout.member_dir(m) / "train.zarr"',
    'folder / f"{kind}.zarr"',
    'root / "m" / f"seed{seed}"',
    'p = d / "evaluate.complete.json"',
    'NAME = "study.json"',
    'names = ("tokenizer.json", "vocab.txt")',
    'check(folder / f".{family}.complete.json")',
])
def test_rule_sees_a_spelled_name(code: str) -> None:
    assert study_names(code)


@pytest.mark.parametrize("code", [
    '"""Reads ``summary.zarr`` and ``members/<run>/seed<N>``."""',
    'raise StoreError(f"{root}: no summary.zarr and no complete member")',
    'store.open_store(path, "tokens")',
    'allowed = {"analysis", "runs"}',
    'label = f"seed {seed}"',
    'path.name.endswith(".zarr")',
    'run["checkpoints"] = []',
])
def test_rule_leaves_other_strings_alone(code: str) -> None:
    assert study_names(code) == []


# --------------------------------------------------------------------------- the paths


def test_paths_are_those_of_the_documented_layout(tmp_path: Path) -> None:
    study = tiny_study(tmp_path)
    layout = Layout(study)
    root = study.root
    m = Member("r1", 2)
    assert layout.study_file == root / "study.json"
    assert layout.members_dir == root / "members"
    assert layout.member_dir(m) == layout.members_dir / "r1" / "seed2"
    assert layout.tokens_root == root / "tokens"
    assert layout.tokens_store_in(layout.tokens_dir("m1", "kmer3")) == layout.tokens_store("m1", "kmer3")
    assert layout.run_tokens_store("r1") == root / "tokens" / "m1--kmer3" / "tokens.zarr"
    assert layout.run_tokenizer_file("r1") == layout.tokenizer_file("m1", "kmer3")
    assert layout.report_index == root / "report" / "index.html"
    assert layout.stage_logs("train") == root / "logs" / "train"
    assert layout.driver_log == root / "logs" / "driver.log"
    assert layout.dask_logs == root / "logs" / "dask"


def test_a_folder_layout_has_the_paths_that_need_no_study(tmp_path: Path) -> None:
    study = tiny_study(tmp_path)
    full, folder = Layout(study), Layout.of_folder(study.root)
    m = Member("r2", 3)
    assert folder.root == full.root
    for name in ("study_file", "members_dir", "tokens_root", "summary", "report_index", "manifest",
                 "logs_dir", "analyse_marker"):
        assert getattr(folder, name) == getattr(full, name), name
    assert folder.member_store(m, "fisher") == full.member_store(m, "fisher")
    assert folder.evaluate_marker(m) == full.evaluate_marker(m)
    assert folder.tokens_store("m1", "kmer3") == full.tokens_store("m1", "kmer3")
    with pytest.raises(AttributeError):
        folder.run_tokens_dir("r1")  # needs the study's runs


def test_member_folders_and_token_stores_read_the_folder(tmp_path: Path) -> None:
    layout = Layout.of_folder(tmp_path)
    assert layout.member_folders() == [] and layout.token_stores() == []
    for m in (Member("b", 10), Member("b", 2), Member("a", 1)):
        layout.member_dir(m).mkdir(parents=True)
    (layout.members_dir / "a" / "seedx").mkdir()  # not a member folder
    (layout.members_dir / "notes.txt").write_text("")
    assert layout.member_folders() == [Member("a", 1), Member("b", 2), Member("b", 10)]
    for key in ("z--kmer3", "a--char"):
        layout.tokens_store("z" if key[0] == "z" else "a", key.split("--")[1]).mkdir(parents=True)
    (layout.tokens_root / "empty--kmer6").mkdir()
    assert layout.token_stores() == [layout.tokens_store("a", "char"), layout.tokens_store("z", "kmer3")]
