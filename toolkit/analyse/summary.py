"""The summary (``summary.zarr``): every run's measures laid onto study-wide coordinates.

:func:`analyse_study` picks the done members, takes each run's measure families either
from their shards (the ``analyse`` unit after the ``measure`` array,
:mod:`toolkit.analyse.shards`) or by computing them in this process, adds the data-side
entropy profile of each run and writes the summary through :func:`toolkit.store.writing`
(schema ``storage_schemas/summary.json``). Both ways give the same summary bit for bit.
The only ``compute`` of the analysis happens in the families, at the edge; the numerics
live in :mod:`toolkit.metrics`.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import __version__, store
from toolkit.analyse.common import NAN, log, resolve_definitions, spread_ddof
from toolkit.analyse.fisher import PAPER_GROUPS, fisher_arrays, fisher_diagonal_arrays
from toolkit.analyse.profile import profile_run
from toolkit.analyse.shards import FAMILIES, compute_family, read_shard, shard_key
from toolkit.config import StudyConfig
from toolkit.errors import StoreError
from toolkit.plumbing import network_order
from toolkit.progress import format_duration
from toolkit.study import Layout, Member, members

Scheduler = Callable[[StudyConfig], contextlib.AbstractContextManager[Any]]
"""Opens where the Dask graphs of the measures compute (e.g.
:func:`toolkit.dispatch.dask_cluster.analysis_scheduler`); the default leaves Dask as it is."""

# --------------------------------------------------------------------------- members


def complete_members(study: StudyConfig, done_ids: list[Member]
                     ) -> tuple[dict[str, list[Member]], list[Member]]:
    """Done members per run (in seed order) and the members left out.

    ``done_ids`` are the members whose evaluate unit is done (the caller asks the unit
    model, :func:`toolkit.units.done_members`: marker present and nothing it consumed
    changed since). A member whose outputs are stale is left out, never analysed.

    Raises
    ------
    StoreError
        When no member of the study is done: nothing can be analysed.
    """
    ok = set(done_ids)
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



# --------------------------------------------------------------------------- the summary



def analyse_study(study: StudyConfig, done_members: list[Member], *,
                  from_shards: bool = False, scheduler: Scheduler | None = None,
                  path: Path | None = None) -> Path:
    """Analyse every done member of a study and write ``summary.zarr``.

    Members whose evaluation is not done are left out and logged; a run with fewer than
    two done members gets NaN for the pairwise measures.

    Parameters
    ----------
    study
        The study; its stores are read from ``Layout(study)``.
    done_members
        The members to analyse: those whose evaluate unit is done
        (:func:`toolkit.units.done_members`; the analysis does not ask the unit model itself).
    from_shards
        Read each run's measure families from their shards (written by the ``measure``
        units) instead of computing them here; a shard computed from other members than
        ``done_members`` is refused.
    scheduler
        Where the Dask graphs compute while families are computed here (the caller's
        choice, e.g. SLURM workers); default: Dask's own.
    path
        Where to write the summary (default ``Layout(study).summary``).

    Returns
    -------
    Path
        The summary; open it with ``toolkit.open_results(study.root)`` or
        ``store.open_dataset(path, "summary", chunks={})``.

    Raises
    ------
    StoreError
        No member is done, a shard is missing or stale, or a store does not match its schema.
    """
    # Every std of this summary (distributions, embeddings, Fisher) uses the resolved ddof.
    with spread_ddof(resolve_definitions(study.analysis)["spread_ddof"]):
        done, missing = complete_members(study, done_members)
        if from_shards:
            families = _read_families(study, done)
        else:
            with (scheduler or (lambda s: contextlib.nullcontext()))(study):
                families = _compute_families(study, done)
        return _write_summary(study, done, missing, families, path or Layout(study).summary)


def _compute_families(study: StudyConfig, done: dict[str, list[Member]]) -> dict[str, dict[str, Any]]:
    """run -> family -> results, computed in this process."""
    out: dict[str, dict[str, Any]] = {}
    t0 = time.perf_counter()
    runs = list(study.runs)
    for r, run in enumerate(runs):
        out[run] = {f: compute_family(study, run, f, done[run]) for f in FAMILIES}
        elapsed = time.perf_counter() - t0
        log.info("analysed run %d/%d (%s, %d members); %s elapsed, about %s left",
                 r + 1, len(runs), run, len(done[run]), format_duration(elapsed),
                 format_duration(elapsed / (r + 1) * (len(runs) - r - 1)))
    return out


def _read_families(study: StudyConfig, done: dict[str, list[Member]]) -> dict[str, dict[str, Any]]:
    """run -> family -> results, read from the shards; refused when a shard was computed
    from other members than the run's done members (its measure unit is stale)."""
    layout = Layout(study)
    out: dict[str, dict[str, Any]] = {}
    for run in study.runs:
        out[run] = {}
        want = [m.id for m in done[run]]
        for family in FAMILIES:
            ids, result = read_shard(layout, run, family)
            if ids != want:
                raise StoreError(
                    f"{layout.shard(run, family)}: computed from members "
                    f"[{', '.join(ids)}], but run {run}'s done members are [{', '.join(want)}]; "
                    f"rerun its measure unit (`toolkit run STUDY`, or --force measure:{shard_key(run, family)})")
            out[run][family] = result
    return out


def _write_summary(study: StudyConfig, done: dict[str, list[Member]], missing: list[Member],
                   families: dict[str, dict[str, Any]], path: Path) -> Path:
    """Lay every run's families and profile onto the summary's coordinates and write it."""
    a = study.analysis
    runs = list(study.runs)
    n_r, n_p, n_k = len(runs), len(a.top_p), len(a.topk)
    results: dict[str, dict[str, Any]] = {}
    fisher: dict[str, dict[str, Any]] = {}
    diagonals: dict[str, dict[str, Any]] = {}
    losses: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {}
    profiles = {run: profile_run(study, run) for run in runs}
    for run in runs:
        fam = families[run]
        res: dict[str, Any] = {"n_members": len(done[run])}
        if done[run]:
            res.update(fam["distributions"])
            res.update(fam["embeddings"])
            res["weight_distance"], res["weight_distance_std"] = fam["training"]["weight_distance"]
            fisher[run] = fam["fisher"]["shares"]
            diagonals[run] = fam["fisher"]["diagonal"]
            losses[run] = fam["training"]["losses"]
        results[run] = res
    # ---- coordinates shared by every run
    vocab = [int(results[r].get("vocab_size", profiles[r]["vocab_size"])) for r in runs]
    n_rank = max(vocab)
    estimators = list(dict.fromkeys(
        [e for e in a.fisher_estimators] + [e for f in fisher.values() for e in f["shares"]]))
    blocks = sorted({b for f in fisher.values() for mem in next(iter(f["shares"].values()), [])
                     for b in mem} | {"embeddings", "head"}, key=network_order)
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
    data.update(fisher_arrays(fisher, runs, estimators, blocks, n_flow))
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
    with store.writing(path, "summary", attrs, overwrite=True) as group:
        for name, values in data.items():
            store.create_array(group, "summary", name, data=values)
    log.info("wrote %s (%d runs, %d members analysed, %d missing)", path, n_r,
             len(analysed), len(missing))
    return path
