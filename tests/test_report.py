"""write_report and summary_table on a really analysed study (stores from tests/conftest.py make_study)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import RUNS, make_study, marked, shared_study, summary
from toolkit.config import StudyConfig
from toolkit.errors import StoreError
from toolkit.study import Layout


@pytest.fixture
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyConfig:
    return shared_study(tmp_path_factory)


@pytest.fixture(scope="module")
def index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The report of the shared study, written once for this module."""
    from toolkit.report import write_report

    return write_report(shared_study(tmp_path_factory))


def test_report_writes_html_png_and_svg_for_every_figure(study: StudyConfig, index: Path) -> None:
    from toolkit.report import FIGURES

    assert index == Layout(study).report_dir / "index.html"
    page = index.read_text(encoding="utf-8")
    for name, title, _ in FIGURES:
        png = index.parent / f"{name}.png"
        svg = index.parent / f"{name}.svg"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert png.stat().st_size > 5000 and svg.stat().st_size > 5000, name
        assert "<svg" in svg.read_text(encoding="utf-8")[:2000], name
        assert title in page and f"{name}.svg" in page
    # self-contained: every figure embedded, no other image source
    assert page.count("src='data:image/png;base64,") == len(FIGURES)
    assert not re.search(r"src=['\"](?!data:)", page)
    for run in RUNS:
        assert run in page
    assert "Entropy versus learnability" in page
    assert not list(index.parent.glob(".index.html.*"))  # written atomically, nothing left over


def test_report_numbers_carry_their_uncertainty(study: StudyConfig, index: Path) -> None:
    page = index.read_text(encoding="utf-8")
    ds = summary(study)
    text = ds.sel(run="text-bpe")
    # the mean ± std cell of a pairwise measure, and the bootstrap interval of a per-position one
    js, js_std = float(text.js_distance.sel(top_p=1.0)), float(text.js_distance_std.sel(top_p=1.0))
    assert f"{js:.3g} ± {js_std:.2g}" in page
    kl = [float(text[f"kl_to_uniform_bits{s}"]) for s in ("", "_std", "_ci_low", "_ci_high")]
    assert f"{kl[0]:.3g} ± {kl[1]:.2g} [{kl[2]:.3g}, {kl[3]:.3g}]" in page
    share = float(text.fisher_share.sel(group="embeddings"))
    assert f"{share:.3g} ± {float(text.fisher_share_std.sel(group='embeddings')):.2g}" in page


def test_summary_table_has_every_run_from_any_source(study: StudyConfig) -> None:
    from toolkit.report import summary_table

    ds = summary(study)
    tables = [summary_table(study), summary_table(study.root),
              summary_table(Layout(study).summary), summary_table(ds)]
    assert len(set(tables)) == 1
    table = tables[0]
    lines = table.splitlines()
    header = next(line for line in lines if line.startswith("run "))
    assert header.split()[1:] == list(RUNS)
    for name in ("KL(P || U) bits", "KL(U || P) bits", "JS distance (p=1)", "top-10 overlap",
                 "Fisher share embeddings", "definitions: toolkit"):
        assert any(line.startswith(name) for line in lines), name
    for title, name in (("KL(P || U) bits", "kl_to_uniform_bits"),
                        ("KL(U || P) bits", "kl_uniform_to_model_bits")):
        kl_line = next(line for line in lines if line.startswith(title))
        means = [float(m) for m in re.findall(r"([0-9.e+-]+) ±", kl_line)]
        np.testing.assert_allclose(means, ds[name].values, rtol=5e-3)
    # the toolkit's headline KL direction comes first
    assert table.index("KL(P || U) bits") < table.index("KL(U || P) bits")


@pytest.mark.slow
def test_a_run_without_complete_members_still_reports(tmp_path: Path) -> None:
    from toolkit.analyse import analyse_study
    from toolkit.report import FIGURES, summary_table, write_report

    study = make_study(tmp_path, seeds=(1, 2), complete={"text-bpe": (1, 2), "dna-kmer2": ()})
    analyse_study(study, marked(study))
    index = write_report(study)
    assert all((index.parent / f"{name}.png").stat().st_size > 0 for name, _, _ in FIGURES)
    table = summary_table(study)
    assert "dna-kmer2" in table and "n/a" in table
    assert "left out (not evaluated): dna-kmer2/seed1, dna-kmer2/seed2" in table


def test_report_without_summary_says_what_to_run(tmp_path: Path) -> None:
    from toolkit.report import summary_table, write_report

    study = make_study(tmp_path, seeds=(1,))
    with pytest.raises(StoreError, match="toolkit analyse"):
        write_report(study)
    with pytest.raises(StoreError, match="toolkit analyse"):
        summary_table(tmp_path)
    assert not (Layout(study).report_dir / "index.html").exists()
