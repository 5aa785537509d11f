"""The toolkit's import structure: no cycles, and no stage imports a later one.

Read from the source with ``ast`` (every import, module-level or inside a function: a
lazy import is still a dependency), so the rule holds for the code, not only for what
one interpreter happens to load.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGE = REPO / "toolkit"

# Modules by layer; a module may import modules of its own layer or of earlier ones. A
# module not listed takes the layer of its longest listed prefix (``toolkit.corpora.dna``:
# that of ``toolkit.corpora``).
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    # ``toolkit`` itself: the version and lazy public names, imported by name at call time
    ("foundation", ("toolkit", "toolkit.errors", "toolkit.plumbing", "toolkit.progress", "toolkit.store",
                    "toolkit.sequences", "toolkit.counting", "toolkit.metrics", "toolkit.tokenizers.spec",
                    # the built-in corpus names: config validates sources against them
                    "toolkit.corpora.builtin",
                    "toolkit.config", "toolkit.study", "toolkit.tensorboard_log")),
    ("prepare", ("toolkit.corpora", "toolkit.tokenizers", "toolkit.entropy", "toolkit.prepare",
                 "toolkit.masks")),
    ("train", ("toolkit.model", "toolkit.checkpoint", "toolkit.train")),
    ("evaluate", ("toolkit.fisher", "toolkit.evaluate")),
    ("measure and analyse", ("toolkit.analyse", "toolkit.report")),
    ("orchestration and views", ("toolkit.units", "toolkit.plan", "toolkit.dispatch",
                                 "toolkit.results", "toolkit.cli", "toolkit.__main__")),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The toolkit modules ``name`` imports (``from toolkit.x import y``: ``toolkit.x.y``
    when that is a module, else ``toolkit.x``)."""
    is_package = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in modules)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative
                anchor = name.split(".") if is_package else name.split(".")[:-1]
                anchor = anchor[:len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base not in modules:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.add(sub if sub in modules else base)
    out.discard(name)
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _layer(name: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            prefix = p != "toolkit" and name.startswith(p + ".")  # the package root: only itself
            if (name == p or prefix) and len(p) > best:
                best, rank = len(p), i
    assert rank is not None, f"{name} is in no layer of tests/test_layering.py; add it"
    return rank


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    comps: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                comps.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return comps


def test_the_graph_is_read_right() -> None:
    """The reader sees lazy imports, ``from package import module`` and package inits."""
    graph = _graph()
    assert "toolkit.analyse.shards" in graph["toolkit.units"]  # imported inside a function
    assert "toolkit.dispatch.slurm" in graph["toolkit.dispatch.dask_cluster"]  # from toolkit.dispatch import slurm
    assert {"toolkit.entropy.estimators", "toolkit.entropy.rate", "toolkit.entropy.profile"} <= graph["toolkit.entropy"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycle() -> None:
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each a set of modules that import each other): " + "; ".join(
        " <-> ".join(c) for c in cycles)


def test_no_stage_imports_a_later_one() -> None:
    bad = []
    for name, deps in sorted(_graph().items()):
        for dep in sorted(deps):
            if _layer(dep) > _layer(name):
                bad.append(f"{name} ({LAYERS[_layer(name)][0]}) imports {dep} ({LAYERS[_layer(dep)][0]})")
    assert not bad, "imports from a later layer:\n" + "\n".join(bad)


def test_readme_tour_matches_the_folders() -> None:
    """The README's tour names every module and package of toolkit/, and only those."""
    import re

    text = (REPO / "README.md").read_text(encoding="utf-8")
    tour = text.split("## A tour", 1)[1].split("```", 2)[1]
    named = set(re.findall(r"\b([a-z_]+(?:\.py|/))", tour))
    on_disk = {p.name for p in PACKAGE.glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
    on_disk |= {f"{p.name}/" for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    inside = {p.name for p in PACKAGE.glob("*/*.py")}  # modules of a package, named beside it
    assert named >= on_disk, f"missing from the README's tour: {sorted(on_disk - named)}"
    stray = named - on_disk - inside - {"storage_schemas/"}
    assert not stray, f"named in the README's tour but not in toolkit/: {sorted(stray)}"
