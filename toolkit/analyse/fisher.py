"""Where the empirical Fisher information sits in one run's members.

- **Shares.** Per member, estimator and snapshot, the Fisher trace of each block
  (``embeddings``, ``layer.<i>``, ``head``) over the sum of all blocks; averaged over
  members per group of the paper's figure (embeddings, transformer, head), per block, and
  over the training flow.
- **Per-token Fisher** (from the stored diagonals, ``fisher.zarr/diagonal/``). Token v's
  Fisher is the sum of the diagonal over its word-embedding row (the evaluated checkpoint, ``analysis.checkpoint``: the last step
  entry of the store). Per member it is compared, by Spearman rank
  correlation over tokens, with the token's frequency in the training split of the
  token store (tokens that occur there) and with its predictability: the member's mean
  NLL at the 'distribution' positions whose target is v (tokens that are a target at
  least once). Binned curves: the tokens are split into ``N_TOKEN_BINS`` equal-count
  bins by frequency rank (ties by token id), or by the member's NLL; per bin, the mean
  of the token Fisher relative to the member's mean token Fisher (1 = an average token).
- **Seed agreement.** Per block (``embeddings``, ``layer.<i>``, ``head``) and estimator,
  the Spearman correlation between the final-weight diagonals of two members over the
  block's stored parameters whose Fisher is non-zero in at least one of the two, for
  every member pair. Parameters the Fisher data never reach (position rows past the
  evaluation length, tokens absent from the Fisher set) are exactly zero in every member
  and would otherwise inflate the agreement with ties that say nothing about the seeds.

Every per-member number is averaged over members (std over members), every pairwise
one over pairs (std over pairs). Token counts, row sums and per-token NLL sums are Dask
reductions over the stores' chunks; only per-token vectors and one block's diagonal per
member are held in memory (ranks need the whole vector).
"""

from __future__ import annotations

import itertools
import math
import warnings
from typing import Any

import numpy as np

from toolkit import store
from toolkit.analyse.common import NAN, log, mean_std
from toolkit.config import StudyConfig
from toolkit.study import Layout, Member

N_TOKEN_BINS = 10
WORDS = "bert.embeddings.word_embeddings.weight"
PAPER_GROUPS = ("embeddings", "transformer", "head")

def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float(np.dot(ra, ra)) * float(np.dot(rb, rb)))
    return float(np.dot(ra, rb) / den) if den > 0 else NAN


def train_token_counts(g: Any, vocab: int) -> np.ndarray:
    """Occurrences of each token id in the training split (split 0) of an open token store
    (``tokens``, ``offsets``, ``split``), chunk by chunk: (V,)."""
    import dask.array as da

    offsets = np.asarray(g["offsets"][...], dtype=np.int64)  # (R + 1,)
    split = np.asarray(g["split"][...])  # (R,)
    tok = da.from_zarr(g["tokens"])  # (N,) chunked as stored

    def count(block: np.ndarray, block_info: Any = None) -> np.ndarray:
        lo = block_info[0]["array-location"][0][0]
        rec = np.searchsorted(offsets, np.arange(lo, lo + block.size), side="right") - 1  # record of each token
        return np.bincount(block[split[rec] == 0].astype(np.int64), minlength=vocab)[None, :vocab]

    per_block = da.map_blocks(count, tok, new_axis=1, chunks=((1,) * tok.numblocks[0], (vocab,)),
                              dtype=np.int64)  # (blocks, V)
    return np.asarray(per_block.sum(axis=0).compute(), dtype=np.int64)


def token_nll(g: Any, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """Per target token of an open predictions store (``log_probs``, ``target``), chunk by
    chunk: (positions, mean NLL in nats, NaN where never a target), both (V,)."""
    import dask.array as da

    lp = da.from_zarr(g["log_probs"])  # (P, V) natural-log probabilities
    target = da.from_zarr(g["target"]).rechunk((lp.chunks[0],)).astype(np.int64)  # (P,)
    if lp.numblocks[1] != 1:
        lp = lp.rechunk({1: -1})  # whole rows: each block then holds every target's column

    def pick(block: np.ndarray, t: np.ndarray) -> np.ndarray:
        return -np.take_along_axis(block, t, axis=1)[:, 0].astype(np.float64)  # (p,)

    # target as (P, 1): map_blocks aligns trailing dims, so a 1-D target would pair with vocab
    nll = da.map_blocks(pick, lp, target[:, None], drop_axis=1, dtype=np.float64)  # (P,)
    n, total = da.compute(da.bincount(target, minlength=vocab), da.bincount(target, nll, minlength=vocab))
    n, total = np.asarray(n)[:vocab], np.asarray(total)[:vocab]
    with np.errstate(invalid="ignore", divide="ignore"):
        return n, np.where(n > 0, total / n, NAN)


def _binned(order_key: np.ndarray, rel: np.ndarray, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Equal-count bins of the tokens sorted by ``order_key`` (ties by token id): per bin the
    mean of ``x`` and of ``rel``, (N_TOKEN_BINS,) each, NaN for empty bins."""
    idx = np.lexsort((np.arange(order_key.size), order_key))
    xs, rs = np.full(N_TOKEN_BINS, NAN), np.full(N_TOKEN_BINS, NAN)
    for b, part in enumerate(np.array_split(idx, N_TOKEN_BINS)):
        if part.size:
            xs[b], rs[b] = float(x[part].mean()), float(rel[part].mean())
    return xs, rs


def fisher_diagonal_run(study: StudyConfig, run: str, ms: list[Member]) -> dict[str, Any]:
    """Per-token Fisher and seed agreement of one run (module docstring); NaN where the
    members stored no diagonal of the word embeddings or of a block.

    Returns
    -------
    dict
        ``estimators`` (names), ``blocks`` (names), per estimator index lists of per-member
        values (``spearman_frequency``, ``spearman_nll``, ``frequency_bin_fisher``,
        ``nll_bin_fisher``, ``nll_bin_nll``), ``frequency_bin_count`` (N_TOKEN_BINS,) and
        ``seed_spearman`` {(estimator, block): [one value per member pair]}.
    """
    import dask.array as da

    layout = Layout(study)
    out: dict[str, Any] = {"spearman_frequency": {}, "spearman_nll": {}, "frequency_bin_fisher": {},
                           "nll_bin_fisher": {}, "nll_bin_nll": {}, "frequency_bin_count": None,
                           "seed_spearman": {}}
    stores = []
    for m in ms:
        g = store.open_store(layout.member_store(m, "fisher"), "fisher", verify="none")  # fisher_run verified it
        if g.attrs.get("diagonal_parameters"):
            stores.append((m, g))
    if not stores:
        return out
    counts: np.ndarray | None = None
    blocks: dict[tuple[str, str], list[np.ndarray]] = {}
    for m, g in stores:
        est = [str(e) for e in g["estimator"][...]]
        last = int(g["step"].shape[0]) - 1  # the evaluated checkpoint is the last step entry
        params = [str(p) for p in g["parameter"][...]]
        groups = dict(zip(params, (str(x) for x in g["parameter_group"][...]), strict=True))
        stored = [str(p) for p in g.attrs["diagonal_parameters"]]
        if WORDS in stored:
            words = da.from_zarr(g[f"diagonal/{WORDS}"])  # (E, S, V, d), chunks of token rows
            vocab = int(words.shape[2])
            if counts is None:
                tokens = store.open_store(layout.run_tokens_store(run), "tokens",
                                          verify="size")  # chunks carry crc32c
                counts = train_token_counts(tokens, vocab)
            pred = store.open_store(layout.member_store(m, "predictions"), "predictions",
                                    verify="none")  # distribution_run verified it
            n_pos, nll = token_nll(pred, vocab)
            rows = np.asarray(words[:, last].sum(axis=-1, dtype=np.float64).compute())  # (E, V)
            seen, hit = counts > 0, n_pos > 0
            for e, name in enumerate(est):
                f = rows[e]
                rel = f / f[seen].mean() if f[seen].mean() > 0 else np.full_like(f, NAN)
                out["spearman_frequency"].setdefault(name, []).append(spearman(f[seen], counts[seen]))
                out["spearman_nll"].setdefault(name, []).append(spearman(f[hit], nll[hit]))
                cnt, fb = _binned(counts[seen], rel[seen], counts[seen].astype(np.float64))
                out["frequency_bin_count"] = cnt
                out["frequency_bin_fisher"].setdefault(name, []).append(fb)
                xb, nb = _binned(nll[hit], rel[hit], nll[hit])
                out["nll_bin_nll"].setdefault(name, []).append(xb)
                out["nll_bin_fisher"].setdefault(name, []).append(nb)
        by_group: dict[str, list[str]] = {}
        for p in stored:
            by_group.setdefault(groups[p], []).append(p)
        for group, names in by_group.items():
            arrays = [da.from_zarr(g[f"diagonal/{p}"])[:, last].reshape(len(est), -1) for p in names]
            flat = np.asarray(da.concatenate(arrays, axis=1).compute())  # (E, parameters of the group)
            for e, name in enumerate(est):
                blocks.setdefault((name, group), []).append(flat[e])
    for key, vectors in blocks.items():
        out["seed_spearman"][key] = [spearman(a[live], b[live]) for a, b in itertools.combinations(vectors, 2)
                                     if (live := (a != 0) | (b != 0)).any()]
    return out


def fisher_diagonal_arrays(per_run: dict[str, dict[str, Any]], runs: list[str], estimators: list[str],
                           blocks: list[str]) -> dict[str, np.ndarray]:
    """Lay :func:`fisher_diagonal_run`'s results onto (run, estimator, token_bin / block)."""
    n_r, n_e, n_b = len(runs), len(estimators), len(blocks)
    shapes = {"fisher_token_spearman_frequency": (n_r, n_e), "fisher_token_spearman_nll": (n_r, n_e),
              "fisher_token_frequency_bin_fisher": (n_r, n_e, N_TOKEN_BINS),
              "fisher_token_nll_bin_fisher": (n_r, n_e, N_TOKEN_BINS),
              "fisher_seed_spearman": (n_r, n_e, n_b)}
    out: dict[str, np.ndarray] = {}
    for name, shape in shapes.items():
        out[name], out[f"{name}_std"] = np.full(shape, NAN), np.full(shape, NAN)
    out["fisher_token_frequency_bin_count"] = np.full((n_r, N_TOKEN_BINS), NAN)
    out["fisher_token_nll_bin_nll"] = np.full((n_r, n_e, N_TOKEN_BINS), NAN)
    out["token_bin"] = np.arange(N_TOKEN_BINS, dtype=np.int64)

    def put(name: str, index: tuple[int, ...], values: list[Any]) -> None:
        v = np.asarray(values, dtype=np.float64)
        if v.ndim == 1:
            out[name][index], out[f"{name}_std"][index] = mean_std(v)
        else:  # (members, bins): mean and std per bin
            for b in range(v.shape[1]):
                out[name][(*index, b)], out[f"{name}_std"][(*index, b)] = mean_std(v[:, b])

    for r, run in enumerate(runs):
        res = per_run.get(run)
        if not res:
            continue
        if res["frequency_bin_count"] is not None:
            out["fisher_token_frequency_bin_count"][r] = res["frequency_bin_count"]
        for e, est in enumerate(estimators):
            for key, name in (("spearman_frequency", "fisher_token_spearman_frequency"),
                              ("spearman_nll", "fisher_token_spearman_nll"),
                              ("frequency_bin_fisher", "fisher_token_frequency_bin_fisher"),
                              ("nll_bin_fisher", "fisher_token_nll_bin_fisher")):
                if res[key].get(est):
                    put(name, (r, e), res[key][est])
            if res["nll_bin_nll"].get(est):
                with warnings.catch_warnings():  # an empty bin (fewer tokens than bins) stays NaN
                    warnings.simplefilter("ignore", RuntimeWarning)
                    out["fisher_token_nll_bin_nll"][r, e] = np.nanmean(res["nll_bin_nll"][est], axis=0)
            for b, block in enumerate(blocks):
                pairs = res["seed_spearman"].get((est, block))
                if pairs:
                    put("fisher_seed_spearman", (r, e, b), pairs)
    return out


# --------------------------------------------------------------------------- Fisher


def fisher_run(study: StudyConfig, run: str, ms: list[Member]) -> dict[str, Any]:
    """Normalised Fisher shares of one run: per group, per block and over the flow.

    Each member's traces are normalised to sum to 1 over the groups (per estimator and
    step) before averaging over members, so members of different overall scale weigh
    the same. Returns per-member arrays keyed by estimator, and the step of each snapshot
    (NaN where members' snapshots at that index are from different steps, e.g. each
    member's own best checkpoint); :func:`fisher_arrays` pads them onto the
    study-wide coordinates.
    """
    layout = Layout(study)
    shares: dict[str, list[dict[str, np.ndarray]]] = {}  # estimator -> per member {block: (S,)}
    steps: list[np.ndarray] = []
    for m in ms:
        g = store.open_store(layout.member_store(m, "fisher"), "fisher")
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



def _paper_group(group: str) -> str:
    """'layer.N' collapses into 'transformer' (the paper's main figure)."""
    return "transformer" if group.startswith("layer.") else group


def fisher_arrays(per_run: dict[str, dict[str, Any]], runs: list[str], estimators: list[str],
                   blocks: list[str], n_flow: int) -> dict[str, np.ndarray]:
    """Pad each run's Fisher shares onto (run, estimator, flow step, group/block)."""
    n_r, n_e, n_g, n_b = len(runs), len(estimators), len(PAPER_GROUPS), len(blocks)
    out = {
        name: np.full(shape, NAN) for name, shape in (
            ("fisher_flow", (n_r, n_e, n_flow, n_g)), ("fisher_flow_std", (n_r, n_e, n_flow, n_g)),
            ("fisher_block_share", (n_r, n_b)), ("fisher_block_share_std", (n_r, n_b)),
            ("fisher_flow_step", (n_r, n_flow)))
    }
    for r, run in enumerate(runs):
        fr = per_run.get(run)
        if not fr:
            continue
        out["fisher_flow_step"][r, : len(fr["steps"])] = fr["steps"]
        for e, est in enumerate(estimators):
            member_shares = fr["shares"].get(est, [])
            if not member_shares:
                continue
            n_s = min(len(next(iter(s.values()))) for s in member_shares)
            for gi, group in enumerate(PAPER_GROUPS):
                # (members, S): collapse blocks into the paper's groups, per member
                per_member = np.stack([
                    sum((v[:n_s] for b, v in s.items() if _paper_group(b) == group),
                        np.zeros(n_s)) for s in member_shares])
                for si in range(n_s):
                    out["fisher_flow"][r, e, si, gi], out["fisher_flow_std"][r, e, si, gi] = (
                        mean_std(per_member[:, si]))
            if est == "batch":
                for bi, block in enumerate(blocks):
                    vals = [s[block][n_s - 1] for s in member_shares if block in s]
                    if vals:
                        out["fisher_block_share"][r, bi], out["fisher_block_share_std"][r, bi] = (
                            mean_std(vals))
    # The evaluated checkpoint = the last real flow step of each run (evaluate writes it last).
    last = np.full((n_r, n_e, n_g), NAN)
    last_std = np.full((n_r, n_e, n_g), NAN)
    for r in range(n_r):
        for e in range(n_e):
            filled = np.where(np.isfinite(out["fisher_flow"][r, e]).any(axis=1))[0]
            if filled.size:
                last[r, e] = out["fisher_flow"][r, e, filled[-1]]
                last_std[r, e] = out["fisher_flow_std"][r, e, filled[-1]]
    out["fisher_share_estimator"], out["fisher_share_estimator_std"] = last, last_std
    if "batch" in estimators:
        b = estimators.index("batch")
        out["fisher_share"], out["fisher_share_std"] = last[:, b], last_std[:, b]
    else:
        log.warning("no 'batch' Fisher estimator in the stores; fisher_share is NaN "
                    "(see fisher_share_estimator)")
        out["fisher_share"] = np.full((n_r, n_g), NAN)
        out["fisher_share_std"] = np.full((n_r, n_g), NAN)
    return out

