"""Static and contextual embeddings of one run's members, for every member pair: top-k
neighbour overlap, local Spearman, Procrustes disparity and cosine, linear and RBF CKA of
the word embeddings, linear CKA of the contextual embeddings."""

from __future__ import annotations

import itertools
import time
import warnings
from typing import Any

import numpy as np

from toolkit import store
from toolkit.analyse.common import NAN, ci, log, mean_std
from toolkit.config import StudyConfig
from toolkit.study import Layout, Member


def embedding_run(study: StudyConfig, run: str, ms: list[Member]) -> dict[str, Any]:
    """Static and contextual embedding analyses over every pair of complete members."""
    from toolkit import metrics
    from toolkit.progress import progress_bar

    a = study.analysis
    layout = Layout(study)
    word, ctx = [], []
    for m in ms:
        g = store.open_store(layout.member_store(m, "embeddings"), "embeddings")
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
        ms_ = [mean_std(vals[:, i]) for i in range(n_k)]
        out[name] = np.array([m[0] for m in ms_])
        out[f"{name}_std"] = np.array([m[1] for m in ms_])
        with np.errstate(invalid="ignore", divide="ignore"):
            per_token = token_sum[name] / token_cnt[name]  # (n_k, V) pair-averaged per token
        cis = [ci(per_token[i], study.analysis) for i in range(n_k)]
        out[f"{name}_ci_low"] = np.array([c[0] for c in cis])
        out[f"{name}_ci_high"] = np.array([c[1] for c in cis])
    for name in ("procrustes_disparity", "procrustes_cosine", "cka_linear", "cka_rbf",
                 "contextual_cka_linear"):
        out[name], out[f"{name}_std"] = mean_std(pair_vals[name])
    return out

