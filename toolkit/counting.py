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
OPTIMAL_MEMORY_BYTES = 512 * 2 ** 20
"""Forward-backward working memory of the Markov-optimal predictor, per batch of sequences."""
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


def markov_optimal_bits(p: np.ndarray, pi: np.ndarray, alphabet: str, input_ids: np.ndarray,
                        labels: np.ndarray, token_texts: list[str], special_ids: np.ndarray) -> np.ndarray:
    """Bits per masked token of the optimal predictor of a synthetic Markov source.

    For every masked position, ``-log2 P(true token | every visible token of its sequence)``
    under the source itself (an order-``o`` chain with transition matrix ``p`` over contexts
    of ``o`` symbols, stationary ``pi``), by forward-backward over the symbols: a masked
    token's symbols, and those of other masked tokens, are summed over; its length in
    symbols is taken as known (it is for char tokens and full k-mers). The sequence is
    preceded by ``o`` unseen symbols in the stationary distribution, which is how
    ``synthetic:markov`` starts a record.

    Parameters
    ----------
    input_ids, labels
        (S, T) the evaluation inputs (masked positions hold [MASK]) and the true ids there
        (-100 elsewhere), as in the masks store's distribution set.
    token_texts
        Text of every id (char and k-mer tokenizers: the symbols it stands for).

    Returns
    -------
    (P,) numpy.ndarray in the masks store's position order (sequence, then position).
    """
    # Sequences in batches: forward and backward keep (symbols x sequences x contexts) floats.
    n_sym = max(1, max((len(t) for t in token_texts), default=1)) * input_ids.shape[1]
    batch = max(1, int(OPTIMAL_MEMORY_BYTES // (2 * 8 * n_sym * p.shape[0])))
    parts = [_optimal_batch(p, pi, alphabet, input_ids[i:i + batch], labels[i:i + batch], token_texts,
                            special_ids) for i in range(0, len(input_ids), batch)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _optimal_batch(p: np.ndarray, pi: np.ndarray, alphabet: str, input_ids: np.ndarray,
                   labels: np.ndarray, token_texts: list[str], special_ids: np.ndarray) -> np.ndarray:
    a = len(alphabet)
    n = p.shape[0]
    sym = {c: i for i, c in enumerate(alphabet)}
    lut = [[sym.get(c, -1) for c in t] for t in token_texts]
    specials = set(int(x) for x in special_ids)
    # Lay every sequence out as symbols: (S, L) known symbol or -1; spans of masked tokens.
    rows: list[list[int]] = []
    spans: list[tuple[int, int, int, list[int]]] = []  # (row, start, stop, true symbols)
    for r, (ids, lab) in enumerate(zip(input_ids, labels, strict=True)):
        out: list[int] = []
        for t, (i, y) in enumerate(zip(ids.tolist(), lab.tolist(), strict=True)):
            if y >= 0:
                true = lut[y]
                spans.append((r, len(out), len(out) + len(true), true))
                out.extend([-1] * len(true))
            elif i not in specials and t > 0:
                out.extend(lut[i])
        rows.append(out)
    length = max((len(x) for x in rows), default=0)
    sym_rows = np.full((len(rows), length), -1, dtype=np.int64)  # padding: unseen, sums to 1
    for r, x in enumerate(rows):
        sym_rows[r, : len(x)] = x
    S = len(rows)
    head = n // a  # contexts without their oldest symbol
    pr = p.reshape(a, head, a)  # [oldest, rest, next]

    def step(alpha: np.ndarray, y: np.ndarray) -> np.ndarray:
        # alpha (S, n) over the context before the symbol; y (S,) observed symbol or -1
        nxt = np.einsum("sdr,dry->sry", alpha.reshape(S, a, head), pr)  # (S, rest, next)
        known = y >= 0
        if known.any():
            keep = np.zeros((S, 1, a))
            keep[~known] = 1.0
            keep[np.flatnonzero(known), 0, y[known]] = 1.0
            nxt = nxt * keep
        return nxt.reshape(S, n)

    # Forward with per-step scaling; alphas kept (log scale separately) for the span starts.
    alphas = np.empty((length + 1, S, n))
    log_scale = np.zeros((length + 1, S))
    alphas[0] = pi[None, :]
    for t in range(length):
        nxt = step(alphas[t], sym_rows[:, t])
        z = nxt.sum(1, keepdims=True)
        alphas[t + 1] = nxt / z
        log_scale[t + 1] = log_scale[t] + np.log(z[:, 0])
    # Backward: beta_t(s) = P(symbols after t | context s at t), scaled to sum 1 per row.
    betas = np.empty((length + 1, S, n))
    betas[length] = 1.0
    for t in range(length - 1, -1, -1):
        y = sym_rows[:, t]
        # beta_t[c] = sum_y p[c, y] [y allowed] beta_{t+1}[(c*a + y) % n]
        nb = betas[t + 1].reshape(S, head, a)  # next state = (rest, y)
        allowed = np.ones((S, a))
        known = y >= 0
        allowed[known] = 0.0
        allowed[np.flatnonzero(known), y[known]] = 1.0
        b = np.einsum("dry,sry,sy->sdr", pr, nb, allowed).reshape(S, n)
        betas[t] = b / b.sum(1, keepdims=True)
    bits = np.empty(len(spans))
    for j, (r, u, v, true) in enumerate(spans):
        # P(true symbols, rest | visible) / P(rest | visible): deterministic path from each context
        state = np.arange(n)
        weight = alphas[u, r].copy()  # (n,) context before the span
        for y in true:
            weight = weight * p[state, y]
            state = (state * a + y) % n
        num = np.zeros(n)
        np.add.at(num, state, weight)
        with_target = float(num @ betas[v, r])
        total = float(alphas[u, r] @ _beta_unknown(betas, pr, u, v, r, a, head, n))
        bits[j] = -np.log2(with_target / total)
    return bits


def _beta_unknown(betas: np.ndarray, pr: np.ndarray, u: int, v: int, r: int, a: int, head: int,
                  n: int) -> np.ndarray:
    """P(symbols from u on | context at u), the span u..v-1 summed over, scaled like betas[v]."""
    b = betas[v, r]
    for _ in range(v - u):
        b = np.einsum("dry,ry->dr", pr, b.reshape(head, a)).reshape(n)
    return b
