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
from typing import Any, NamedTuple

import numpy as np

from toolkit import store
from toolkit.errors import StoreError
from toolkit.plumbing import network_order
from toolkit.study import Layout, Member

log = logging.getLogger(__name__)

TOKEN_TEXT = "token_text"
"""Name of the string coordinate holding each vocabulary id's text (dims ``vocab``, ``token``)."""
# Parameter tensors whose leading dim is the vocabulary (word embeddings, output layer).
_VOCAB_PARAMETER = re.compile(r"(^|\.)word_embeddings\.weight$|(^|\.)(predictions|lm_head)\.(decoder\.)?(bias|weight)$")

_KINDS = ("predictions", "embeddings", "fisher")
# Dims whose labels mean the same thing in every run: runs are joined on them (outer join,
# NaN where a run lacks a label). Any other dim (positions, vocabulary, tokens, ...) differs
# in meaning between corpora and tokenizers, so runs are combined only when its size agrees.
_LABELLED = {"member", "estimator", "step", "group", "parameter"}


def _currency(layout: Layout) -> tuple[dict[str, list[int]] | None, str]:
    """From ``study.json`` and the unit model: run -> seeds of the members whose evaluate
    unit is done, and why the summary is not current ('' when it is). ``(None, ...)``
    when the folder has no study.json (stores written by the library, not a run)."""
    if not layout.study_file.exists():
        return None, ""
    from toolkit.config import load_study
    from toolkit.units import unit_states

    root = layout.root
    study = load_study(layout.study_file)
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


def _members(layout: Layout) -> dict[str, list[int]]:
    """Run -> seeds of the complete members (evaluate marker), runs in study order."""
    found: dict[str, list[int]] = {}
    for m in layout.member_folders():
        if layout.evaluate_marker(m).exists():
            found.setdefault(m.run, []).append(m.seed)
    # Run order: the study's (from study.json, the dispatcher's copy), else the folder's.
    runs: list[str] = []
    study_json = layout.study_file
    if study_json.exists():
        try:
            runs = list(json.loads(study_json.read_text(encoding="utf-8")).get("runs", {}))
        except (OSError, ValueError) as e:
            log.warning("%s: unreadable (%s); runs in folder order", study_json, e)
    order = [r for r in runs if r in found] + [r for r in found if r not in runs]
    return {r: found[r] for r in order}


_MEMBER_ATTRS = {"long_name": "initialisation seed of the member", "units": "1",
                 "description": "initialisation seed of the ensemble member (member id <run>/seed<N>)"}
_RUN_ATTRS = {"long_name": "run name", "units": "1", "description": "run name (study [runs.NAME])"}
_TEXT_ATTRS = {"long_name": "token text", "units": "1",
               "description": "the vocabulary entry of each token id (tokens.zarr token_text)"}
# The dim indexed by vocabulary id in each member store kind.
_VOCAB_DIM = {"predictions": "vocab", "embeddings": "token"}


def _token_texts(layout: Layout) -> dict[str, np.ndarray]:
    """tokenizer_hash -> the text of every id (``<U``), from the study's token stores.

    Token stores written before ``token_text`` existed are skipped (no coordinate then).
    """
    found: dict[str, np.ndarray] = {}
    for path in layout.token_stores():
        try:
            attrs = json.loads((path / "zarr.json").read_text(encoding="utf-8"))["attributes"]
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not a finished store; open_results reads members, not this
        digest = attrs.get("tokenizer_hash")
        if digest in found or not (path / "token_text" / "zarr.json").is_file():
            continue
        group = store.open_store(path, "tokens", verify="size")
        found[str(digest)] = store.fixed_strings(group["token_text"][...])
    return found


def _with_token_text(ds: Any, dim: str, text: np.ndarray | None, name: str = TOKEN_TEXT) -> Any:
    """``ds`` with coordinate ``name`` (the token text) on ``dim``, when the sizes agree."""
    if text is None or dim not in ds.dims:
        return ds
    if ds.sizes[dim] != len(text):
        log.warning("%s has %d entries, the tokenizer %d: no %s coordinate", dim, ds.sizes[dim],
                    len(text), name)
        return ds
    return ds.assign_coords({name: ((dim,), text, dict(_TEXT_ATTRS))})


def _run_dataset(layout: Layout, run: str, seeds: list[int], kind: str,
                 texts: dict[str, np.ndarray]) -> Any:
    """One run's stores of ``kind`` stacked along a new ``member`` dim (labelled by seed),
    with the token text of its tokenizer on the vocabulary dim (:data:`TOKEN_TEXT`)."""
    import xarray as xr

    parts = []
    digest = None
    for seed in seeds:
        # Sizes only, to keep opening lazy: a damaged chunk then fails its crc32c when read.
        ds = store.open_dataset(layout.member_store(Member(run, seed), kind), kind,
                                chunks={}, verify="size")
        digest = digest or ds.attrs.get("tokenizer_hash")
        # target (predictions) and parameter_group (fisher) are shared by the members of a run
        per_member = [n for n in ds.data_vars if n not in ("target", "parameter_group")]
        ds = ds.drop_attrs(deep=False)
        parts.append(ds.assign({n: ds[n].expand_dims(member=[seed]) for n in per_member}))
    out = xr.concat(parts, dim="member", data_vars="minimal", coords="minimal", join="outer",
                    compat="override", combine_attrs="override")
    out["member"].attrs.update(_MEMBER_ATTRS)
    if kind in _VOCAB_DIM:
        out = _with_token_text(out, _VOCAB_DIM[kind], texts.get(str(digest)))
    return out


def _diagonal_dataset(layout: Layout, run: str, seeds: list[int], texts: dict[str, np.ndarray]) -> Any:
    """One run's stored Fisher diagonals (``fisher.zarr/diagonal/``) stacked along ``member``;
    None when no member stored any (``analysis.fisher_diagonal = "none"``). The leading dim
    of each vocabulary-indexed tensor (word embeddings, output layer) gets the token text as
    coordinate ``<dim>.token_text``."""
    import xarray as xr

    parts = []
    digest = None
    for seed in seeds:
        path = layout.member_store(Member(run, seed), "fisher")
        # Sizes only, as in _run_dataset: opening stays lazy, chunks are checked when read.
        attrs = store.open_store(path, "fisher", verify="size").attrs
        if not attrs.get("diagonal_parameters"):
            continue
        digest = digest or attrs.get("tokenizer_hash")
        labels = store.open_dataset(path, "fisher", chunks={}, verify="none")
        ds = store.open_dataset(path, "fisher", chunks={}, group="diagonal", verify="none")
        ds = ds.assign_coords(estimator=labels["estimator"].variable, step=labels["step"].variable)
        parts.append(ds.drop_attrs(deep=False).expand_dims(member=[seed]))
    if not parts:
        return None
    out = xr.concat(parts, dim="member", join="outer", combine_attrs="override")
    out["member"].attrs.update(_MEMBER_ATTRS)
    text = texts.get(str(digest))
    for name in list(out.data_vars):
        if _VOCAB_PARAMETER.search(str(name)) and out[name].ndim > 3:
            dim = str(out[name].dims[3])  # (member, estimator, step, <parameter>[0], ...)
            out = _with_token_text(out, dim, text, name=f"{dim}.{TOKEN_TEXT}")
    return out


def _combine_runs(sets: dict[str, Any], kind: str) -> Any:
    """The runs' datasets of ``kind`` along a new ``run`` dim; the token text stays 1-D when
    every run has the same, else it becomes (run, vocab)."""
    import xarray as xr

    texts = [ds.coords[TOKEN_TEXT].values for ds in sets.values() if TOKEN_TEXT in ds.coords]
    sets = {run: ds.drop_vars(TOKEN_TEXT, errors="ignore") for run, ds in sets.items()}
    out = xr.concat(
        [ds.expand_dims(run=np.array([run])) for run, ds in sets.items()], dim="run", join="outer",
        data_vars="all", coords="minimal", compat="override", combine_attrs="override",
        fill_value={"parameter_group": ""})  # a string array cannot hold NaN
    # pandas turns the labels into objects; xarray plots only fixed-width strings
    out = out.assign_coords(run=("run", store.fixed_strings(out["run"].values), dict(_RUN_ATTRS)))
    if kind in _VOCAB_DIM and len(texts) == len(sets):
        dim = _VOCAB_DIM[kind]
        if all(np.array_equal(t, texts[0]) for t in texts):
            out = _with_token_text(out, dim, texts[0])
        else:
            out = out.assign_coords({TOKEN_TEXT: (("run", dim), np.stack(texts), dict(_TEXT_ATTRS))})
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
    ``allow_stale``. Every variable is Dask-backed and carries the ``long_name``,
    ``units`` (CF conventions: ``"1"`` for dimensionless values, counts and ids) and
    ``description`` attributes of its schema (``storage_schemas/``). String labels
    (``run``, ``group``, ``estimator``, ...) are fixed-width numpy strings, so they plot.

    Groups
    ------
    ``/summary``
        The analysed summary (``toolkit analyse``): dims ``run``, ``top_p``, ``k``,
        ``group``, ``estimator``, ``block``, ... (storage_schemas/summary.json).
    ``/predictions``
        ``log_probs`` (run, member, position, vocab), natural-log softmax at each masked
        position; ``target`` (run, position). Coordinate ``token_text`` (vocab): the
        text of each token id (``"ACGTAC"``, ``"[MASK]"``; (run, vocab) when combined
        runs have different vocabularies of one size).
    ``/embeddings``
        ``word_embeddings`` (run, member, token, dim) with coordinate ``token_text``
        (token); ``contextual`` (run, member, contextual_sequence, dim).
    ``/fisher``
        ``fisher_trace`` (run, member, estimator, step, group) and ``parameter_trace``
        (run, member, estimator, step, parameter); runs joined on the step and group
        labels, NaN where a run has no such step or block.
    ``/fisher_diagonal/<run>``
        The full Fisher diagonals a run's members stored (``analysis.fisher_diagonal``):
        one variable per parameter tensor, named as in ``model.named_parameters()``,
        dims (member, estimator, step, ``<parameter>[0]``, ...), float32, one Dask chunk
        per estimator, step and tensor (or block of word-embedding rows), so selecting
        one tensor reads only its chunks. Absent when no member stored a diagonal. The
        vocabulary dim of the word embeddings and the output layer has the token text as
        coordinate ``<parameter>[0].token_text``.

    The token text comes from the run's token store (``tokens.zarr`` ``token_text``);
    stores written before it existed give no such coordinate. To map tokens and masked
    positions back to source records and coordinates, see :func:`position_source` and
    :func:`token_source`.

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
    >>> by_text = lp.swap_dims(vocab="token_text")                     # index tokens by text
    >>> by_text.sel(member=1, token_text="ACGTAC").isel(position=0).compute()
    >>> tree["fisher"].to_dataset().fisher_trace.sel(estimator="batch").isel(step=-1)
    >>> words = tree["fisher_diagonal/dna-6mer"]["bert.embeddings.word_embeddings.weight"]
    >>> words.sel(estimator="batch").isel(step=-1).sum(words.dims[-1])  # per-token Fisher
    >>> words[words.dims[3] + ".token_text"]                          # its tokens' text
    """
    import xarray as xr

    root = Path(study_dir).expanduser().resolve()
    if not root.is_dir():
        raise StoreError(f"{root}: no study folder here; give the study's output folder "
                         "(e.g. studies/demo)")
    layout = Layout.of_folder(root)
    runs = _members(layout)
    current, stale = _currency(layout)
    if current is not None:
        runs = {r: [s for s in seeds if s in current.get(r, [])] for r, seeds in runs.items()}
        runs = {r: seeds for r, seeds in runs.items() if seeds}
    nodes: dict[str, Any] = {}
    if stale and layout.summary.exists() and not allow_stale:
        raise StoreError(f"{layout.summary}: the summary is {stale}; run `toolkit run "
                         f"{root}` to bring it up to date, or open_results(..., allow_stale=True)")
    if layout.summary.exists():
        summary = store.open_dataset(layout.summary, "summary", chunks={})
        nodes["/summary"] = summary
        first = [str(r) for r in summary["run"].values if str(r) in runs]
        runs = {r: runs[r] for r in first + [r for r in runs if r not in first]}
    if not runs and not nodes:
        raise StoreError(f"{root}: no summary.zarr and no complete member (members/<run>/seed<N>/"
                         "evaluate.complete.json); run `toolkit run STUDY` first")
    texts = _token_texts(layout)
    for kind in _KINDS:
        sets = {run: _run_dataset(layout, run, seeds, kind, texts) for run, seeds in runs.items()}
        if not sets:
            continue
        if kind == "fisher" or _combinable(sets):
            nodes[f"/{kind}"] = _combine_runs(sets, kind)
            if kind == "fisher":  # the outer join sorted the labels; back to network order
                # parameters by their stored group, then in model order within it
                group_of = {str(p): str(g) for d in sets.values()
                            for p, g in zip(d["parameter"].values, d["parameter_group"].values, strict=True)}
                seen = list(group_of)
                ds = nodes[f"/{kind}"]
                nodes[f"/{kind}"] = ds.reindex(
                    group=sorted((str(g) for g in ds["group"].values), key=network_order),
                    parameter=sorted(seen, key=lambda p: (network_order(group_of[p]), seen.index(p))))
        else:
            nodes[f"/{kind}"] = xr.Dataset()
            for run, ds in sets.items():
                nodes[f"/{kind}/{run}"] = ds.assign_coords(run=((), np.str_(run), dict(_RUN_ATTRS)))
    diagonals = {run: _diagonal_dataset(layout, run, seeds, texts) for run, seeds in runs.items()}
    if any(ds is not None for ds in diagonals.values()):
        nodes["/fisher_diagonal"] = xr.Dataset()
        for run, ds in diagonals.items():
            if ds is not None:
                nodes[f"/fisher_diagonal/{run}"] = ds.assign_coords(run=((), np.str_(run), dict(_RUN_ATTRS)))
    tree = xr.DataTree.from_dict(nodes)
    if stale and layout.summary.exists():
        tree.attrs["summary_stale"] = stale
    tree.attrs.update(study_dir=str(root), runs=list(runs),
                      members=[Member(r, s).id for r, seeds in runs.items() for s in seeds])
    return tree


# --------------------------------------------------------------------------- token sources


class SourceSpan(NamedTuple):
    """Where tokens come from: their source record and their span in it (:func:`token_source`)."""

    name: np.ndarray
    """Source record name (``<U``): FASTA header id, document id or title."""
    start: np.ndarray
    """0-based coordinate of the token's first symbol in the source record (int64)."""
    end: np.ndarray
    """End-exclusive coordinate of the token's last symbol (int64)."""


def token_source(tokens: str | Path, record: Any, token: Any) -> SourceSpan:
    """Map tokens of a token store back to their source: record name and coordinates.

    ``record`` indexes the records of the token store (``masks.zarr``
    ``distribution/record``, say) and ``token`` the tokens of that record (0 = its first
    token, special tokens not counted); both are integers or arrays that broadcast. The
    span is in source coordinates: bases of the FASTA record for DNA (a piece cut from a
    chromosome adds the position where it was cut, ``record_start``), characters of the
    cleaned document for text. So ``genome[name][start:end]`` is the token's text (with
    IUPAC codes as ``N``, upper case).

    How spans are known: ``char`` tokens are one symbol; ``kmer<k>`` tokens are as long
    as their text (k-mers k, single bases and ``[UNK]`` 1), laid end to end; the token
    ``i`` of ``kmer<k>-overlap`` covers ``[i, i + k)`` (single bases in records shorter
    than k); ``bpe<V>`` and a checkpoint's tokenizer store each token's span at prepare
    (``token_start``, ``token_end``).

    A masked evaluation position ``p`` (the ``position`` dim of predictions) is token
    ``position_offset[p] - 1`` (after ``[CLS]``) of record
    ``record[position_sequence[p]]``, with the arrays of ``masks.zarr/distribution``;
    :func:`position_source` does this for a run of a study.

    Parameters
    ----------
    tokens
        A token store (``tokens/<corpus>--<tokenizer>/tokens.zarr``) or its folder.
    record, token
        Record indices and token indices within the records.

    Returns
    -------
    SourceSpan
        ``name``, ``start``, ``end`` arrays of the broadcast shape.

    Raises
    ------
    StoreError
        The store predates record names (rebuild it with ``--force prepare``) or holds
        tokens whose spans are unknown (a slow HuggingFace tokenizer).
    IndexError
        A record or token index out of range (named in the message).

    Examples
    --------
    >>> span = token_source("studies/demo/tokens/genome--kmer6", record=12, token=[0, 1, 2])
    >>> span.name[0], span.start, span.end
    ('NC_003070.9', array([120000, 120006, 120012]), array([120006, 120012, 120018]))
    """
    path = Path(tokens)
    if path != Layout.tokens_store_in(path.parent):  # the prepare folder, not its store
        path = Layout.tokens_store_in(path)
    group = store.open_store(path, "tokens", verify="size")
    if "record_name" not in group:
        raise StoreError(f"{path}: the token store has no record names (written by an older "
                         f"toolkit); {store.rerun_hint(path, 'tokens')}")
    rec, tok = np.broadcast_arrays(np.asarray(record, dtype=np.int64), np.asarray(token, dtype=np.int64))
    n_rec = int(group["offsets"].shape[0]) - 1
    if not rec.size:
        empty = np.zeros(rec.shape, np.int64)
        return SourceSpan(np.zeros(rec.shape, str), empty, empty)
    if rec.min() < 0 or rec.max() >= n_rec:
        bad = int(rec[(rec < 0) | (rec >= n_rec)].flat[0])
        raise IndexError(f"{path}: record {bad} does not exist; the store has {n_rec} records")
    # Only the records asked about are read (a genome's store has millions).
    uniq, inv = np.unique(rec.ravel(), return_inverse=True)
    inv = inv.reshape(rec.shape)

    def of_records(name: str, which: np.ndarray = uniq) -> np.ndarray:
        return np.asarray(group[name].get_coordinate_selection(which))

    first = of_records("offsets")
    count = of_records("offsets", uniq + 1) - first
    outside = (tok < 0) | (tok >= count[inv])
    if outside.any():
        i = np.flatnonzero(outside.ravel())[0]
        raise IndexError(f"{path}: record {int(rec.flat[i])} has {int(count[inv].flat[i])} tokens, "
                         f"no token {int(tok.flat[i])}")
    start, end = _token_spans(path, group, uniq, inv, tok, first, of_records)
    names = store.fixed_strings(of_records("record_name"))[inv]
    origin = of_records("record_start").astype(np.int64)[inv]
    return SourceSpan(names, origin + start, origin + end)


def _token_spans(path: Path, group: Any, uniq: np.ndarray, inv: np.ndarray, tok: np.ndarray,
                 first: np.ndarray, of_records: Any) -> tuple[np.ndarray, np.ndarray]:
    """Each token's span ``[start, end)`` in its record's symbols (see :func:`token_source`):
    token ``tok`` of record ``uniq[inv]``, whose first token is ``first[inv]``."""
    if "token_start" in group:
        at = (first[inv] + tok).ravel()
        return (np.asarray(group["token_start"].get_coordinate_selection(at), np.int64).reshape(tok.shape),
                np.asarray(group["token_end"].get_coordinate_selection(at), np.int64).reshape(tok.shape))
    spec = str(group.attrs.get("tokenizer", ""))
    kmer = re.fullmatch(r"kmer(\d+)(-overlap)?", spec)
    if spec == "char":
        return tok, tok + 1
    if kmer and kmer.group(2):
        k = int(kmer.group(1))
        short = of_records("record_symbols")[inv] < k  # records shorter than k: single bases
        return tok, tok + np.where(short, 1, k)
    if not kmer:
        raise StoreError(f"{path}: tokenizer {spec!r} stored no token spans (a slow HuggingFace "
                         "tokenizer gives none), so tokens cannot be traced to the source")
    # kmer<k>: tokens laid end to end, each as long as its text; a special ([UNK]) is one symbol.
    from toolkit.sequences import _ChunkReader

    text = store.fixed_strings(group["token_text"][...])
    width = np.char.str_len(text).astype(np.int64)
    specials = np.asarray(list((group.attrs.get("special_tokens") or {}).values()), dtype=np.int64)
    width[specials[(specials >= 0) & (specials < len(width))]] = 1
    last = of_records("offsets", uniq + 1)
    reader = _ChunkReader(group["tokens"])  # records in order: each chunk decompressed once
    start, end = np.empty(tok.shape, np.int64), np.empty(tok.shape, np.int64)
    for i in range(len(uniq)):
        ids = reader.read(int(first[i]), int(last[i])).astype(np.int64)
        edges = np.concatenate([[0], np.cumsum(width[ids])])
        here = inv == i
        start[here], end[here] = edges[tok[here]], edges[tok[here] + 1]
    return start, end


def position_source(study_dir: str | Path, run: str, position: Any) -> SourceSpan:
    """Source record and coordinates of masked evaluation positions of a run.

    ``position`` indexes the ``position`` dim of the run's predictions
    (``tree["predictions/<run>"].log_probs``); each is the token
    ``position_offset - 1`` (after ``[CLS]``) of record ``record[position_sequence]`` in
    the run's ``masks.zarr/distribution``, traced by :func:`token_source`.

    Parameters
    ----------
    study_dir
        The study folder (with the ``study.json`` the dispatcher writes).
    run
        A run of the study.
    position
        Position indices (an integer or an array).

    Returns
    -------
    SourceSpan
        ``name``, ``start``, ``end`` of the positions' tokens in their source records.

    Raises
    ------
    StoreError
        No ``study.json`` or masks store (run the study first), or a token store that
        predates record names.
    IndexError
        A position out of range.

    Examples
    --------
    >>> span = position_source("studies/demo", "dna-6mer", np.arange(5))
    >>> list(zip(span.name, span.start, span.end))       # bases each masked token covers
    """
    import dataclasses

    from toolkit.config import load_study
    from toolkit.masks import masks_path

    root = Path(study_dir).expanduser().resolve()
    study_file = Layout.of_folder(root).study_file
    if not study_file.is_file():
        raise StoreError(f"{root}: no study.json here; give the study's output folder after "
                         "`toolkit run STUDY`")
    study = load_study(study_file)
    if study.root != root:  # a moved or copied folder: read the stores where they are now
        study = dataclasses.replace(study, output_dir=str(root))
    if run not in study.runs:
        raise StoreError(f"{root}: no run '{run}'; runs: {', '.join(study.runs)}")
    masks = store.open_store(masks_path(study, run), "masks", verify="size")["distribution"]
    pos = np.asarray(position, dtype=np.int64)
    n = int(masks["position_sequence"].shape[0])
    if pos.size and (pos.min() < 0 or pos.max() >= n):
        raise IndexError(f"run {run}: {n} masked positions, no position "
                         f"{int(pos[(pos < 0) | (pos >= n)].flat[0])}")
    flat = pos.ravel()
    seq = np.asarray(masks["position_sequence"].get_coordinate_selection(flat)) if flat.size else flat
    offset = np.asarray(masks["position_offset"].get_coordinate_selection(flat)) if flat.size else flat
    record = np.asarray(masks["record"].get_coordinate_selection(seq)) if flat.size else flat
    return token_source(Layout(study).run_tokens_dir(run), record.reshape(pos.shape),
                        (offset.astype(np.int64) - 1).reshape(pos.shape))
