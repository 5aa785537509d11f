"""The toolkit's definitions and the authors' exact ones (analysis.definitions), and the
precision of the stored predictions.

- With ``definitions = "authors"`` the summary reproduces a literal NumPy transcription of the
  authors' code (lbcb-sci/GFMs ``src/analyze/metrics.py`` and ``distribution.py``: their
  ``kl_divergence``, ``jensen_shannon_distance``, ``top_p_reweight``, NaN replacement, and
  ``np.std(ddof=1)`` of their figures), written here independently of ``toolkit.metrics``.
- The default still matches a float64 loop over rows of the toolkit's own rule (smallest
  prefix whose mass reaches p) with ``scipy.spatial.distance.jensenshannon``.
- On a real tiny trained study the summary's JS distance agrees within 1e-3 relative, at
  every p, with float32 log-probs recomputed from the members' checkpoints by HuggingFace
  directly (the default prediction_dtype is float32).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import scipy.special
from scipy.spatial.distance import jensenshannon

from tests.conftest import make_study, marked, study_toml
from toolkit import store
from toolkit.config import PAPER_TOP_P, StudyConfig, load_study, study_from_dict
from toolkit.errors import ConfigError
from toolkit.study import Layout, Member, members

# Larger vocabularies than test_analyse's, so that float32 rounding at p = 1 drops tokens.
RUNS = {
    "text-bpe": dict(corpus="wiki", tokenizer="bpe512", kind="text", vocab=512, scale=3.0,
                     noise=0.3, layers=2, emb_noise=0.3, fisher=(1.0, 4.0, 1.0)),
    "dna-kmer4": dict(corpus="genome", tokenizer="kmer4", kind="dna", vocab=266, scale=0.3,
                      noise=1.0, layers=1, emb_noise=1.5, fisher=(6.0, 1.0, 0.5)),
}
TOP_P = [0.05, 0.1, 0.2, 0.5, 0.9, 1.0]


# --------------------------------------------------------------------------- the authors' code


def authors_softmax(lp: np.ndarray) -> np.ndarray:
    """F.softmax in float32 (of the stored log-probs: softmax ignores their log-sum shift)."""
    x = lp.astype(np.float32)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def authors_kl_divergence(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """kl_divergence(p, q): base 2, both clamped at 1e-10, float32."""
    p = np.maximum(p, np.float32(1e-10))
    q = np.maximum(q, np.float32(1e-10))
    return (p * (np.log2(p) - np.log2(q))).sum(axis=-1)


def authors_jensen_shannon_distance(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    m = (p + q) / np.float32(2)
    jsd = np.float32(0.5) * authors_kl_divergence(p, m) + np.float32(0.5) * authors_kl_divergence(q, m)
    with np.errstate(invalid="ignore"):
        return np.sqrt(jsd)


def authors_top_p_reweight(d: np.ndarray, p: float) -> np.ndarray:
    """top_p_reweight on (P, V) float32, one row at a time. torch.cumsum on CPU accumulates
    float32 in double and rounds each prefix to float32."""
    out = np.zeros_like(d)
    for r in range(d.shape[0]):
        idx = np.argsort(-d[r], kind="stable")
        sp = d[r][idx].copy()
        cum = np.cumsum(sp.astype(np.float64)).astype(np.float32)
        mask = cum > np.float32(p)
        mask[0] = False
        sp[mask] = 0.0
        sp = sp / max(sp.sum(dtype=np.float32), np.float32(1e-8))
        out[r, idx] = sp
    return out


def authors_compute_jensen_shannon(dists: list[np.ndarray], p: float) -> list[float]:
    """Per pair, the mean over positions after their NaN replacement (their result[p] is the
    mean of these)."""
    trunc = [authors_top_p_reweight(d, p) for d in dists]
    out = []
    for i, a in enumerate(trunc):
        for b in trunc[i + 1:]:
            jsd = authors_jensen_shannon_distance(a, b)
            nan = np.isnan(jsd)
            jsd[nan] = jsd[~nan].mean()
            out.append(float(jsd.mean()))
    return out


def authors_kl(dist: np.ndarray, direction: str) -> float:
    """Their per-member KL: kl_divergence(uniform, P) now, kl_divergence(P, uniform) before."""
    uniform = np.full_like(dist, np.float32(1.0 / dist.shape[-1]))
    pair = (uniform, dist) if direction == "uniform_to_model" else (dist, uniform)
    return float(authors_kl_divergence(*pair).sum(dtype=np.float64) / dist.shape[0])


# --------------------------------------------------------------------------- the toolkit's rule


def reach_truncate(p: np.ndarray, mass: float) -> np.ndarray:
    """float64: the smallest prefix (descending, ties by index) whose mass reaches ``mass``."""
    order = np.argsort(-p, kind="stable")
    keep = np.zeros(p.size, bool)
    total = 0.0
    for i in order:
        keep[i] = True
        total += p[i]
        if mass < 1.0 and total >= mass:
            break
    q = np.where(keep, p, 0.0)
    return q / q.sum()


def reach_js(lp_a: np.ndarray, lp_b: np.ndarray, mass: float) -> np.ndarray:
    pa = scipy.special.softmax(lp_a.astype(np.float64), axis=1)
    pb = scipy.special.softmax(lp_b.astype(np.float64), axis=1)
    return np.array([jensenshannon(reach_truncate(x, mass), reach_truncate(y, mass), base=2)
                     for x, y in zip(pa, pb, strict=True)])


# --------------------------------------------------------------------------- synthetic stores


def _with(study: StudyConfig, **analysis: object) -> StudyConfig:
    return dataclasses.replace(study, analysis=dataclasses.replace(study.analysis, **analysis))


def float32_study(root: Path) -> StudyConfig:
    """test_analyse's synthetic study with float32 predictions (no float16 ties) and the
    analysis grid of TOP_P."""
    study = make_study(root, runs=RUNS)
    layout = Layout(study)
    rng = np.random.default_rng(7)
    for m in members(study):
        path = layout.member_dir(m) / "predictions.zarr"
        g = store.open_store(path, "predictions")
        attrs = {k: v for k, v in g.attrs.items() if k not in ("schema", "schema_version", "inventory")}
        lp16 = np.asarray(g["log_probs"][...], np.float64)
        target = np.asarray(g["target"][...])
        lp = scipy.special.log_softmax(lp16 + 0.05 * rng.normal(size=lp16.shape), axis=1)
        with store.writing(path, "predictions", attrs, overwrite=True) as w:
            store.create_array(w, "predictions", "log_probs", data=lp.astype(np.float32),
                               chunks=(64, lp.shape[1]))
            store.create_array(w, "predictions", "target", data=target)
    return _with(study, top_p=tuple(TOP_P))


def analysed(study: StudyConfig, root: Path, **analysis: object):
    """The summary of ``study`` analysed with ``analysis`` overrides, written under ``root``."""
    from toolkit.analyse import analyse_study

    s = dataclasses.replace(_with(study, **analysis), output_dir=str(root))
    # the member stores stay where they are: point the new study at them
    for m in members(study):
        src, dst = Layout(study).member_dir(m), Layout(s).member_dir(m)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src, target_is_directory=True)
    for run in study.runs:
        src, dst = Layout(study).run_tokens_dir(run), Layout(s).run_tokens_dir(run)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.symlink_to(src, target_is_directory=True)
    analyse_study(s, marked(study))
    return store.open_dataset(Layout(s).summary, "summary", chunks={}).compute()


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyConfig, Path]:
    base = tmp_path_factory.mktemp("definitions")
    return float32_study(base / "study"), base


def _log_probs(study: StudyConfig, run: str) -> list[np.ndarray]:
    layout = Layout(study)
    return [np.asarray(store.open_store(layout.member_dir(Member(run, s)) / "predictions.zarr",
                                        "predictions")["log_probs"][...]) for s in study.seeds]


# --------------------------------------------------------------------------- tests


def test_authors_definitions_reproduce_their_code(synthetic: tuple[StudyConfig, Path]) -> None:
    study, base = synthetic
    ds = analysed(study, base / "authors", definitions="authors")
    assert ds.attrs["definitions"] == {"definitions": "authors", "top_p_rule": "authors",
                                       "spread_ddof": 1, "kl_headline": "uniform_to_model",
                                       "js_nan": "pair_mean"}
    dropped_at_1 = 0
    for run in study.runs:
        r = ds.sel(run=run)
        dists = [authors_softmax(lp) for lp in _log_probs(study, run)]
        for name, direction in (("kl_uniform_to_model_bits", "uniform_to_model"),
                                ("kl_to_uniform_bits", "model_to_uniform")):
            per_member = [authors_kl(d, direction) for d in dists]
            np.testing.assert_allclose(float(r[name]), np.mean(per_member), rtol=1e-3, atol=1e-6)
            np.testing.assert_allclose(float(r[f"{name}_std"]), np.std(per_member, ddof=1),
                                       rtol=1e-3, atol=1e-6)
        for p in TOP_P:
            per_pair = authors_compute_jensen_shannon(dists, p)
            np.testing.assert_allclose(float(r.js_distance.sel(top_p=p)), np.mean(per_pair),
                                       rtol=1e-3, err_msg=f"{run} p={p}")
            np.testing.assert_allclose(float(r.js_distance_std.sel(top_p=p)),
                                       np.std(per_pair, ddof=1), rtol=1e-3, atol=1e-6)
        # the float32 rounding at p = 1 really drops tokens here (so p = 1 tests the rule)
        dropped_at_1 += int((authors_top_p_reweight(dists[0], 1.0) == 0).any(axis=1).sum())
    assert dropped_at_1 > 0


def test_authors_definitions_change_only_what_they_name(synthetic: tuple[StudyConfig, Path]) -> None:
    """Every std uses ddof = 1 (members and pairs: 3 each, so std grows by sqrt(3/2));
    measures outside the JS rule keep their means; the KL headline changes the table only."""
    study, base = synthetic
    toolkit_ds = analysed(study, base / "toolkit-2")
    authors_ds = analysed(study, base / "authors-2", definitions="authors")
    assert toolkit_ds.attrs["definitions"]["spread_ddof"] == 0
    n_std = 0
    for name in toolkit_ds.data_vars:
        if not name.endswith("_std") or name.startswith("js_distance"):
            continue
        a, t = authors_ds[name].values, toolkit_ds[name].values
        ok = np.isfinite(t) & (t > 0)
        np.testing.assert_allclose(a[ok], t[ok] * math.sqrt(3 / 2), rtol=1e-9, err_msg=name)
        n_std += 1
        mean = name[: -len("_std")]
        np.testing.assert_allclose(authors_ds[mean].values, toolkit_ds[mean].values, rtol=1e-12,
                                   equal_nan=True, err_msg=mean)
    assert n_std >= 15
    from toolkit.report import summary_table

    auth, tool = summary_table(authors_ds), summary_table(toolkit_ds)
    assert auth.index("KL(U || P) bits") < auth.index("KL(P || U) bits")
    assert tool.index("KL(P || U) bits") < tool.index("KL(U || P) bits")
    assert "definitions: authors" in auth and "ddof = 1" in auth


def test_default_matches_float64_reach_rule(synthetic: tuple[StudyConfig, Path]) -> None:
    study, base = synthetic
    ds = analysed(study, base / "toolkit")
    assert ds.attrs["definitions"]["top_p_rule"] == "reach"
    for run in study.runs:
        lps = _log_probs(study, run)
        for p in TOP_P:
            per_pair = [reach_js(lps[i], lps[j], p).mean()
                        for i, j in itertools.combinations(range(len(lps)), 2)]
            np.testing.assert_allclose(float(ds.js_distance.sel(run=run, top_p=p)), np.mean(per_pair),
                                       rtol=1e-9)
            np.testing.assert_allclose(float(ds.js_distance_std.sel(run=run, top_p=p)),
                                       np.std(per_pair, ddof=0), rtol=1e-6, atol=1e-12)
        per_member = []
        for lp in lps:
            prob = scipy.special.softmax(lp.astype(np.float64), axis=1)
            per_member.append(np.mean(-math.log2(lp.shape[1])
                                      - np.log2(np.maximum(prob, 1e-10)).mean(axis=1)))
        np.testing.assert_allclose(float(ds.kl_uniform_to_model_bits.sel(run=run)),
                                   np.mean(per_member), rtol=1e-9)


def test_individual_settings_override_definitions(synthetic: tuple[StudyConfig, Path]) -> None:
    from toolkit.analyse.common import resolve_definitions

    study, _ = synthetic
    a = _with(study, definitions="authors", spread_ddof=0, kl_headline="model_to_uniform").analysis
    assert resolve_definitions(a) == {"definitions": "authors", "top_p_rule": "authors",
                                      "spread_ddof": 0, "kl_headline": "model_to_uniform",
                                      "js_nan": "pair_mean"}
    a = _with(study, top_p_rule="authors").analysis
    assert resolve_definitions(a) == {"definitions": "toolkit", "top_p_rule": "authors",
                                      "spread_ddof": 0, "kl_headline": "model_to_uniform",
                                      "js_nan": "pair_mean"}
    a = _with(study, definitions="authors", top_p_rule="reach").analysis
    assert resolve_definitions(a)["js_nan"] == "none"  # the reach rule never gives NaN


@pytest.mark.parametrize(("key", "value", "match"), [
    ("definitions", "paper", "analysis.definitions"),
    ("top_p_rule", "largest", "analysis.top_p_rule"),
    ("spread_ddof", 2, "analysis.spread_ddof = 2 is out of range"),
    ("spread_ddof", -1, "analysis.spread_ddof = -1 is out of range"),
    ("spread_ddof", True, "analysis.spread_ddof"),
    ("kl_headline", "both", "analysis.kl_headline"),
])
def test_definition_settings_are_checked(key: str, value: object, match: str) -> None:
    raw = {"study": {"name": "x"}, "corpora": {"c": {"source": "c.txt"}},
           "runs": {"r": {"corpus": "c", "tokenizer": "char"}}, "analysis": {key: value}}
    with pytest.raises(ConfigError, match=match):
        study_from_dict(raw, where="x.toml")


def test_nan_rules() -> None:
    """The authors' float32 arithmetic gives NaN for nearly equal truncated rows, replaced by
    the pair's mean over its other positions; the reach rule gives 0 there, never NaN."""
    from toolkit.metrics import js_distance, replace_nan_by_mean

    rng = np.random.default_rng(3)
    base = rng.normal(size=(400, 300))
    lp_a = scipy.special.log_softmax(0.3 * base, axis=1).astype(np.float32)
    lp_b = scipy.special.log_softmax(0.3 * (base + 1e-4 * rng.normal(size=base.shape)),
                                     axis=1).astype(np.float32)
    lp_b[:200] = scipy.special.log_softmax(2.0 * rng.normal(size=(200, 300)), axis=1)  # real disagreement
    raw = js_distance(lp_a, lp_b, [0.5, 1.0], rule="authors")
    assert np.isnan(raw).any() and not np.isnan(raw[:200]).any()
    fixed = replace_nan_by_mean(raw)
    for j, p in enumerate((0.5, 1.0)):
        ref = authors_compute_jensen_shannon([authors_softmax(lp_a), authors_softmax(lp_b)], p)[0]
        np.testing.assert_allclose(fixed[:, j].mean(), ref, rtol=1e-3)
        nan = np.isnan(raw[:, j])
        np.testing.assert_allclose(fixed[nan, j], np.nanmean(raw[:, j]))
    reach = js_distance(lp_a, lp_b, [0.5, 1.0])
    assert not np.isnan(reach).any()
    same = js_distance(lp_a, lp_a, [0.05, 0.5, 1.0])
    assert not np.isnan(same).any() and np.abs(same).max() < 1e-6


# --------------------------------------------------------------------------- a trained study

def trained_toml(out: Path) -> str:
    """The tiny study with three members, 4-mers, more evaluation records, the default top-p
    grid (the paper's) and a quarter of the positions masked."""
    return study_toml("precision", out, seeds=(1, 2, 3), runs={"r": "kmer4"},
                      corpus={"eval_records": 32, "synthetic": {"records": 80}},
                      training={"eval_every_steps": 4},
                      analysis={"eval_records": 32, "distribution_mask_rate": 0.25, "top_p": None})


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> StudyConfig:
    import torch

    from toolkit.dispatch import run_study

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("precision")
    path = base / "study.toml"
    path.write_text(trained_toml(base / "out"))
    study = load_study(path)
    run_study(study)
    return study


def recomputed_log_probs(study: StudyConfig, member: Member) -> np.ndarray:
    """float32 log-softmax at every masked position of the 'distribution' set, from the
    member's evaluated checkpoint, by HuggingFace's full forward pass (not toolkit.model)."""
    import torch
    from transformers import AutoModelForMaskedLM

    layout = Layout(study)
    marker = json.loads(layout.train_marker(member).read_text())
    model = AutoModelForMaskedLM.from_pretrained(layout.member_dir(member) / marker[study.analysis.checkpoint])
    model.eval()
    (masks_path,) = layout.run_tokens_dir(member.run).glob("masks*.zarr")
    masks = store.open_store(masks_path, "masks")
    ids = np.asarray(masks["distribution/input_ids"][...], np.int64)
    att = np.asarray(masks["distribution/attention_mask"][...], np.int64)
    lab = np.asarray(masks["distribution/labels"][...], np.int64)
    rows = []
    with torch.no_grad():
        for s in range(0, ids.shape[0], 8):
            logits = model(input_ids=torch.from_numpy(ids[s:s + 8]),
                           attention_mask=torch.from_numpy(att[s:s + 8])).logits.float()
            sel = torch.from_numpy(lab[s:s + 8] != -100)
            rows.append(torch.log_softmax(logits[sel], dim=-1).numpy())  # row-major like the store
    return np.concatenate(rows)


def test_stored_js_matches_float32_recomputation(trained: StudyConfig) -> None:
    study = trained
    assert study.analysis.prediction_dtype == "float32" and study.analysis.top_p == PAPER_TOP_P
    ds = store.open_dataset(Layout(study).summary, "summary", chunks={}).compute()
    ms = [Member("r", s) for s in study.seeds]
    lps = [recomputed_log_probs(study, m) for m in ms]
    stored = _log_probs(study, "r")
    assert lps[0].shape == stored[0].shape and lps[0].shape[0] > 100
    pairs = list(itertools.combinations(range(len(ms)), 2))
    for p in PAPER_TOP_P:
        ref = np.mean([reach_js(lps[i], lps[j], p).mean() for i, j in pairs])
        got = float(ds.js_distance.sel(run="r", top_p=p))
        np.testing.assert_allclose(got, ref, rtol=1e-3, err_msg=f"p={p}")


# --------------------------------------------------------------------------- the Fisher flow's label


def test_fisher_flow_ends_at_the_evaluated_checkpoints_step(trained: StudyConfig,
                                                           tmp_path: Path) -> None:
    """The last Fisher-flow point is measured on analysis.checkpoint ('best') and labelled with
    the step its weights were saved at, not the final step; 'final' is labelled with the final
    step; a marker without best_step gets the same label from train.zarr's evaluation record."""
    import shutil

    from toolkit.evaluate import evaluate_member, fisher_batches
    from toolkit.fisher import fisher_traces
    from toolkit.model import load_model

    study = trained
    layout = Layout(study)
    for seed in study.seeds:
        m = Member("r", seed)
        marker = json.loads(layout.train_marker(m).read_text())
        rec = store.open_store(layout.member_dir(m) / "train.zarr", "train")
        steps, losses = [int(x) for x in rec["eval_step"][...]], list(rec["eval_loss"][...])
        assert steps == [4, 8, 12]
        assert marker["best_step"] == steps[int(np.argmin(losses))]
        fisher = store.open_store(layout.member_dir(m) / "fisher.zarr", "fisher")
        want = [6, marker["best_step"]] if marker["best_step"] != 6 else [6]
        assert [int(x) for x in fisher["step"][...]] == want
        assert fisher.attrs["checkpoint_step"] == marker["best_step"]
        ev = json.loads(layout.evaluate_marker(m).read_text())
        assert ev["checkpoint_step"] == marker["best_step"] == ev["fisher_steps"][-1]

    # A copy: an older marker (no best_step), then analysis.checkpoint = "final".
    out = tmp_path / "out"
    shutil.copytree(study.root, out)
    copy = dataclasses.replace(study, output_dir=str(out))
    layout = Layout(copy)
    m = Member("r", 1)
    marker = json.loads(layout.train_marker(m).read_text())
    best = marker.pop("best_step")
    layout.train_marker(m).write_text(json.dumps(marker))
    evaluate_member(copy, m)
    fisher = store.open_store(layout.member_dir(m) / "fisher.zarr", "fisher")
    assert fisher.attrs["checkpoint_step"] == best == int(fisher["step"][-1])

    final = _with(copy, checkpoint="final")
    evaluate_member(final, m)
    fisher = store.open_store(layout.member_dir(m) / "fisher.zarr", "fisher")
    assert [int(x) for x in fisher["step"][...]] == [6, 12] and fisher.attrs["checkpoint_step"] == 12
    # what was measured at the last point: the final weights
    (masks_path,) = layout.run_tokens_dir("r").glob("masks*.zarr")
    batches = fisher_batches(store.open_store(masks_path, "masks"), final.analysis.batch_size, "cpu")
    model = load_model(layout.member_dir(m) / "checkpoints" / "final", "cpu")
    direct = fisher_traces(model, batches, "batch", device="cpu")
    groups = [str(g) for g in fisher["group"][...]]
    e = [str(x) for x in fisher["estimator"][...]].index("batch")
    np.testing.assert_allclose(np.asarray(fisher["fisher_trace"][e, -1]),
                               [direct.groups[g] for g in groups], rtol=1e-5)


def test_summary_keeps_the_evaluated_checkpoint_last(tmp_path: Path) -> None:
    """fisher_share is the evaluated checkpoint (stored last) even when its step precedes a
    flow snapshot; a step that differs between members is NaN in fisher_flow_step."""
    from toolkit.analyse import analyse_study

    study = make_study(tmp_path)
    layout = Layout(study)
    run = "text-bpe"
    shares = []
    for seed, last in zip(study.seeds, (15, 15, 25), strict=True):
        path = layout.member_dir(Member(run, seed)) / "fisher.zarr"
        g = store.open_store(path, "fisher")
        attrs = {k: v for k, v in g.attrs.items() if k not in ("schema", "schema_version")}
        arrays = {k: np.array([str(x) for x in g[k][...]]) for k in ("estimator", "group", "parameter",
                                                                     "parameter_group")}
        arrays.update({k: np.asarray(g[k][...]) for k in ("fisher_trace", "parameter_trace")})
        with store.writing(path, "fisher", {**attrs, "checkpoint_step": last}, overwrite=True) as w:
            for k, v in arrays.items():
                store.create_array(w, "fisher", k, data=v)
            store.create_array(w, "fisher", "step", data=np.array([10, 20, last], np.int64))
        t = arrays["fisher_trace"][0, -1]  # 'batch', the evaluated checkpoint
        shares.append(t / t.sum())
    analyse_study(study, marked(study))
    ds = store.open_dataset(layout.summary, "summary", chunks={}).compute()
    r = ds.sel(run=run)
    np.testing.assert_array_equal(r.fisher_flow_step.values, [10, 20, np.nan])
    groups = [str(x) for x in store.open_store(layout.member_dir(Member(run, 1)) / "fisher.zarr",
                                               "fisher")["group"][...]]
    emb = np.mean([s[groups.index("embeddings")] for s in shares])
    np.testing.assert_allclose(float(r.fisher_share.sel(group="embeddings")), emb, rtol=1e-12)
