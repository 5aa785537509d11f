"""Output distributions of one run's members: per-member entropy, KL to uniform, perplexity,
accuracy and rank curve; pairwise JS distance (after top-p truncation) and argmax agreement;
the counting baseline and, for a known Markov source, the optimal predictor.

Predictions are opened as Dask arrays and reduced chunk by chunk, so no member's full
``(position, vocab)`` log-probabilities are held in memory.
"""

from __future__ import annotations

import itertools
import math
import time
from typing import Any

import numpy as np

from toolkit import store
from toolkit.analyse.common import ci, dask_progress, log, mean_std, resolve_definitions
from toolkit.config import StudyConfig
from toolkit.errors import StoreError
from toolkit.study import Layout, Member


def _open_predictions(layout: Layout, ms: list[Member]) -> list[Any]:
    sets: list[Any] = []
    for m in ms:
        ds = store.open_dataset(layout.member_store(m, "predictions"), "predictions", chunks={})
        if sets and ds.sizes != sets[0].sizes:
            raise StoreError(
                f"{layout.member_store(m, 'predictions')}: shape {dict(ds.sizes)} differs from "
                f"{ms[0].id}'s {dict(sets[0].sizes)}; re-run `toolkit evaluate` for the run's members")
        sets.append(ds)
    target = sets[0]["target"].values
    for m, ds in zip(ms[1:], sets[1:], strict=True):
        if not np.array_equal(ds["target"].values, target):
            raise StoreError(
                f"{layout.member_store(m, 'predictions')}: targets differ from {ms[0].id}'s; "
                "members were evaluated on different masks, re-run `toolkit evaluate` for the run")
    return sets


def distribution_run(study: StudyConfig, run: str, ms: list[Member]) -> dict[str, Any]:
    """Output-distribution analyses of one run's complete members.

    Builds one Dask graph (per-member statistics, pairwise JS distance and argmax
    agreement, reduced to per-member/per-pair means and to member- or pair-averaged
    per-position values for the bootstrap) and computes it chunk by chunk. The pairwise
    measures take one task per chunk of positions for all pairs
    (:func:`toolkit.metrics.lazy_pairwise_js_distance`), which prepares each member's rows once
    instead of once per pair.

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
        # One task per chunk of positions prepares each member once for all its pairs.
        js_all = metrics.lazy_pairwise_js_distance(lps, a.top_p, rule)  # (pairs, P, n_p)
        js = [js_all[k] for k in range(len(pairs))]  # (P, n_p) each, combinations order
        if rule == "authors":  # their NaN (float32 JSD < 0) -> mean over the pair's other positions
            js = [metrics.replace_nan_by_mean(x) for x in js]
        agree_all = metrics.lazy_pairwise_argmax_agreement(lps)  # (pairs, P) bool, one argmax per member
        agree = [agree_all[k].astype("f8") for k in range(len(pairs))]
        graph["pair_js"] = [x.mean(0) for x in js]  # (n_p,) per pair
        graph["pair_agree"] = [x.mean() for x in agree]
        graph["position_js"] = da.stack(js).mean(0)  # (P, n_p), pair-averaged
        graph["position_agree"] = da.stack(agree).mean(0)  # (P,)
    t0 = time.perf_counter()
    with dask_progress(f"{run}: distributions"):
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
        out[name], out[f"{name}_std"] = mean_std(values)
    pm = res["position_means"]
    for name, key in (("kl_to_uniform_bits", "kl_to_uniform_bits"), ("entropy_bits", "entropy_bits"),
                      ("kl_uniform_to_model_bits", "kl_uniform_to_model_bits"),
                      ("top1_accuracy", "correct")):
        out[f"{name}_ci_low"], out[f"{name}_ci_high"] = ci(pm[key], study.analysis)
    # exp is monotone, so the CI of the mean NLL maps onto a CI of the perplexity.
    lo, hi = ci(pm["nll_nats"], study.analysis)
    out["perplexity_ci_low"], out["perplexity_ci_high"] = math.exp(lo), math.exp(hi)
    out["rank_curve"] = np.asarray(res["rank_curve"], dtype=np.float64)

    n_p = len(a.top_p)
    if pairs:
        pair_js = np.stack([np.asarray(x, dtype=np.float64) for x in res["pair_js"]])  # (pairs, n_p)
        stats_p = [mean_std(pair_js[:, i]) for i in range(n_p)]
        out["js_distance"] = np.array([s[0] for s in stats_p])
        out["js_distance_std"] = np.array([s[1] for s in stats_p])
        cis = [ci(res["position_js"][:, i], study.analysis) for i in range(n_p)]
        out["js_distance_ci_low"] = np.array([c[0] for c in cis])
        out["js_distance_ci_high"] = np.array([c[1] for c in cis])
        out["argmax_agreement"], out["argmax_agreement_std"] = mean_std(
            [float(x) for x in res["pair_agree"]])
        out["argmax_agreement_ci_low"], out["argmax_agreement_ci_high"] = ci(
            res["position_agree"], study.analysis)
    return out



def counting_run(study: StudyConfig, run: str, model_bits: float, model_bits_std: float) -> dict[str, Any]:
    """The counting baseline of ``run`` on its evaluation masks, and what the members learned beyond it.

    Counts come from the training sequences the members were trained on (records cut to
    ``training.seq_len``), see :mod:`toolkit.counting`.
    """
    from toolkit.counting import MAX_TRAIN_TOKENS, counting_baseline
    from toolkit.masks import masks_path
    from toolkit.sequences import TRAIN, load_sequences, special_ids

    layout = Layout(study)
    tokens_path = layout.run_tokens_store(run)
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
    from toolkit.corpora.synthetic import markov_transitions
    from toolkit.counting import markov_optimal_bits
    from toolkit.tokenizers.spec import TOKENIZER_PATTERN

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


