"""Per-run computations of :mod:`toolkit.analyse`: each reads one run's complete members' stores.

- :func:`distribution_run`: output distributions, reduced lazily chunk by chunk with Dask;
- :func:`embedding_run`: static and contextual embeddings for every member pair;
- :func:`fisher_run`: normalised Fisher shares per member (padded onto the study-wide
  coordinates by :func:`toolkit.analyse._fisher_arrays`);
- :func:`weights_run` and :func:`loss_run`: the weight-distance sanity check and the loss curves;
- :func:`profile_run`: the data-side entropy profile of the run's token store;

plus the mean/std and bootstrap-CI helpers they share with the summary, and
:func:`resolve_definitions` (the toolkit's or the authors' definitions, ``analysis.definitions``).
Each returns plain NumPy values; :func:`toolkit.analyse.analyse_study` lays them out and
writes ``summary.zarr``.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
import logging
import math
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import store
from toolkit.config import AnalysisConfig, StudyConfig
from toolkit.errors import CheckpointError, StoreError
from toolkit.study import Layout, Member

log = logging.getLogger("toolkit.analyse")  # one logger for the stage, as before the split

NAN = math.nan


# --------------------------------------------------------------------------- definitions

DEFINITIONS: dict[str, dict[str, Any]] = {
    "toolkit": {"top_p_rule": "reach", "spread_ddof": 0, "kl_headline": "model_to_uniform",
                "js_nan": "none"},
    "authors": {"top_p_rule": "authors", "spread_ddof": 1, "kl_headline": "uniform_to_model",
                "js_nan": "pair_mean"},
}
"""What ``analysis.definitions`` selects. ``js_nan`` follows ``top_p_rule``: the "reach" rule
never gives NaN (float64, clipped before the square root); the authors' float32 arithmetic
can, and they replace a NaN by the mean over the pair's other positions."""


def resolve_definitions(a: AnalysisConfig) -> dict[str, Any]:
    """The definitions an analysis uses: ``analysis.definitions`` gives the defaults, and each of
    ``top_p_rule``, ``spread_ddof``, ``kl_headline`` that is set (not None) overrides its own
    entry. Recorded in the summary's ``definitions`` attribute."""
    out = {"definitions": a.definitions, **DEFINITIONS[a.definitions]}
    for key in ("top_p_rule", "spread_ddof", "kl_headline"):
        value = getattr(a, key)
        if value is not None:
            out[key] = value
    out["js_nan"] = "pair_mean" if out["top_p_rule"] == "authors" else "none"
    return out


# --------------------------------------------------------------------------- shared

_DDOF: contextvars.ContextVar[int] = contextvars.ContextVar("spread_ddof", default=0)
"""ddof of every std the analysis reports; set for one analysis by :func:`spread_ddof`, so every
helper (and any later analysis that calls :func:`_mean_std`) uses the same one."""


@contextlib.contextmanager
def spread_ddof(ddof: int) -> Iterator[None]:
    """Within the block, :func:`_mean_std` uses ``ddof`` (``analysis.spread_ddof`` resolved)."""
    token = _DDOF.set(int(ddof))
    try:
        yield
    finally:
        _DDOF.reset(token)


def _mean_std(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and std (see :func:`toolkit.metrics.pair_mean_std`; ddof from :func:`spread_ddof`)
    of finite values; NaN if none, std NaN from a single value."""
    from toolkit.metrics import pair_mean_std

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return NAN, NAN
    if v.size == 1:
        return float(v[0]), NAN
    mean, std = pair_mean_std(v.tolist(), ddof=_DDOF.get())
    return float(mean), float(std)


def _ci(values: np.ndarray, study: StudyConfig) -> tuple[float, float]:
    """Bootstrap CI of the mean over axis 0 of a 1-D array (NaN entries dropped)."""
    from toolkit.metrics import bootstrap_ci

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return NAN, NAN
    lo, hi = bootstrap_ci(v, n_boot=study.analysis.bootstrap, confidence=study.analysis.confidence)
    return float(lo), float(hi)


def _dask_progress(desc: str) -> Any:
    """A Dask callback that shows progress over tasks (rate and ETA, on stderr): a tqdm bar
    on a terminal, plain log lines in a job's log (:func:`toolkit.progress.progress_bar`)."""
    from dask.callbacks import Callback

    from toolkit.progress import progress_bar

    class TqdmCallback(Callback):
        def _start_state(self, dsk: Any, state: Any) -> None:
            total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
            self.bar = progress_bar(total=total, desc=desc, unit="task", logger=log)

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            self.bar.update(1)

        def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
            self.bar.close()

    return TqdmCallback()


# --------------------------------------------------------------------------- distributions


def _open_predictions(layout: Layout, ms: list[Member]) -> list[Any]:
    sets: list[Any] = []
    for m in ms:
        ds = store.open_dataset(layout.member_dir(m) / "predictions.zarr", "predictions", chunks={})
        if sets and ds.sizes != sets[0].sizes:
            raise StoreError(
                f"{layout.member_dir(m) / 'predictions.zarr'}: shape {dict(ds.sizes)} differs from "
                f"{ms[0].id}'s {dict(sets[0].sizes)}; re-run `toolkit evaluate` for the run's members")
        sets.append(ds)
    target = sets[0]["target"].values
    for m, ds in zip(ms[1:], sets[1:], strict=True):
        if not np.array_equal(ds["target"].values, target):
            raise StoreError(
                f"{layout.member_dir(m) / 'predictions.zarr'}: targets differ from {ms[0].id}'s; "
                "members were evaluated on different masks, re-run `toolkit evaluate` for the run")
    return sets


def distribution_run(study: StudyConfig, run: str, ms: list[Member]) -> dict[str, Any]:
    """Output-distribution analyses of one run's complete members.

    Builds one Dask graph (per-member statistics, pairwise JS distance and argmax
    agreement, reduced to per-member/per-pair means and to member- or pair-averaged
    per-position values for the bootstrap) and computes it chunk by chunk.

    Returns
    -------
    dict
        Summary variables of the run (scalars, ``js_distance*`` of shape ``(n_top_p,)``,
        ``rank_curve`` of shape ``(V,)``) plus ``n_positions`` and ``vocab_size``.
    """
    import dask
    import dask.array as da

    from toolkit import metrics

    a = study.analysis
    rule = resolve_definitions(a)["top_p_rule"]
    sets = _open_predictions(Layout(study), ms)
    n_pos, vocab = sets[0].sizes["position"], sets[0].sizes["vocab"]
    target = da.from_array(sets[0]["target"].values, chunks=sets[0]["log_probs"].data.chunks[0])
    lps = [ds["log_probs"].data for ds in sets]  # each (P, V), chunked along P
    stats = [metrics.lazy_distribution_stats(lp, target) for lp in lps]
    keys = ("entropy_bits", "kl_to_uniform_bits", "kl_uniform_to_model_bits", "nll_nats", "correct")
    graph: dict[str, Any] = {
        "member_means": [{k: s[k].astype("f8").mean() for k in keys} for s in stats],
        "position_means": {k: da.stack([s[k].astype("f8") for s in stats]).mean(0) for k in keys},
        "rank_curve": da.stack([s["rank_sum"] for s in stats]).mean(0) / max(n_pos, 1),  # (V,)
    }
    pairs = list(itertools.combinations(range(len(ms)), 2))
    if pairs:
        js = [metrics.lazy_js_distance(lps[i], lps[j], a.top_p, rule) for i, j in pairs]  # (P, n_p) each
        if rule == "authors":  # their NaN (float32 JSD < 0) -> mean over the pair's other positions
            js = [metrics.replace_nan_by_mean(x) for x in js]
        agree = [metrics.lazy_argmax_agreement(lps[i], lps[j]).astype("f8") for i, j in pairs]
        graph["pair_js"] = [x.mean(0) for x in js]  # (n_p,) per pair
        graph["pair_agree"] = [x.mean() for x in agree]
        graph["position_js"] = da.stack(js).mean(0)  # (P, n_p), pair-averaged
        graph["position_agree"] = da.stack(agree).mean(0)  # (P,)
    t0 = time.perf_counter()
    with _dask_progress(f"{run}: distributions"):
        (res,) = dask.compute(graph)
    log.info("%s: output distributions of %d members (%d positions x %d vocab) in %.1f s",
             run, len(ms), n_pos, vocab, time.perf_counter() - t0)

    out: dict[str, Any] = {"n_positions": n_pos, "vocab_size": vocab}
    log2v = math.log2(vocab)
    per_member = {k: np.array([float(mm[k]) for mm in res["member_means"]]) for k in keys}
    derived = {
        "kl_to_uniform_bits": per_member["kl_to_uniform_bits"],
        "kl_to_uniform_fraction": per_member["kl_to_uniform_bits"] / log2v,
        "kl_uniform_to_model_bits": per_member["kl_uniform_to_model_bits"],
        "entropy_bits": per_member["entropy_bits"],
        "entropy_fraction": per_member["entropy_bits"] / log2v,
        "perplexity": np.exp(per_member["nll_nats"]),
        "model_cross_entropy_bits": per_member["nll_nats"] / math.log(2.0),
        "top1_accuracy": per_member["correct"],
    }
    for name, values in derived.items():
        out[name], out[f"{name}_std"] = _mean_std(values)
    pm = res["position_means"]
    for name, key in (("kl_to_uniform_bits", "kl_to_uniform_bits"), ("entropy_bits", "entropy_bits"),
                      ("kl_uniform_to_model_bits", "kl_uniform_to_model_bits"),
                      ("top1_accuracy", "correct")):
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = _ci(pm[key], study)
    # exp is monotone, so the CI of the mean NLL maps onto a CI of the perplexity.
    lo, hi = _ci(pm["nll_nats"], study)
    out["perplexity_ci_low"], out["perplexity_ci_high"] = math.exp(lo), math.exp(hi)
    out["rank_curve"] = np.asarray(res["rank_curve"], dtype=np.float64)

    n_p = len(a.top_p)
    if pairs:
        pair_js = np.stack([np.asarray(x, dtype=np.float64) for x in res["pair_js"]])  # (pairs, n_p)
        stats_p = [_mean_std(pair_js[:, i]) for i in range(n_p)]
        out["js_distance"] = np.array([s[0] for s in stats_p])
        out["js_distance_std"] = np.array([s[1] for s in stats_p])
        cis = [_ci(res["position_js"][:, i], study) for i in range(n_p)]
        out["js_distance_ci_low"] = np.array([c[0] for c in cis])
        out["js_distance_ci_high"] = np.array([c[1] for c in cis])
        out["argmax_agreement"], out["argmax_agreement_std"] = _mean_std(
            [float(x) for x in res["pair_agree"]])
        out["argmax_agreement_ci_low"], out["argmax_agreement_ci_high"] = _ci(
            res["position_agree"], study)
    return out


# --------------------------------------------------------------------------- embeddings


def embedding_run(study: StudyConfig, run: str, ms: list[Member]) -> dict[str, Any]:
    """Static and contextual embedding analyses over every pair of complete members."""
    from toolkit import metrics
    from toolkit.progress import progress_bar

    a = study.analysis
    layout = Layout(study)
    word, ctx = [], []
    for m in ms:
        g = store.open_store(layout.member_dir(m) / "embeddings.zarr", "embeddings")
        word.append(np.asarray(g["word_embeddings"][...]))  # (V, d)
        ctx.append(np.asarray(g["contextual"][...]))  # (S, d)
    vocab = word[0].shape[0]
    ks = list(a.topk)
    valid = [i for i, k in enumerate(ks) if k <= vocab - 1]  # k-NN sets need k < |V|
    if len(valid) < len(ks):
        log.info("%s: k = %s exceed |V| - 1 = %d; NaN there", run,
                 [ks[i] for i in range(len(ks)) if i not in valid], vocab - 1)
    pairs = list(itertools.combinations(range(len(ms)), 2))
    n_k = len(ks)
    pair_vals: dict[str, list[Any]] = {k: [] for k in (
        "topk_overlap", "local_spearman", "procrustes_disparity", "procrustes_cosine",
        "cka_linear", "cka_rbf", "contextual_cka_linear")}
    token_sum = {"topk_overlap": np.zeros((n_k, vocab)), "local_spearman": np.zeros((n_k, vocab))}
    token_cnt = {"topk_overlap": np.zeros((n_k, vocab)), "local_spearman": np.zeros((n_k, vocab))}
    t0 = time.perf_counter()
    # Each member's similarity matrix and neighbour order once, reused by every pair and k.
    nbs = [metrics.neighbours(w) for w in word] if pairs else []
    for i, j in progress_bar(pairs, desc=f"{run}: embedding pairs", unit="pair", logger=log):
        for name, fn in (("topk_overlap", lambda x, y, k: metrics.topk_overlap(x, y, k)),
                         ("local_spearman", lambda x, y, k: metrics.local_spearman(
                             x, y, k, variant=a.spearman_variant))):
            full = np.full((n_k, vocab), NAN)
            if valid:
                full[valid] = fn(nbs[i], nbs[j], [ks[v] for v in valid])  # (n_valid, V)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN rows (Spearman at k=1)
                pair_vals[name].append(np.nanmean(full, axis=1))  # (n_k,)
            ok = np.isfinite(full)
            token_sum[name] += np.where(ok, full, 0.0)
            token_cnt[name] += ok
        disparity, cosine = metrics.procrustes(word[i], word[j])
        pair_vals["procrustes_disparity"].append(disparity)
        pair_vals["procrustes_cosine"].append(cosine)
        pair_vals["cka_linear"].append(metrics.linear_cka(word[i], word[j]))
        pair_vals["cka_rbf"].append(metrics.rbf_cka(word[i], word[j], sigma=a.rbf_sigma))
        pair_vals["contextual_cka_linear"].append(metrics.linear_cka(ctx[i], ctx[j]))
    del nbs
    metrics.clear_neighbour_cache()  # about 130 MB per member at V = 4096
    if pairs:
        log.info("%s: embeddings of %d pairs (V=%d, d=%d) in %.1f s", run, len(pairs), vocab,
                 word[0].shape[1], time.perf_counter() - t0)
    out: dict[str, Any] = {}
    if not pairs:
        return out
    for name in ("topk_overlap", "local_spearman"):
        vals = np.stack(pair_vals[name])  # (pairs, n_k)
        ms_ = [_mean_std(vals[:, i]) for i in range(n_k)]
        out[name] = np.array([m[0] for m in ms_])
        out[f"{name}_std"] = np.array([m[1] for m in ms_])
        with np.errstate(invalid="ignore", divide="ignore"):
            per_token = token_sum[name] / token_cnt[name]  # (n_k, V) pair-averaged per token
        cis = [_ci(per_token[i], study) for i in range(n_k)]
        out[f"{name}_ci_low"] = np.array([c[0] for c in cis])
        out[f"{name}_ci_high"] = np.array([c[1] for c in cis])
    for name in ("procrustes_disparity", "procrustes_cosine", "cka_linear", "cka_rbf",
                 "contextual_cka_linear"):
        out[name], out[f"{name}_std"] = _mean_std(pair_vals[name])
    return out


# --------------------------------------------------------------------------- Fisher


def fisher_run(study: StudyConfig, run: str, ms: list[Member]) -> dict[str, Any]:
    """Normalised Fisher shares of one run: per group, per block and over the flow.

    Each member's traces are normalised to sum to 1 over the groups (per estimator and
    step) before averaging over members, so members of different overall scale weigh
    the same. Returns per-member arrays keyed by estimator, and the step of each snapshot
    (NaN where members' snapshots at that index are from different steps, e.g. each
    member's own best checkpoint); :func:`toolkit.analyse._fisher_arrays` pads them onto the
    study-wide coordinates.
    """
    layout = Layout(study)
    shares: dict[str, list[dict[str, np.ndarray]]] = {}  # estimator -> per member {block: (S,)}
    steps: list[np.ndarray] = []
    for m in ms:
        g = store.open_store(layout.member_dir(m) / "fisher.zarr", "fisher")
        est = [str(e) for e in g["estimator"][...]]
        step = np.asarray(g["step"][...], dtype=np.int64)
        groups = [str(x) for x in g["group"][...]]
        # Stored order, not sorted by step: the flow snapshots, then the evaluated checkpoint,
        # whose step (e.g. of 'best') can precede the last snapshots; the summary takes the last.
        trace = np.asarray(g["fisher_trace"][...], dtype=np.float64)  # (E, S, G)
        total = trace.sum(axis=2, keepdims=True)  # (E, S, 1)
        with np.errstate(invalid="ignore", divide="ignore"):
            norm = trace / total  # (E, S, G): sums to 1 over groups
        for e, name in enumerate(est):
            shares.setdefault(name, []).append({b: norm[e, :, gi] for gi, b in enumerate(groups)})
        steps.append(step)
    label = np.asarray(steps[0] if steps else [], dtype=np.float64)
    if any(len(s) != len(steps[0]) or not np.array_equal(s, steps[0]) for s in steps):
        for i in range(len(label)):
            if any(i >= len(s) or s[i] != steps[0][i] for s in steps):
                label[i] = NAN  # no one step describes this index
        log.warning("%s: members have different Fisher-flow steps %s; the flow is aligned by index "
                    "(step NaN where they differ)", run, [s.tolist() for s in steps])
    return {"shares": shares, "steps": label}


# --------------------------------------------------------------------------- sanity, profile


def _load_weights(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from toolkit.checkpoint import verify_export

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(path)
    verify_export(path)  # a truncated export is a CheckpointError naming the file
    state: dict[str, np.ndarray] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except SafetensorError as e:
            raise CheckpointError(f"{f}: truncated or corrupt safetensors file "
                                  f"({' '.join(str(e).split())}); rerun training for this member: "
                                  f"toolkit run {store.study_ref(f)} --force train") from e
    return state


def _final_weights_dir(layout: Layout, m: Member) -> Path:
    import json

    marker = layout.train_marker(m)
    rel = "checkpoints/final"
    if marker.exists():
        rel = json.loads(marker.read_text(encoding="utf-8")).get("final", rel)
    return layout.member_dir(m) / rel


def weights_run(study: StudyConfig, run: str, ms: list[Member]) -> tuple[float, float]:
    """Mean and std over pairs of the relative L2 distance between final weights.

    Only two members' weights are held at a time.
    """
    from toolkit.metrics import weight_distance

    layout = Layout(study)
    dists = []
    try:
        for i in range(len(ms)):
            a = _load_weights(_final_weights_dir(layout, ms[i]))
            for j in range(i + 1, len(ms)):
                dists.append(weight_distance(a, _load_weights(_final_weights_dir(layout, ms[j]))))
    except FileNotFoundError as e:
        log.warning("%s: no safetensors weights in %s; weight_distance is NaN", run, e)
        return NAN, NAN
    return _mean_std(dists)


def loss_run(study: StudyConfig, ms: list[Member]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """seed -> (step, loss) of each complete member that has a train store."""
    layout = Layout(study)
    curves = {}
    for m in ms:
        path = layout.member_dir(m) / "train.zarr"
        if not path.exists():
            log.warning("%s: no train.zarr; its loss curve is left out", m.id)
            continue
        g = store.open_store(path, "train")
        curves[m.seed] = (np.asarray(g["step"][...], np.float64), np.asarray(g["loss"][...], np.float64))
    return curves


def counting_run(study: StudyConfig, run: str, model_bits: float, model_bits_std: float) -> dict[str, Any]:
    """The counting baseline of ``run`` on its evaluation masks, and what the members learned beyond it.

    Counts come from the training sequences the members were trained on (records cut to
    ``training.seq_len``), see :mod:`toolkit.counting`.
    """
    from toolkit.counting import MAX_TRAIN_TOKENS, counting_baseline
    from toolkit.masks import masks_path
    from toolkit.sequences import TRAIN, load_sequences, special_ids

    layout = Layout(study)
    tokens_path = layout.run_tokens_dir(run) / "tokens.zarr"
    mpath = masks_path(study, run)
    if not (tokens_path.exists() and mpath.exists()):
        return {}
    group = store.open_store(tokens_path, "tokens", verify="size")
    seqs = load_sequences(group, TRAIN, study.training.seq_len, "truncate")
    parts, lengths, total = [], [], 0
    for i in range(len(seqs)):
        toks = seqs.content(i)
        parts.append(toks)
        lengths.append(len(toks))
        total += len(toks)
        if total >= MAX_TRAIN_TOKENS:
            break
    if not parts:
        return {}
    specials = np.array(sorted(set(special_ids(group.attrs).values())), dtype=np.int64)
    masks = store.open_store(mpath, "masks", verify="size")
    base = counting_baseline(np.concatenate(parts), np.array(lengths), int(group.attrs["vocab_size"]), masks,
                             specials, study.analysis.distribution_mask_rate, seed=study.analysis.mask_seed)
    out = {"counting_baseline_bits": base["bits"], "counting_baseline_k": float(base["k"]),
           "learned_beyond_counting_bits": base["bits"] - model_bits,
           "learned_beyond_counting_bits_std": model_bits_std}
    optimal = _markov_optimal(study, run, group, masks, specials)
    if optimal is not None:
        out["optimal_cross_entropy_bits"] = optimal
    return out


def _markov_optimal(study: StudyConfig, run: str, group: Any, masks: Any, specials: np.ndarray) -> float | None:
    """The optimal predictor's cross-entropy (bits/token) where the toolkit knows the source:
    a ``synthetic:markov`` corpus read with char or k-mer tokens; None elsewhere."""
    from toolkit.config import TOKENIZER_PATTERN
    from toolkit.corpora.synthetic import markov_transitions
    from toolkit.counting import markov_optimal_bits

    cfg = study.corpora[study.runs[run].corpus]
    m = TOKENIZER_PATTERN.match(study.runs[run].tokenizer)
    if cfg.source != "synthetic:markov" or m is None or m.group("v") or m.group("overlap"):
        return None
    if "token_text" not in group:
        return None  # a store prepared before token texts were stored
    p, pi, _ = markov_transitions(cfg.synthetic)
    texts = [str(t) for t in np.asarray(group["token_text"][...])]
    bits = markov_optimal_bits(p, pi, cfg.synthetic.alphabet,
                               np.asarray(masks["distribution/input_ids"][...]),
                               np.asarray(masks["distribution/labels"][...]), texts, specials)
    return float(bits.mean())


def profile_run(study: StudyConfig, run: str) -> dict[str, Any]:
    """The data-side entropy profile of the run's token store (NaN if it was never prepared)."""
    path = Layout(study).run_tokens_dir(run) / "tokens.zarr"
    if path.exists():
        attrs = dict(store.open_store(path, "tokens", verify="size").attrs)  # attributes only
    else:
        log.warning("%s: no token store (run `toolkit prepare`); its entropy profile is NaN", path)
        attrs = {}
    p = attrs.get("entropy_profile") or {}

    def num(key: str) -> float:
        v = p.get(key)
        return float(v) if v is not None else NAN

    spt = num("symbols_per_token")
    cond = np.asarray([NAN if v is None else v for v in p.get("conditional_bits", [])], np.float64)
    coverage = np.asarray([NAN if v is None else v for v in p.get("context_coverage", [])], np.float64)
    plateau = p.get("entropy_rate_plateau_order")
    return {
        "context_coverage": coverage,
        # The rate with its interval (toolkit/entropy_rate.py); NaN for a store prepared
        # before the profile had one (the prepare unit is then stale and re-run).
        "entropy_rate_bits_per_symbol": num("entropy_rate_bits_per_symbol"),
        "entropy_rate_low": num("entropy_rate_low"),
        "entropy_rate_high": num("entropy_rate_high"),
        "entropy_rate_method": str(p.get("entropy_rate_method") or "not estimated"),
        "entropy_rate_heldout_bits_per_symbol": num("entropy_rate_heldout_bits_per_symbol"),
        "entropy_rate_ppmd_bits_per_symbol": num("entropy_rate_ppmd_bits_per_symbol"),
        "entropy_rate_order": -1 if plateau is None else int(plateau),
        "kind": str(attrs.get("kind", "")),
        "vocab_size": int(attrs.get("vocab_size", -1)),
        "unigram_entropy_bits": num("unigram_bits"),
        "unigram_entropy_bits_per_symbol": num("unigram_bits_per_symbol"),
        "conditional_entropy_bits": cond,
        "conditional_entropy_bits_per_symbol": cond / spt,
        "compression_bits_per_symbol": num("compression_bits_per_symbol"),
        "analytic_entropy_rate_bits_per_symbol": num("analytic_entropy_rate_bits_per_symbol"),
        "symbols_per_token": spt,
    }
