"""open_results: a lazy DataTree over real stores (written per the schemas by tests/test_analyse.py)."""

from __future__ import annotations

from pathlib import Path

import dask.array
import numpy as np
import pytest

from tests.conftest import RUNS, make_study, marked, shared_study, stored
from toolkit.config import StudyConfig
from toolkit.errors import StoreError


def _lazy(var) -> bool:
    return isinstance(var.data, dask.array.Array)


@pytest.fixture
def study(tmp_path_factory: pytest.TempPathFactory) -> StudyConfig:
    return shared_study(tmp_path_factory)


def test_tree_is_lazy_with_the_documented_groups_dims_and_attrs(study: StudyConfig) -> None:
    import toolkit

    tree = toolkit.open_results(study.root)
    assert {"summary", "predictions", "embeddings", "fisher"} <= set(tree.children)
    summary = tree["summary"].to_dataset()
    for name in ("kl_to_uniform_bits", "js_distance", "topk_overlap", "fisher_share"):
        assert _lazy(summary[name]) and "run" in summary[name].dims
        assert summary[name].attrs["description"] and "units" in summary[name].attrs
    assert summary.js_distance.dims == ("run", "top_p")
    # vocabularies differ (64 vs 26): one sub-group per run, same names, dims without run
    assert set(tree["predictions"].children) == set(RUNS)
    for run, spec in RUNS.items():
        pred = tree[f"predictions/{run}"].to_dataset()
        assert pred.log_probs.dims == ("member", "position", "vocab") and _lazy(pred.log_probs)
        assert pred.target.dims == ("position",) and _lazy(pred.target)
        assert pred.sizes["vocab"] == spec["vocab"]
        assert pred.log_probs.attrs["units"] == "nat"  # CF (UDUNITS) spelling
        emb = tree[f"embeddings/{run}"].to_dataset()
        assert emb.word_embeddings.dims == ("member", "token", "dim") and _lazy(emb.word_embeddings)
        assert emb.contextual.dims == ("member", "contextual_sequence", "dim")
    assert list(tree["predictions/dna-kmer2"].to_dataset().member.values) == [1, 2, 3]
    fisher = tree["fisher"].to_dataset()
    assert fisher.fisher_trace.dims == ("run", "member", "estimator", "step", "group")
    assert _lazy(fisher.fisher_trace) and fisher.fisher_trace.attrs["description"]
    assert list(fisher.run.values) == list(RUNS)
    assert list(fisher.group.values) == ["embeddings", "layer.0", "layer.1", "head"]


def test_values_read_through_the_tree_equal_the_stores(study: StudyConfig) -> None:
    from toolkit.results import open_results

    tree = open_results(study.root)
    lp = tree["predictions/text-bpe"].to_dataset().log_probs.sel(member=2).values
    np.testing.assert_array_equal(lp, stored(study, "text-bpe", 2, "predictions")["log_probs"][...])
    fisher = tree["fisher"].to_dataset().fisher_trace
    want = stored(study, "dna-kmer2", 3, "fisher")["fisher_trace"][...]  # groups embeddings, layer.0, head
    got = fisher.sel(run="dna-kmer2", member=3, group=["embeddings", "layer.0", "head"]).values
    np.testing.assert_array_equal(got, want)
    # a block the shallower run does not have is NaN
    assert np.isnan(fisher.sel(run="dna-kmer2", group="layer.1").values).all()
    assert np.isfinite(fisher.sel(run="text-bpe", group="layer.1").values).all()


def test_runs_of_equal_shape_share_one_array_with_a_run_dim(tmp_path: Path) -> None:
    from toolkit.results import open_results

    runs = {"dna-a": {**RUNS["dna-kmer2"], "corpus": "genome-a"},
            "dna-b": {**RUNS["dna-kmer2"], "corpus": "genome-b"}}
    study = make_study(tmp_path, seeds=(1, 2), runs=runs, complete={"dna-a": (1, 2), "dna-b": (2,)})
    tree = open_results(study.root)  # no summary yet: the member stores alone
    assert "summary" not in tree.children
    pred = tree["predictions"].to_dataset()
    assert pred.log_probs.dims == ("run", "member", "position", "vocab") and _lazy(pred.log_probs)
    assert pred.target.dims == ("run", "position")
    assert list(pred.run.values) == ["dna-a", "dna-b"]
    emb = tree["embeddings"].to_dataset()
    assert emb.word_embeddings.dims == ("run", "member", "token", "dim")
    one_k = emb.word_embeddings.sel(run="dna-b", member=2).values
    np.testing.assert_array_equal(one_k, stored(study, "dna-b", 2, "embeddings")["word_embeddings"][...])
    assert np.isnan(pred.log_probs.sel(run="dna-b", member=1).values.astype(np.float64)).all()


def test_an_empty_folder_is_a_store_error(tmp_path: Path) -> None:
    from toolkit.results import open_results

    with pytest.raises(StoreError, match="toolkit run"):
        open_results(tmp_path)
    with pytest.raises(StoreError, match="no study folder"):
        open_results(tmp_path / "missing")


def test_a_moved_study_folder_still_opens(tmp_path: Path) -> None:
    import shutil

    from toolkit.analyse import analyse_study
    from toolkit.results import open_results

    study = make_study(tmp_path / "orig", seeds=(1, 2), complete={"text-bpe": (1, 2), "dna-kmer2": (2,)})
    analyse_study(study, marked(study))
    want = stored(study, "text-bpe", 2, "predictions")["log_probs"][...]
    moved = tmp_path / "moved 'study'"
    shutil.copytree(study.root, moved)
    shutil.rmtree(study.root)  # the copy alone is read
    tree = open_results(moved)
    # incomplete members (no evaluate marker) are not in the tree; in fisher they are NaN
    assert tree.attrs["members"] == ["text-bpe/seed1", "text-bpe/seed2", "dna-kmer2/seed2"]
    assert list(tree["predictions/dna-kmer2"].to_dataset().member.values) == [2]
    assert np.isnan(tree["fisher"].to_dataset().fisher_trace.sel(run="dna-kmer2", member=1)).all()
    assert Path(tree.attrs["study_dir"]) == moved.resolve()
    got = tree["predictions/text-bpe"].to_dataset().log_probs.sel(member=2).values
    np.testing.assert_array_equal(got, want)
    assert list(tree["summary"].to_dataset().run.values) == list(RUNS)


def test_combined_runs_of_different_vocabularies_get_a_token_text_per_run(tmp_path: Path) -> None:
    from toolkit import store
    from toolkit.results import open_results
    from toolkit.study import Layout

    runs = {"dna-a": {**RUNS["dna-kmer2"], "corpus": "genome-a"},
            "dna-b": {**RUNS["dna-kmer2"], "corpus": "genome-b"}}
    study = make_study(tmp_path, seeds=(1, 2), runs=runs)
    texts = {"dna-a": [f"a{i}" for i in range(26)], "dna-b": [f"bb{i}" for i in range(26)]}
    for run, text in texts.items():  # the token stores of make_study, with the token text added
        path = Layout(study).run_tokens_dir(run) / "tokens.zarr"
        group = store.open_store(path, "tokens")
        arrays = {n: np.asarray(group[n][...]) for n in ("tokens", "offsets", "split", "record_symbols")}
        with store.writing(path, "tokens", dict(group.attrs), overwrite=True) as g:
            for name, data in arrays.items():
                store.create_array(g, "tokens", name, data=data)
            store.create_array(g, "tokens", "token_text", data=np.array(text))
    tree = open_results(study.root)
    pred, emb = tree["predictions"].to_dataset(), tree["embeddings"].to_dataset()
    assert pred.log_probs.dims == ("run", "member", "position", "vocab")  # one array, a run dim
    assert pred.token_text.dims == ("run", "vocab") and emb.token_text.dims == ("run", "token")
    for run, text in texts.items():
        assert pred.token_text.sel(run=run).values.tolist() == text
    assert pred.token_text.attrs["long_name"] == "token text" and pred.run.dtype.kind == "U"
