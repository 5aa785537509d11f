"""The numerical core of the analyses (docs/methods.md).

Three families of measurements, all pure functions of NumPy arrays:

- output distributions of one member (:func:`distribution_stats`) and of a pair of members at
  the same masked positions (:func:`js_distance`, :func:`argmax_agreement`, and every pair of M
  members at once, each member prepared once: :func:`pairwise_js_distance`,
  :func:`pairwise_argmax_agreement`), with lazy Dask versions that work chunk by chunk along
  positions so memory stays bounded by the chunk size;
- static-embedding stability between two members (:func:`topk_overlap`, :func:`local_spearman`,
  :func:`procrustes`, :func:`linear_cka`, :func:`rbf_cka`, :func:`weight_distance`);
- uncertainty over positions and member pairs (:func:`bootstrap_ci`, :func:`pair_mean_std`).

Speed matters for the static-embedding metrics (V x V similarity matrices, every k up to V-1,
every pair of members): a member's similarity matrix and neighbour order are computed once
(:func:`neighbours`, cached by content) and reused across pairs and ks.

Conventions: log-probabilities are natural logs; entropies and Jensen-Shannon values are in
bits; ties are broken by ascending token index everywhere (a stable sort), so every result is
deterministic.

Layout: :mod:`.distributions` (output distributions, eager and lazy), :mod:`.embeddings`
(cosine similarity, neighbours, top-k overlap, local Spearman, Procrustes, CKA), :mod:`.stats`
(bootstrap, pair mean/std, weight distance) and :mod:`.sorting` (the row-wise sort they share).
Everything is re-exported here: import from ``toolkit.metrics``.
"""

from __future__ import annotations

from toolkit.metrics.distributions import LN2 as LN2  # public constant, not in __all__
from toolkit.metrics.distributions import (
    TOP_P_RULES,
    argmax_agreement,
    distribution_stats,
    js_distance,
    lazy_argmax_agreement,
    lazy_distribution_stats,
    lazy_js_distance,
    lazy_pairwise_argmax_agreement,
    lazy_pairwise_js_distance,
    pairwise_argmax_agreement,
    pairwise_js_distance,
    replace_nan_by_mean,
)
from toolkit.metrics.embeddings import (
    Neighbours,
    clear_neighbour_cache,
    cosine_similarity,
    linear_cka,
    local_spearman,
    neighbours,
    procrustes,
    rbf_cka,
    topk_neighbours,
    topk_overlap,
)
from toolkit.metrics.sorting import _desc_order as _desc_order  # tests check it directly
from toolkit.metrics.stats import bootstrap_ci, pair_mean_std, weight_distance

__all__ = [
    "TOP_P_RULES", "Neighbours", "argmax_agreement", "bootstrap_ci", "clear_neighbour_cache", "cosine_similarity",
    "distribution_stats", "js_distance", "lazy_argmax_agreement", "lazy_distribution_stats",
    "lazy_js_distance", "lazy_pairwise_argmax_agreement", "lazy_pairwise_js_distance", "linear_cka",
    "local_spearman", "neighbours", "pair_mean_std", "pairwise_argmax_agreement", "pairwise_js_distance",
    "procrustes", "rbf_cka", "replace_nan_by_mean", "topk_neighbours", "topk_overlap", "weight_distance",
]
