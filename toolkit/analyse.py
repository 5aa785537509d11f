"""Aggregate every member's stores into the study summary (``summary.zarr``).

For each run this module reads the complete members only (a member is complete
when its ``evaluate.complete.json`` marker exists) and computes the analyses of
docs/methods.md:

- output distributions (per member, then mean/std over members; pairwise JS
  distance after top-p truncation and argmax agreement, mean/std over pairs),
  lazily: predictions are opened as Dask arrays and reduced chunk by chunk, so no
  member's full ``(position, vocab)`` log-probabilities are ever held in memory;
- static and contextual embeddings (top-k overlap, local Spearman, Procrustes,
  CKA) for every member pair;
- Fisher shares per group, per block and over the training flow; from the stored
  Fisher diagonals, per-token Fisher against frequency and predictability and the
  agreement of the diagonals across seeds (:mod:`toolkit.analyse_fisher`);
- the weight-distance sanity check and the loss curves;
- the data-side entropy profile of the run's token store.

The only ``compute`` happens here, at the edge, right before the summary is
written through :func:`toolkit.store.writing` (schema ``storage_schemas/summary.json``).
The numerics live in :mod:`toolkit.metrics`.

Layout: this module picks the complete members, lays every run's results onto the
study-wide coordinates and writes the summary (:func:`analyse_study`); the per-run
computations live in :mod:`toolkit.analyse_runs` and are re-exported here.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import __version__, store
from toolkit.analyse_fisher import fisher_diagonal_arrays, fisher_diagonal_run
from toolkit.analyse_runs import NAN as NAN
from toolkit.analyse_runs import _mean_std, resolve_definitions, spread_ddof
from toolkit.analyse_runs import counting_run as counting_run
from toolkit.analyse_runs import distribution_run as distribution_run
from toolkit.analyse_runs import embedding_run as embedding_run
from toolkit.analyse_runs import fisher_run as fisher_run
from toolkit.analyse_runs import loss_run as loss_run
from toolkit.analyse_runs import profile_run as profile_run
from toolkit.analyse_runs import weights_run as weights_run
from toolkit.config import StudyConfig
from toolkit.errors import StoreError
from toolkit.progress import format_duration
from toolkit.study import Layout, Member, members

log = logging.getLogger(__name__)

PAPER_GROUPS = ("embeddings", "transformer", "head")


# --------------------------------------------------------------------------- members


def complete_members(study: StudyConfig, done_ids: list[Member] | None = None
                     ) -> tuple[dict[str, list[Member]], list[Member]]:
    """Done members per run (in seed order) and the members left out.

    A member counts when its evaluate unit is done (:mod:`toolkit.units`): marker
    present and nothing it consumed changed since. A member whose outputs are stale
    is left out, never analysed.

    Raises
    ------
    StoreError
        When no member of the study is done: nothing can be analysed.
    """
    from toolkit.units import done_members

    ok = set(done_members(study) if done_ids is None else done_ids)
    done: dict[str, list[Member]] = {run: [] for run in study.runs}
    missing: list[Member] = []
    for m in members(study):
        (done[m.run] if m in ok else missing).append(m)
    if not any(done.values()):
        raise StoreError(
            f"{study.root}: no member of study '{study.name}' has finished evaluation with the "
            f"current settings; run `toolkit run STUDY` (`toolkit status STUDY` shows what is "
            "pending or stale)")
    if missing:
        log.warning("analysing without %d member(s) whose evaluation is not done or stale: %s",
                    len(missing), ", ".join(m.id for m in missing))
    for run, ms in done.items():
        if len(ms) < 2:
            log.warning("run %s: %d complete member(s); pairwise measures are NaN", run, len(ms))
    return done, missing


# --------------------------------------------------------------------------- Fisher


def _paper_group(group: str) -> str:
    """'layer.N' collapses into 'transformer' (the paper's main figure)."""
    return "transformer" if group.startswith("layer.") else group


def _fisher_arrays(per_run: dict[str, dict[str, Any]], runs: list[str], estimators: list[str],
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
                        _mean_std(per_member[:, si]))
            if est == "batch":
                for bi, block in enumerate(blocks):
                    vals = [s[block][n_s - 1] for s in member_shares if block in s]
                    if vals:
                        out["fisher_block_share"][r, bi], out["fisher_block_share_std"][r, bi] = (
                            _mean_std(vals))
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

# --------------------------------------------------------------------------- the summary


def _block_order(name: str) -> tuple[int, int]:
    if name == "embeddings":
        return (0, 0)
    if name.startswith("layer."):
        return (1, int(name.split(".", 1)[1]))
    return (2, 0)


def analyse_study(study: StudyConfig, done_members: list[Member] | None = None) -> Path:
    """Analyse every complete member of a study and write ``summary.zarr``.

    Incomplete members (no evaluate marker) are left out and logged; a run with
    fewer than two complete members gets NaN for the pairwise measures.

    Parameters
    ----------
    study
        The study; its stores are read from ``Layout(study)``.
    done_members
        The members to analyse (default: those whose evaluate unit is done).

    Returns
    -------
    Path
        ``Layout(study).summary``; open it with ``toolkit.open_results(study.root)``
        or ``store.open_dataset(path, "summary", chunks={})``.

    Raises
    ------
    StoreError
        No member is complete, or a store does not match its schema.
    """
    # Every std of this summary (distributions, embeddings, Fisher) uses the resolved ddof.
    with spread_ddof(resolve_definitions(study.analysis)["spread_ddof"]):
        return _analyse_study(study, done_members)


def _analyse_study(study: StudyConfig, done_members: list[Member] | None) -> Path:
    """The body of :func:`analyse_study`, inside its ``spread_ddof`` block."""
    layout = Layout(study)
    a = study.analysis
    done, missing = complete_members(study, done_members)
    runs = list(study.runs)
    n_r, n_p, n_k = len(runs), len(a.top_p), len(a.topk)
    results: dict[str, dict[str, Any]] = {}
    fisher: dict[str, dict[str, Any]] = {}
    diagonals: dict[str, dict[str, Any]] = {}
    profiles: dict[str, dict[str, Any]] = {}
    losses: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    t0 = time.perf_counter()
    from toolkit.dispatch.dask_cluster import analysis_scheduler

    # dispatch.dask = "slurm": the Dask graphs run on SLURM worker jobs; "local": nothing changes.
    with analysis_scheduler(study):
        for r, run in enumerate(runs):
            ms = done[run]
            profiles[run] = profile_run(study, run)
            res: dict[str, Any] = {"n_members": len(ms)}
            if ms:
                res.update(distribution_run(study, run, ms))
                res.update(counting_run(study, run, res["model_cross_entropy_bits"],
                                        res["model_cross_entropy_bits_std"]))
                res.update(embedding_run(study, run, ms))
                res["weight_distance"], res["weight_distance_std"] = weights_run(study, run, ms)
                fisher[run] = fisher_run(study, run, ms)
                diagonals[run] = fisher_diagonal_run(study, run, ms)
                losses[run] = loss_run(study, ms)
            results[run] = res
            elapsed = time.perf_counter() - t0
            log.info("analysed run %d/%d (%s, %d members); %s elapsed, about %s left",
                     r + 1, n_r, run, len(ms), format_duration(elapsed),
                     format_duration(elapsed / (r + 1) * (n_r - r - 1)))

    # ---- coordinates shared by every run
    vocab = [int(results[r].get("vocab_size", profiles[r]["vocab_size"])) for r in runs]
    n_rank = max(vocab)
    estimators = list(dict.fromkeys(
        [e for e in a.fisher_estimators] + [e for f in fisher.values() for e in f["shares"]]))
    blocks = sorted({b for f in fisher.values() for mem in next(iter(f["shares"].values()), [])
                     for b in mem} | {"embeddings", "head"}, key=_block_order)
    n_flow = max([len(f["steps"]) for f in fisher.values()] + [1])
    n_order = max([len(p["conditional_entropy_bits"]) for p in profiles.values()] + [1])

    data: dict[str, np.ndarray] = {
        "run": np.array(runs), "top_p": np.array(a.top_p, np.float64),
        "k": np.array(a.topk, np.int64), "rank": np.arange(1, n_rank + 1, dtype=np.int64),
        "group": np.array(PAPER_GROUPS), "estimator": np.array(estimators),
        "block": np.array(blocks), "order": np.arange(1, n_order + 1, dtype=np.int64),
        "flow_step_index": np.arange(n_flow, dtype=np.int64),
        "corpus": np.array([study.runs[r].corpus for r in runs]),
        "tokenizer": np.array([study.runs[r].tokenizer for r in runs]),
        "kind": np.array([profiles[r]["kind"] or study.corpora[study.runs[r].corpus].kind
                          for r in runs]),
        "n_members": np.array([results[r]["n_members"] for r in runs], np.int64),
        "n_positions": np.array([results[r].get("n_positions", 0) for r in runs], np.int64),
        "vocab_size": np.array(vocab, np.int64),
    }
    spec = store.schema("summary")["arrays"]

    def per_run(name: str, shape: tuple[int, ...]) -> np.ndarray:
        arr = np.full((n_r, *shape), NAN)
        for i, run in enumerate(runs):
            v = results[run].get(name)
            if v is not None:
                v = np.asarray(v, np.float64)
                index: tuple[Any, ...] = (i, *(slice(0, s) for s in v.shape))
                arr[index] = v
        return arr

    extra = {"top_p": n_p, "k": n_k, "rank": n_rank}
    for name, s in spec.items():
        dims = s["dims"]
        if name in data or dims[0] != "run" or name.startswith(("fisher_", "loss_")):
            continue
        if name in profiles[runs[0]]:
            continue
        data[name] = per_run(name, tuple(extra[d] for d in dims[1:]))
    data.update(_fisher_arrays(fisher, runs, estimators, blocks, n_flow))
    data.update(fisher_diagonal_arrays(diagonals, runs, estimators, blocks))
    for name in ("unigram_entropy_bits", "unigram_entropy_bits_per_symbol",
                 "compression_bits_per_symbol", "analytic_entropy_rate_bits_per_symbol",
                 "symbols_per_token", "entropy_rate_bits_per_symbol", "entropy_rate_low", "entropy_rate_high",
                 "entropy_rate_heldout_bits_per_symbol", "entropy_rate_ppmd_bits_per_symbol"):
        data[name] = np.array([profiles[r][name] for r in runs], np.float64)
    data["entropy_rate_method"] = np.array([profiles[r]["entropy_rate_method"] for r in runs], dtype=str)
    data["entropy_rate_order"] = np.array([profiles[r]["entropy_rate_order"] for r in runs], np.int64)
    for name in ("conditional_entropy_bits", "conditional_entropy_bits_per_symbol", "context_coverage"):
        arr = np.full((n_r, n_order), NAN)
        for i, run in enumerate(runs):
            v = profiles[run][name][:n_order]
            arr[i, : len(v)] = v
        data[name] = arr
    if any(losses.values()):
        seeds = list(study.seeds)
        n_log = max(len(c[0]) for cur in losses.values() for c in cur.values())
        loss = np.full((n_r, len(seeds), n_log), NAN)
        step = np.full((n_r, len(seeds), n_log), NAN)
        for i, run in enumerate(runs):
            for seed, (st, lo) in losses.get(run, {}).items():
                step[i, seeds.index(seed), : len(st)] = st
                loss[i, seeds.index(seed), : len(lo)] = lo
        data.update(member=np.array(seeds, np.int64), loss_curve=loss, loss_step=step)

    coords = [n for n in ("corpus", "tokenizer", "kind", "n_members", "n_positions", "vocab_size",
                          "fisher_flow_step", "loss_step") if n in data]
    analysed = [m.id for ms in done.values() for m in ms]
    attrs = {
        "study": study.name,
        "members_analysed": analysed,
        "members_missing": [m.id for m in missing],
        "spearman_variant": a.spearman_variant,
        "definitions": resolve_definitions(a),
        "bootstrap": a.bootstrap,
        "confidence": a.confidence,
        "coordinates": " ".join(coords),
        "toolkit_version": __version__,
    }
    with store.writing(layout.summary, "summary", attrs, overwrite=True) as group:
        for name, values in data.items():
            store.create_array(group, "summary", name, data=values)
    log.info("wrote %s (%d runs, %d members analysed, %d missing)", layout.summary, n_r,
             len(analysed), len(missing))
    return layout.summary
