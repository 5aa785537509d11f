"""A counting baseline for masked-token prediction: how much better than counting a model does.

For a masked position the baseline predicts the token from the ``k`` visible tokens on
each side, by counts over the training tokens: interpolated Witten-Bell over the ladder
of windows ``j = 0..k`` (``j`` tokens on each side, fewer where the sequence ends or a
neighbour is itself masked or special: the window stops there, as the model's input
does), with the unigram at the bottom and a uniform floor::

    p_j(x) = (C_j(c, x) + T_j(c) p_{j-1}(x)) / (C_j(c) + T_j(c))

``C_j(c, x)`` counts token ``x`` between the left and right context ``c`` (window shape
included) in the training records, ``C_j(c)`` its total and ``T_j(c)`` the distinct
tokens seen there; an unseen context keeps ``p_{j-1}``.

The counts come from the first 90% of the training tokens (at most
:data:`MAX_TRAIN_TOKENS`); ``k`` is chosen on the last 10%, masked at the evaluation's
rate; the cross-entropy is then measured on exactly the evaluation masks the members
are scored on (``distribution/*`` of the masks store), in bits per token. "Learned beyond
counting" is that cross-entropy minus a member's.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

MAX_TRAIN_TOKENS = 4_000_000
MAX_K = 3
HELD_OUT = 0.1
_STOP = -1  # a position that ends a window (masked, special, padding or outside a record)


def _windows(seqs: np.ndarray, stop: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Visible context lengths left and right of every position, at most ``k`` each.

    ``seqs`` (S, T) token ids; ``stop`` (S, T) True where a window must end.
    Returns (S, T) ``a`` (left) and ``b`` (right).
    """
    S, T = seqs.shape
    a = np.zeros((S, T), dtype=np.int64)
    b = np.zeros((S, T), dtype=np.int64)
    open_left = np.ones((S, T), dtype=bool)
    open_right = np.ones((S, T), dtype=bool)
    for d in range(1, k + 1):
        left = np.ones((S, T), dtype=bool)  # (S, T) the token d to the left ends the window
        left[:, d:] = stop[:, :-d]
        open_left &= ~left
        a += open_left
        right = np.ones((S, T), dtype=bool)
        right[:, :-d] = stop[:, d:]
        open_right &= ~right
        b += open_right
    return a, b


def _context_ids(seqs: np.ndarray, k: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Dense ids of the left (``L[a]``: tokens t-a..t-1) and right (``R[b]``) contexts.

    Ids are comparable between rows of ``seqs`` (one numbering for the whole array);
    windows that cross the array's edge get garbage ids and must be masked by the caller.
    """
    S, T = seqs.shape
    left = [np.zeros((S, T), dtype=np.int64)]
    right = [np.zeros((S, T), dtype=np.int64)]
    shift = seqs.astype(np.int64) + 2  # >= 1: never collides with the edge fill
    for d in range(1, k + 1):
        prev = np.zeros((S, T), dtype=np.int64)
        prev[:, d:] = shift[:, :-d]
        _, inv = np.unique(left[-1].ravel() * (int(shift.max()) + 1) + prev.ravel(), return_inverse=True)
        left.append(inv.reshape(S, T))
        nxt = np.zeros((S, T), dtype=np.int64)
        nxt[:, :-d] = shift[:, d:]
        _, inv = np.unique(right[-1].ravel() * (int(shift.max()) + 1) + nxt.ravel(), return_inverse=True)
        right.append(inv.reshape(S, T))
    return left, right


def _as_rows(tokens: np.ndarray, lengths: np.ndarray, width: int) -> np.ndarray:
    """Records as rows of at most ``width`` tokens, padded with ``_STOP``-marked filler."""
    rows = []
    start = 0
    for n in lengths.tolist():
        rec = tokens[start:start + n]
        start += n
        for i in range(0, len(rec), width):
            rows.append(rec[i:i + width])
    out = np.full((len(rows), width), -1, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, : len(r)] = r
    return out


def baseline_cross_entropy(train_rows: np.ndarray, eval_rows: np.ndarray, eval_targets: np.ndarray,
                           eval_stop: np.ndarray, vocab_size: int, k: int) -> np.ndarray:
    """Bits per target of the order-0..k interpolated Witten-Bell counting predictors.

    Parameters
    ----------
    train_rows
        (S, T) training tokens, -1 where there is no token.
    eval_rows, eval_stop
        (E, U) the evaluation inputs and where windows end (masked, special, padding).
    eval_targets
        (E, U) the true token at evaluated positions, -1 elsewhere.

    Returns
    -------
    (k + 1, P) numpy.ndarray: -log2 p of each evaluated position under each ladder depth.
    """
    train_stop = train_rows < 0
    T, U = train_rows.shape[1], eval_rows.shape[1]
    width = max(T, U)
    pad = lambda x, fill: np.pad(x, ((0, 0), (0, width - x.shape[1])), constant_values=fill)  # noqa: E731
    rows = np.vstack([pad(train_rows, -1), pad(np.where(eval_stop, -1, eval_rows), -1)])
    stop = rows < 0
    n_train = len(train_rows)
    a, b = _windows(rows, stop, k)
    left, right = _context_ids(np.where(stop, -1, rows), k)
    is_train = np.zeros(rows.shape, dtype=bool)
    is_train[:n_train] = ~train_stop if width == T else pad(~train_stop, False)
    targets = np.full(rows.shape, -1, dtype=np.int64)
    targets[n_train:] = pad(eval_targets, -1)
    ev = targets >= 0  # (S', T') evaluated positions
    x_train = rows[is_train]
    x_eval = targets[ev]
    counts0 = np.bincount(x_train, minlength=vocab_size).astype(np.float64)
    p = (counts0[x_eval] + np.count_nonzero(counts0) / vocab_size) / (counts0.sum() + np.count_nonzero(counts0))
    out = [-np.log2(p)]
    a_ev, b_ev = a[ev], b[ev]
    for j in range(1, k + 1):
        p = p.copy()
        for sa in range(j + 1):
            for sb in range(j + 1):
                if max(sa, sb) != j:  # a window new at level j reaches j on at least one side
                    continue
                # eval positions whose level-j window has this shape and is new at level j
                sel = (np.minimum(a_ev, j) == sa) & (np.minimum(b_ev, j) == sb)
                sel &= (np.minimum(a_ev, j - 1) != sa) | (np.minimum(b_ev, j - 1) != sb)
                if not sel.any():
                    continue
                fit = is_train & (a >= sa) & (b >= sb)
                key_train = left[sa][fit] * (int(right[sb].max()) + 1) + right[sb][fit]
                key_eval = (left[sa][ev][sel] * (int(right[sb].max()) + 1) + right[sb][ev][sel])
                ctx, ctx_inv = np.unique(key_train, return_inverse=True)
                joint, joint_n = np.unique(ctx_inv * vocab_size + rows[fit], return_counts=True)
                c_of = joint // vocab_size
                total = np.bincount(c_of, weights=joint_n, minlength=len(ctx))
                types = np.bincount(c_of, minlength=len(ctx)).astype(np.float64)
                ci = np.minimum(np.searchsorted(ctx, key_eval), max(len(ctx) - 1, 0))
                seen = (ctx[ci] == key_eval) if len(ctx) else np.zeros(len(key_eval), dtype=bool)
                jk = ci * vocab_size + x_eval[sel]
                ji = np.minimum(np.searchsorted(joint, jk), max(len(joint) - 1, 0))
                c_cx = np.where(seen & (joint[ji] == jk), joint_n[ji], 0) if len(joint) else np.zeros(len(jk))
                C = np.where(seen, total[ci], 0.0) if len(ctx) else np.zeros(len(jk))
                Tn = np.where(seen, types[ci], 0.0) if len(ctx) else np.zeros(len(jk))
                prev = p[sel]
                p[sel] = np.where(C > 0, (c_cx + Tn * prev) / np.maximum(C + Tn, 1.0), prev)
        out.append(-np.log2(p))
    return np.stack(out)


def counting_baseline(tokens: np.ndarray, lengths: np.ndarray, vocab_size: int, masks: Any,
                      special_ids: np.ndarray, mask_rate: float, seed: int = 0,
                      max_k: int = MAX_K) -> dict[str, Any]:
    """The counting baseline of one run on its evaluation masks (module docstring).

    Parameters
    ----------
    tokens, lengths
        The training split's tokens (no specials) and record lengths.
    masks
        The run's open masks store (``distribution/input_ids``, ``/labels``).
    special_ids
        Ids that end a window (specials and [MASK]).
    mask_rate
        ``analysis.distribution_mask_rate``: the held-out part is masked at this rate.

    Returns
    -------
    dict
        ``bits`` (cross-entropy on the evaluation masks at the chosen ``k``), ``k``,
        ``held_out_bits`` (per k), ``positions``, ``bits_per_position`` (the chosen k's
        losses, in the masks store's position order).
    """
    t0 = time.perf_counter()
    tokens = np.asarray(tokens, dtype=np.int64)
    if len(tokens) > MAX_TRAIN_TOKENS:
        ends = np.cumsum(lengths)
        keep = int(np.searchsorted(ends, MAX_TRAIN_TOKENS, side="right"))
        lengths = np.asarray(lengths[:max(keep, 1)])
        tokens = tokens[: int(lengths.sum())]
    ids = np.asarray(masks["distribution/input_ids"][...], dtype=np.int64)  # (S, U)
    labels = np.asarray(masks["distribution/labels"][...], dtype=np.int64)  # (S, U)
    width = ids.shape[1]
    cut = int(np.searchsorted(np.cumsum(lengths), int(len(tokens) * (1 - HELD_OUT))))
    n_fit = int(np.sum(lengths[:cut]))
    fit_rows = _as_rows(tokens[:n_fit], np.asarray(lengths[:cut]), width)
    held_rows = _as_rows(tokens[n_fit:], np.asarray(lengths[cut:]), width)
    # The held-out records, masked at the evaluation's rate: the window stops at a mask.
    rng = np.random.default_rng(seed)
    held_mask = (rng.random(held_rows.shape) < mask_rate) & (held_rows >= 0)
    held_targets = np.where(held_mask, held_rows, -1)
    held_bits = baseline_cross_entropy(fit_rows, held_rows, held_targets, held_mask | (held_rows < 0),
                                       vocab_size, max_k).mean(axis=1) if held_mask.any() else np.full(max_k + 1, np.nan)
    k = int(np.nanargmin(held_bits)) if np.isfinite(held_bits).any() else 0
    stop = np.isin(ids, special_ids)
    targets = np.where(labels >= 0, labels, -1)
    losses = baseline_cross_entropy(fit_rows, ids, targets, stop, vocab_size, k)[k]
    log.info("counting baseline: k = %d (held-out %s bits), %.4f bits/token on %d positions (%.1f s)",
             k, np.round(held_bits, 4).tolist(), float(losses.mean()), len(losses), time.perf_counter() - t0)
    return {"bits": float(losses.mean()), "k": k, "held_out_bits": held_bits.tolist(),
            "positions": int(len(losses)), "bits_per_position": losses}
