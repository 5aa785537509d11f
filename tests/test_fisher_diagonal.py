"""Fisher diagonals: computed in the traces' pass, stored per tensor in fisher.zarr, read lazily,
and analysed (per-token Fisher, agreement across seeds), each against an independent reference.

References: a naive float64 loop (one backward per sequence, or per batch) for the diagonal;
NumPy sums of the stored diagonal for the traces; a full in-memory read of the token,
predictions and Fisher stores with ``scipy.stats.spearmanr`` for the analyses.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import zarr
from scipy import stats

from tests.conftest import TINY_STUDY, masked_batches, naive_batch, naive_per_example, tiny_bert
from toolkit import store
from toolkit.config import load_study
from toolkit.errors import ConfigError
from toolkit.fisher import diagonal_bytes, fisher_traces
from toolkit.study import Layout, Member

STUDY = TINY_STUDY.replace("{name}", "diagonal")
WORDS = "bert.embeddings.word_embeddings.weight"
ATTRS = {"member": "r/seed1", "run": "r", "seed": 1, "tokenizer_hash": "-"}  # a fisher store's required attributes


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real tiny study (two members, one flow snapshot), run once for the module."""
    from toolkit.dispatch import run_study

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("diagonal")
    path = base / "study.toml"
    path.write_text(STUDY.format(out=base / "out"))
    study = load_study(path)
    run_study(study)
    return study


def fisher_dir(study: Any, seed: int) -> Path:
    return Layout(study).member_dir(Member("r", seed)) / "fisher.zarr"


# --------------------------------------------------------------------------- the computation


@pytest.mark.parametrize("estimator", ["per-example", "batch"])
def test_diagonal_matches_naive_float64_loop(estimator: str) -> None:
    model, batches = tiny_bert(hidden=32), masked_batches()
    got = fisher_traces(model, batches, estimator, diagonal=True)  # type: ignore[arg-type]
    want = (naive_per_example if estimator == "per-example" else naive_batch)(model, batches)
    assert got.diagonal is not None and list(got.diagonal) == list(want)
    scale = max(float(w.max()) for w in want.values())
    for name, w in want.items():
        d = got.diagonal[name]
        assert d.dtype == np.float32 and d.shape == tuple(w.shape), name
        np.testing.assert_allclose(d, w.numpy(), rtol=1e-5, atol=1e-10 * scale, err_msg=name)
        # the traces are the float64 sums of exactly the returned diagonal
        assert got.parameters[name] == float(np.sum(d, dtype=np.float64))
    # one pass gives the same traces as the traces-only path (float32 model: the real case)
    model32 = tiny_bert(hidden=32).float()
    full = fisher_traces(model32, batches, estimator, diagonal=True)  # type: ignore[arg-type]
    plain = fisher_traces(model32, batches, estimator)  # type: ignore[arg-type]
    assert plain.diagonal is None
    for group, value in plain.groups.items():
        assert full.groups[group] == pytest.approx(value, rel=1e-5), group


def test_diagonal_bytes_counts_the_real_model() -> None:
    from toolkit.config import ModelConfig
    from toolkit.model import build_model

    for shape in ("tiny", "4M", "no-transformer"):
        model = build_model(ModelConfig(shape=shape), 4096, seed=0)
        numel = sum(p.numel() for p in model.parameters())  # tied embeddings once
        assert diagonal_bytes(shape, 4096) == 4 * numel, shape
    assert diagonal_bytes("bert-base", 4096) == 4 * 89_191_936  # model.py's measured count
    assert diagonal_bytes("tiny", 100, estimators=2, snapshots=3) == 6 * diagonal_bytes("tiny", 100)


def test_setting_is_validated(tmp_path: Path) -> None:
    path = tmp_path / "s.toml"
    for value, message in (('"some"', "expected one of 'all', 'none' or a list"),
                           ('["layer.x"]', r"fisher_diagonal\[0\] = 'layer.x' is not a Fisher group"),
                           ("[]", "fisher_diagonal is empty"),
                           ('["head", "head"]', "repeats 'head'")):
        text = STUDY.format(out=tmp_path / "o").replace("[analysis]\n", f"[analysis]\nfisher_diagonal = {value}\n")
        path.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_study(path)
    path.write_text(STUDY.format(out=tmp_path / "o").replace(
        "[analysis]\n", '[analysis]\nfisher_diagonal = ["embeddings", "layer.1"]\n'))
    assert load_study(path).analysis.fisher_diagonal == ("embeddings", "layer.1")


# --------------------------------------------------------------------------- the store


def test_stored_diagonals_sum_to_stored_traces(finished: Any) -> None:
    for seed in (1, 2):
        g = store.open_store(fisher_dir(finished, seed), "fisher")
        params = [str(p) for p in g["parameter"][...]]
        groups = [str(x) for x in g["group"][...]]
        owner = [str(x) for x in g["parameter_group"][...]]
        assert list(g.attrs["diagonal_parameters"]) == params and g.attrs["diagonal"] == "all"
        ptrace = np.asarray(g["parameter_trace"][...])  # (E, S, P)
        gtrace = np.asarray(g["fisher_trace"][...])  # (E, S, G)
        assert ptrace.shape[:2] == (2, 2)  # both estimators, flow snapshot + final weights
        sums = np.stack([np.asarray(g[f"diagonal/{p}"][...], np.float64).reshape(2, 2, -1).sum(-1)
                         for p in params], axis=-1)  # (E, S, P)
        np.testing.assert_allclose(sums, ptrace, rtol=1e-5)
        by_group = np.stack([sums[..., [o == grp for o in owner]].sum(-1) for grp in groups], -1)
        np.testing.assert_allclose(by_group, gtrace, rtol=1e-5)
        assert (gtrace > 0).all()


def test_stored_diagonal_matches_naive_loop_on_the_member(finished: Any) -> None:
    """The final weights' stored diagonal against one backward per Fisher sequence (float64)."""
    from toolkit.evaluate import fisher_batches, read_train_marker
    from toolkit.masks import open_masks
    from toolkit.model import load_model

    member = Member("r", 1)
    layout = Layout(finished)
    marker = read_train_marker(finished, member)
    masks = store.open_store(open_masks(finished, "r"), "masks")
    batches = fisher_batches(masks, 8, torch.device("cpu"))
    model = load_model(layout.member_dir(member) / marker["best"], torch.device("cpu")).double()
    g = store.open_store(fisher_dir(finished, 1), "fisher")
    est = [str(e) for e in g["estimator"][...]]
    for name, naive in (("per-example", naive_per_example), ("batch", naive_batch)):
        want = naive(model, batches)
        e = est.index(name)
        scale = max(float(w.max()) for w in want.values())
        for p, w in want.items():
            got = np.asarray(g[f"diagonal/{p}"][e, -1])
            np.testing.assert_allclose(got, w.numpy(), rtol=2e-4, atol=1e-7 * scale, err_msg=f"{name} {p}")


def test_one_tensor_or_row_block_reads_alone(finished: Any, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from toolkit import evaluate
    from toolkit.evaluate import diagonal_chunks, write_fisher
    from toolkit.masks import open_masks
    from toolkit.model import load_model

    # the rule: one (estimator, step) and the whole tensor, or blocks of token rows
    assert diagonal_chunks((4096, 768)) == (1, 1, 1365, 768)  # bert-base words: 3 blocks of 4 MiB
    assert diagonal_chunks((768, 768)) == (1, 1, 768, 768)
    assert diagonal_chunks((3072,)) == (1, 1, 3072)
    g = store.open_store(fisher_dir(finished, 1), "fisher")
    for p in g.attrs["diagonal_parameters"]:
        arr = g[f"diagonal/{p}"]
        assert arr.chunks == (1, 1, *arr.shape[2:]), p  # tiny tensors: one chunk each
    # A store with small chunks: damage every chunk but one row block of the word embeddings;
    # that block still reads (so nothing else was read), any other block fails its crc32c.
    monkeypatch.setattr(evaluate, "DIAGONAL_CHUNK", 1000)  # 7 rows of 128 per chunk
    masks = store.open_store(open_masks(finished, "r"), "masks")
    member_dir = Layout(finished).member_dir(Member("r", 1))
    model = load_model(member_dir / "checkpoints" / "final", torch.device("cpu"))
    path = tmp_path / "fisher.zarr"
    write_fisher([(12, model)], masks, path, ATTRS, estimators=("batch", "per-example"),
                 batch_size=8, device=torch.device("cpu"))
    words = zarr.open_array(str(path / "diagonal" / WORDS), mode="r")
    assert words.chunks == (1, 1, 7, 128) and words.shape[2] > 14
    keep = "c/1/0/2/0"  # per-example, step 12, rows 14..20
    before = np.asarray(words[1, 0, 14:21])
    damaged = 0
    for f in path.rglob("*"):
        rel = f.relative_to(path).as_posix()
        if f.is_file() and "/c/" in rel and rel != f"diagonal/{WORDS}/{keep}":
            f.write_bytes(b"\x00" * f.stat().st_size)
            damaged += 1
    assert damaged > 50
    words = zarr.open_array(str(path / "diagonal" / WORDS), mode="r")
    np.testing.assert_array_equal(np.asarray(words[1, 0, 14:21]), before)
    with pytest.raises(Exception):  # noqa: B017 - zarr's codec error type is not part of its API
        words[1, 0, 21:28]
    with pytest.raises(Exception):  # noqa: B017
        zarr.open_array(str(path / "diagonal" / "cls.predictions.bias"), mode="r")[1, 0]


def test_group_choice_and_none(finished: Any, tmp_path: Path) -> None:
    from toolkit.evaluate import write_fisher
    from toolkit.masks import open_masks
    from toolkit.model import load_model

    masks = store.open_store(open_masks(finished, "r"), "masks")
    model = load_model(Layout(finished).member_dir(Member("r", 1)) / "checkpoints" / "final",
                       torch.device("cpu"))
    common = {"estimators": ("batch",), "batch_size": 8, "device": torch.device("cpu")}
    write_fisher([(12, model)], masks, tmp_path / "some.zarr", ATTRS,
                 diagonal=["embeddings", "head"], **common)  # type: ignore[arg-type]
    write_fisher([(12, model)], masks, tmp_path / "none.zarr", ATTRS,
                 diagonal="none", **common)  # type: ignore[arg-type]
    some = store.open_store(tmp_path / "some.zarr", "fisher")
    none = store.open_store(tmp_path / "none.zarr", "fisher")
    owner = dict(zip((str(p) for p in some["parameter"][...]),
                     (str(x) for x in some["parameter_group"][...]), strict=True))
    stored = list(some.attrs["diagonal_parameters"])
    assert stored == [p for p, grp in owner.items() if grp in ("embeddings", "head")]
    assert sorted(some["diagonal"].array_keys()) == sorted(stored)
    assert none.attrs["diagonal_parameters"] == [] and "diagonal" not in list(none.group_keys())
    # "none" takes the float64 traces-only path; the diagonal's traces agree with it
    np.testing.assert_allclose(some["fisher_trace"][...], none["fisher_trace"][...], rtol=1e-5)
    with pytest.raises(ConfigError, match="layer.7"):
        write_fisher([(12, model)], masks, tmp_path / "bad.zarr", ATTRS,
                     diagonal=["layer.7"], **common)  # type: ignore[arg-type]
    assert not (tmp_path / "bad.zarr").exists()


def test_open_results_exposes_diagonals_lazily(finished: Any) -> None:
    import dask.array as da

    from toolkit import open_results

    tree = open_results(finished.root)
    ds = tree["fisher_diagonal/r"].to_dataset()
    words = ds[WORDS]
    assert isinstance(words.data, da.Array)  # nothing read yet
    assert words.dims[:3] == ("member", "estimator", "step") and list(words["member"].values) == [1, 2]
    assert words.data.chunks[3] == (words.shape[3],)  # the stored chunking, one per (e, s)
    raw = zarr.open_array(str(fisher_dir(finished, 2) / "diagonal" / WORDS), mode="r")
    np.testing.assert_array_equal(words.sel(member=2, estimator="batch").values,
                                  raw[[str(e) for e in tree["fisher"]["estimator"].values].index("batch")])
    traces = tree["fisher"].to_dataset()["parameter_trace"].sel(run="r", parameter=WORDS)
    np.testing.assert_allclose(words.sum(words.dims[3:]).values, traces.transpose("member", "estimator",
                               "step").values, rtol=1e-5)


# --------------------------------------------------------------------------- the analyses


def _reference(study: Any) -> dict[str, Any]:
    """Everything recomputed from full in-memory reads, without the toolkit's analysis code."""
    layout = Layout(study)
    tokens = zarr.open_group(str(layout.run_tokens_dir("r") / "tokens.zarr"), mode="r")
    offsets, split = np.asarray(tokens["offsets"][:]), np.asarray(tokens["split"][:])
    ids = np.asarray(tokens["tokens"][:])
    per_token_split = np.repeat(split, np.diff(offsets))
    out: dict[str, Any] = {"members": {}}
    for seed in (1, 2):
        d = layout.member_dir(Member("r", seed))
        fz = zarr.open_group(str(d / "fisher.zarr"), mode="r")
        est = [str(e) for e in fz["estimator"][:]]
        last = fz["step"].shape[0] - 1  # the evaluated checkpoint
        words = np.asarray(fz[f"diagonal/{WORDS}"][:], np.float64)[:, last]  # (E, V, d)
        vocab = words.shape[1]
        counts = np.bincount(ids[per_token_split == 0], minlength=vocab)
        pz = zarr.open_group(str(d / "predictions.zarr"), mode="r")
        lp, target = np.asarray(pz["log_probs"][:], np.float64), np.asarray(pz["target"][:])
        nll_pos = -lp[np.arange(target.size), target]
        nll = {v: nll_pos[target == v].mean() for v in np.unique(target)}
        owner = dict(zip((str(p) for p in fz["parameter"][:]), (str(x) for x in fz["parameter_group"][:]),
                         strict=True))
        flat = {(e, grp): np.concatenate([np.asarray(fz[f"diagonal/{p}"][:])[i, last].ravel()
                                          for p, o in owner.items() if o == grp])
                for i, e in enumerate(est) for grp in set(owner.values())}
        out["members"][seed] = {"est": est, "rows": words.sum(-1), "counts": counts, "nll": nll, "flat": flat}
    return out


def test_token_and_seed_analyses_match_scipy(finished: Any) -> None:
    from toolkit import open_results

    s = open_results(finished.root)["summary"].to_dataset()
    ref = _reference(finished)
    m1, m2 = ref["members"][1], ref["members"][2]
    for est in ("batch", "per-example"):
        e = m1["est"].index(est)
        rho_f, rho_n, bins_f, bin_x = [], [], [], []
        for m in (m1, m2):
            f, counts = m["rows"][e], m["counts"]
            seen = counts > 0
            rho_f.append(stats.spearmanr(f[seen], counts[seen]).statistic)
            tgt = np.array(sorted(m["nll"]))
            rho_n.append(stats.spearmanr(f[tgt], [m["nll"][v] for v in tgt]).statistic)
            # deciles by count, ties by token id: mean relative Fisher per bin
            order = np.argsort(counts[seen], kind="stable")
            rel = f[seen] / f[seen].mean()
            bins_f.append([rel[b].mean() for b in np.array_split(order, 10)])
            bin_x.append([counts[seen][b].mean() for b in np.array_split(order, 10)])
        at = {"run": "r", "estimator": est}
        assert float(s.fisher_token_spearman_frequency.sel(**at)) == pytest.approx(np.mean(rho_f), abs=1e-9)
        assert float(s.fisher_token_spearman_nll.sel(**at)) == pytest.approx(np.mean(rho_n), abs=1e-9)
        np.testing.assert_allclose(s.fisher_token_frequency_bin_fisher.sel(**at).values,
                                   np.mean(bins_f, 0), rtol=1e-9)
        np.testing.assert_allclose(s.fisher_token_frequency_bin_count.sel(run="r").values, bin_x[0], rtol=1e-12)
        # seed agreement: one pair, over the parameters non-zero in either member
        for block in ("embeddings", "layer.0", "layer.1", "head"):
            a, b = m1["flat"][(est, block)], m2["flat"][(est, block)]
            live = (a != 0) | (b != 0)
            want = stats.spearmanr(a[live], b[live]).statistic
            got = float(s.fisher_seed_spearman.sel(run="r", estimator=est, block=block))
            assert got == pytest.approx(want, abs=1e-9), (est, block)
            assert np.isnan(float(s.fisher_seed_spearman_std.sel(run="r", estimator=est, block=block)))
    # the measures are informative here (so the comparisons above can fail)
    assert np.isfinite(s.fisher_token_spearman_frequency.values).all()
    assert len({round(float(v), 6) for v in s.fisher_seed_spearman.values.ravel()}) > 4


def test_token_counts_and_nll_across_many_chunks(finished: Any, tmp_path: Path) -> None:
    """Chunk offsets (counts) and block alignment (NLL) on copies with small chunks."""
    from toolkit.analyse.fisher import token_nll, train_token_counts

    layout = Layout(finished)
    src = zarr.open_group(str(layout.run_tokens_dir("r") / "tokens.zarr"), mode="r")
    pred = zarr.open_group(str(layout.member_dir(Member("r", 1)) / "predictions.zarr"), mode="r")
    small = zarr.open_group(str(tmp_path / "small.zarr"), mode="w", zarr_format=3)
    data = {n: np.asarray(src[n][:]) for n in ("tokens", "offsets", "split")}
    data.update(log_probs=np.asarray(pred["log_probs"][:]), target=np.asarray(pred["target"][:]))
    chunks = {"tokens": (37,), "log_probs": (13, 20), "target": (11,)}  # vocab split too
    for name, values in data.items():
        small.create_array(name, data=values, chunks=chunks.get(name, values.shape))
    vocab = data["log_probs"].shape[1]
    assert small["tokens"].nchunks > 20 and small["log_probs"].nchunks > 20
    per_token = np.repeat(data["split"], np.diff(data["offsets"]))
    np.testing.assert_array_equal(train_token_counts(small, vocab),
                                  np.bincount(data["tokens"][per_token == 0], minlength=vocab))
    n, mean = token_nll(small, vocab)
    t = data["target"]
    nll = -data["log_probs"].astype(np.float64)[np.arange(t.size), t]
    np.testing.assert_array_equal(n, np.bincount(t, minlength=vocab))
    for v in range(vocab):
        if n[v]:
            assert mean[v] == pytest.approx(nll[t == v].mean(), rel=1e-12)
        else:
            assert np.isnan(mean[v])


def test_analysis_without_diagonals_is_nan(finished: Any, tmp_path: Path) -> None:
    """fisher_diagonal = "none": the stores hold no diagonal and the new measures are NaN."""
    import json

    from toolkit.analyse import analyse_study
    from toolkit.evaluate import evaluate_member

    out = tmp_path / "out"
    shutil.copytree(finished.root, out)
    doc = json.loads((out / "study.json").read_text())
    doc["study"]["output_dir"] = str(out)
    (out / "study.json").write_text(json.dumps(doc))
    study = dataclasses.replace(finished, output_dir=str(out), analysis=dataclasses.replace(
        finished.analysis, fisher_diagonal="none"))
    for seed in (1, 2):
        evaluate_member(study, Member("r", seed))  # only fisher.zarr is rewritten
        assert "diagonal" not in list(store.open_store(fisher_dir(study, seed), "fisher").group_keys())
    s = store.open_dataset(analyse_study(study, [Member("r", 1), Member("r", 2)]), "summary", chunks={})
    for name in ("fisher_token_spearman_frequency", "fisher_seed_spearman", "fisher_token_nll_bin_fisher"):
        assert np.isnan(s[name].values).all(), name
    assert np.isfinite(s.fisher_share.values).all()
    assert list(s.block.values) == ["embeddings", "layer.0", "layer.1", "head"]
