"""A study's results as one lazy ``xarray.DataTree`` (``toolkit.open_results``).

Everything is opened through :mod:`toolkit.store` (schema-validated) as Dask-backed
arrays; nothing is read until a value is computed, so the tree of a paper-scale
study (hundreds of GB of log-probabilities) opens in a second.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from toolkit import store
from toolkit.errors import StoreError

log = logging.getLogger(__name__)

_KINDS = ("predictions", "embeddings", "fisher")
# Dims whose labels mean the same thing in every run: runs are joined on them (outer join,
# NaN where a run lacks a label). Any other dim (positions, vocabulary, tokens, ...) differs
# in meaning between corpora and tokenizers, so runs are combined only when its size agrees.
_LABELLED = {"member", "estimator", "step", "group", "parameter"}


def _currency(root: Path) -> tuple[dict[str, list[int]] | None, str]:
    """From ``study.json`` and the unit model: run -> seeds of the members whose evaluate
    unit is done, and why the summary is not current ('' when it is). ``(None, ...)``
    when the folder has no study.json (stores written by the library, not a run)."""
    if not (root / "study.json").exists():
        return None, ""
    from toolkit.config import load_study
    from toolkit.study import Member
    from toolkit.units import unit_states

    study = load_study(root / "study.json")
    if study.root != root:  # a moved or copied folder: judge the stores where they are now
        import dataclasses

        study = dataclasses.replace(study, output_dir=str(root))
    states = unit_states(study)
    done: dict[str, list[int]] = {}
    for (stage, key), st in states.items():
        if stage == "evaluate" and st.state == "done":
            m = Member.parse(key)
            done.setdefault(m.run, []).append(m.seed)
        elif stage == "evaluate" and st.state == "stale":
            log.warning("member %s left out: its outputs are stale (%s)", key, st.reason)
    summary = states[("analyse", "summary")]
    return done, "" if summary.state == "done" else f"{summary.state}: {summary.reason}"


def _members(root: Path) -> dict[str, list[int]]:
    """Run -> seeds of the complete members (evaluate marker), runs in study order."""
    base = root / "members"
    found: dict[str, list[int]] = {}
    if base.is_dir():
        for run_dir in sorted(p for p in base.iterdir() if p.is_dir()):
            seeds = sorted(int(p.name[4:]) for p in run_dir.glob("seed*")
                           if p.name[4:].isdigit() and (p / "evaluate.complete.json").exists())
            if seeds:
                found[run_dir.name] = seeds
    # Run order: the study's (from study.json, the dispatcher's copy), else the folder's.
    runs: list[str] = []
    study_json = root / "study.json"
    if study_json.exists():
        try:
            runs = list(json.loads(study_json.read_text(encoding="utf-8")).get("runs", {}))
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s); runs in folder order", study_json, e)
    order = [r for r in runs if r in found] + [r for r in found if r not in runs]
    return {r: found[r] for r in order}


def _param_key(name: str) -> tuple[int, int]:
    """Network position of a parameter tensor from its name (bert.encoder.layer.3.* -> (1, 3))."""
    match = re.search(r"(?:^|\.)layer\.(\d+)\.", name)
    if match:
        return (1, int(match.group(1)))
    return (0, 0) if "embeddings" in name else (2, 0)


def _block_key(name: str) -> tuple[int, int, str]:
    """embeddings, layer.0, layer.1, ..., head: the order of the network."""
    if name.startswith("layer."):
        head, _, _ = name[6:].partition(".")
        return (1, int(head) if head.isdigit() else 0, name)
    return (0 if name == "embeddings" else 2, 0, name)


def _run_dataset(root: Path, run: str, seeds: list[int], kind: str) -> Any:
    """One run's stores of ``kind`` stacked along a new ``member`` dim (labelled by seed)."""
    import xarray as xr

    parts = []
    for seed in seeds:
        # Sizes only, to keep opening lazy: a damaged chunk then fails its crc32c when read.
        ds = store.open_dataset(root / "members" / run / f"seed{seed}" / f"{kind}.zarr", kind,
                                chunks={}, verify="size")
        # target (predictions) and parameter_group (fisher) are shared by the members of a run
        per_member = [n for n in ds.data_vars if n not in ("target", "parameter_group")]
        ds = ds.drop_attrs(deep=False)
        parts.append(ds.assign({n: ds[n].expand_dims(member=[seed]) for n in per_member}))
    out = xr.concat(parts, dim="member", data_vars="minimal", coords="minimal", join="outer",
                    compat="override", combine_attrs="override")
    out["member"].attrs.update(description="initialisation seed of the ensemble member")
    return out


def _diagonal_dataset(root: Path, run: str, seeds: list[int]) -> Any:
    """One run's stored Fisher diagonals (``fisher.zarr/diagonal/``) stacked along ``member``;
    None when no member stored any (``analysis.fisher_diagonal = "none"``)."""
    import xarray as xr

    parts = []
    for seed in seeds:
        path = root / "members" / run / f"seed{seed}" / "fisher.zarr"
        # Sizes only, as in _run_dataset: opening stays lazy, chunks are checked when read.
        if not store.open_store(path, "fisher", verify="size").attrs.get("diagonal_parameters"):
            continue
        labels = store.open_dataset(path, "fisher", chunks={}, verify="none")
        ds = store.open_dataset(path, "fisher", chunks={}, group="diagonal", verify="none")
        ds = ds.assign_coords(estimator=labels["estimator"].values, step=labels["step"].values)
        parts.append(ds.drop_attrs(deep=False).expand_dims(member=[seed]))
    if not parts:
        return None
    out = xr.concat(parts, dim="member", join="outer", combine_attrs="override")
    out["member"].attrs.update(description="initialisation seed of the ensemble member")
    return out


def _combinable(sets: dict[str, Any]) -> bool:
    sizes = [{d: n for d, n in ds.sizes.items() if d not in _LABELLED} for ds in sets.values()]
    return all(s == sizes[0] for s in sizes)


def open_results(study_dir: str | Path, *, allow_stale: bool = False) -> Any:
    """Open a study's results as a lazy :class:`xarray.DataTree`.

    Reads the study folder alone (no study file needed): ``summary.zarr`` and the
    stores of every member whose evaluation is done and current (the unit model of
    :mod:`toolkit.units`, judged from the folder's ``study.json``; members whose
    outputs are stale are left out with a warning). A summary that no longer matches
    the study (members added, a setting changed, an input rerun) is refused unless
    ``allow_stale``. Every variable is Dask-backed and keeps the ``units`` and
    ``description`` attributes of its schema (``storage_schemas/``).

    Groups
    ------
    ``/summary``
        The analysed summary (``toolkit analyse``): dims ``run``, ``top_p``, ``k``,
        ``group``, ``estimator``, ``block``, ... (storage_schemas/summary.json).
    ``/predictions``
        ``log_probs`` (run, member, position, vocab), natural-log softmax at each masked
        position; ``target`` (run, position).
    ``/embeddings``
        ``word_embeddings`` (run, member, token, dim); ``contextual`` (run, member,
        contextual_sequence, dim).
    ``/fisher``
        ``fisher_trace`` (run, member, estimator, step, group) and ``parameter_trace``
        (run, member, estimator, step, parameter); runs joined on the step and group
        labels, NaN where a run has no such step or block.
    ``/fisher_diagonal/<run>``
        The full Fisher diagonals a run's members stored (``analysis.fisher_diagonal``):
        one variable per parameter tensor, named as in ``model.named_parameters()``,
        dims (member, estimator, step, ``<parameter>[0]``, ...), float32, one Dask chunk
        per estimator, step and tensor (or block of word-embedding rows), so selecting
        one tensor reads only its chunks. Absent when no member stored a diagonal.

    The ``member`` coordinate is the initialisation seed (member id ``<run>/seed<N>``).
    Runs whose vocabulary size, position count or embedding shape differ cannot share
    an array: then each run is a sub-group (``/predictions/<run>``,
    ``/embeddings/<run>``) holding the same variable names without the ``run`` dim.
    Missing members of a combined group are NaN.

    Parameters
    ----------
    study_dir
        The study folder (``StudyConfig.root``, e.g. ``studies/demo``).
    allow_stale
        Open a summary that is not current anyway; ``tree.attrs["summary_stale"]`` then
        says why it is not.

    Returns
    -------
    xarray.DataTree

    Raises
    ------
    StoreError
        The folder holds neither a summary nor a complete member, the summary is stale
        (and not ``allow_stale``), or a store does not match its schema.

    Examples
    --------
    >>> tree = toolkit.open_results("studies/demo")
    >>> s = tree["summary"].to_dataset()
    >>> s.js_distance.sel(run="dna-6mer").plot(x="top_p")              # one run, all p
    >>> s.topk_overlap.sel(k=10).to_series()                           # one k, every run
    >>> s.fisher_share.plot.line(x="group", hue="run")
    >>> lp = tree["predictions/dna-6mer"].to_dataset().log_probs       # per-run sub-group
    >>> pair = lp.sel(member=[1, 2])                                   # a member pair
    >>> (pair.isel(member=0) - pair.isel(member=1)).mean("vocab").compute()
    >>> tree["fisher"].to_dataset().fisher_trace.sel(estimator="batch").isel(step=-1)
    >>> words = tree["fisher_diagonal/dna-6mer"]["bert.embeddings.word_embeddings.weight"]
    >>> words.sel(estimator="batch").isel(step=-1).sum(words.dims[-1])  # per-token Fisher
    """
    import xarray as xr

    root = Path(study_dir).expanduser().resolve()
    if not root.is_dir():
        raise StoreError(f"{root}: no study folder here; give the study's output folder "
                         "(e.g. studies/demo)")
    runs = _members(root)
    current, stale = _currency(root)
    if current is not None:
        runs = {r: [s for s in seeds if s in current.get(r, [])] for r, seeds in runs.items()}
        runs = {r: seeds for r, seeds in runs.items() if seeds}
    nodes: dict[str, Any] = {}
    if stale and (root / "summary.zarr").exists() and not allow_stale:
        raise StoreError(f"{root / 'summary.zarr'}: the summary is {stale}; run `toolkit run "
                         f"{root}` to bring it up to date, or open_results(..., allow_stale=True)")
    if (root / "summary.zarr").exists():
        summary = store.open_dataset(root / "summary.zarr", "summary", chunks={})
        nodes["/summary"] = summary
        first = [str(r) for r in summary["run"].values if str(r) in runs]
        runs = {r: runs[r] for r in first + [r for r in runs if r not in first]}
    if not runs and not nodes:
        raise StoreError(f"{root}: no summary.zarr and no complete member (members/<run>/seed<N>/"
                         "evaluate.complete.json); run `toolkit run STUDY` first")
    for kind in _KINDS:
        sets = {run: _run_dataset(root, run, seeds, kind) for run, seeds in runs.items()}
        if not sets:
            continue
        if kind == "fisher" or _combinable(sets):
            nodes[f"/{kind}"] = xr.concat(
                [ds.expand_dims(run=[run]) for run, ds in sets.items()], dim="run", join="outer",
                data_vars="all", coords="minimal", compat="override", combine_attrs="override",
                fill_value={"parameter_group": ""})  # a string array cannot hold NaN
            if kind == "fisher":  # the outer join sorted the labels; back to network order
                seen = list(dict.fromkeys(str(p) for d in sets.values() for p in d["parameter"].values))
                ds = nodes[f"/{kind}"]
                nodes[f"/{kind}"] = ds.reindex(
                    group=sorted((str(g) for g in ds["group"].values), key=_block_key),
                    parameter=sorted(seen, key=lambda p: (_param_key(p), seen.index(p))))
        else:
            nodes[f"/{kind}"] = xr.Dataset()
            for run, ds in sets.items():
                nodes[f"/{kind}/{run}"] = ds.assign_coords(run=run)
    diagonals = {run: _diagonal_dataset(root, run, seeds) for run, seeds in runs.items()}
    if any(ds is not None for ds in diagonals.values()):
        nodes["/fisher_diagonal"] = xr.Dataset()
        for run, ds in diagonals.items():
            if ds is not None:
                nodes[f"/fisher_diagonal/{run}"] = ds.assign_coords(run=run)
    tree = xr.DataTree.from_dict(nodes)
    if stale and (root / "summary.zarr").exists():
        tree.attrs["summary_stale"] = stale
    tree.attrs.update(study_dir=str(root), runs=list(runs),
                      members=[f"{r}/seed{s}" for r, seeds in runs.items() for s in seeds])
    return tree
