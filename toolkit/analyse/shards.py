"""Analysis shards: the ``measure`` units that the ``analyse`` unit reduces.

One shard per (run, measure family) computes that family's per-run results from the
run's done members and writes them to its own store,
``<study>/analysis/<run>/<family>.zarr`` (schema ``storage_schemas/shard.json``): no two
shards share a store, so they run as independent jobs of one array. The ``analyse``
unit then reads every shard and lays the results onto the summary's coordinates
(:mod:`toolkit.analyse.summary`); computing the families in one process instead gives
the same summary bit for bit (the shard stores keep float64 arrays and exact float
reprs).

Families:

- ``distributions``: output distributions and the counting baseline (predictions, token store);
- ``embeddings``: static and contextual embeddings, every member pair;
- ``fisher``: Fisher shares and the stored diagonals' per-token and seed analyses;
- ``training``: the weight-distance check (final weights) and the loss curves.

A shard's results are nested dicts, lists and tuples of numbers and NumPy arrays. The
store keeps each array as a Zarr array (``values/a<i>``) and the structure as JSON text
(the ``skeleton`` attribute) that names them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import __version__, store
from toolkit.analyse.common import log, resolve_definitions, spread_ddof
from toolkit.config import StudyConfig
from toolkit.errors import StoreError
from toolkit.progress import format_duration
from toolkit.study import Layout, Member

FAMILIES = ("distributions", "embeddings", "fisher", "training")
"""The measure families, one ``measure`` unit each per run."""

FAMILY_FIELDS: dict[str, tuple[str, ...]] = {
    "distributions": ("top_p", "bootstrap", "confidence"),
    "embeddings": ("topk", "spearman_variant", "rbf_sigma", "bootstrap", "confidence"),
    "fisher": (),
    "training": (),
}
"""The ``analysis`` fields each family reads besides the resolved definitions (every family
reads those: the ddof of its spreads, the top-p rule). Changing a field re-runs only the
shards that read it; the summary reads them all."""

DASK_FAMILIES = ("distributions", "fisher")
"""Families whose work is Dask graphs over the members' stores: only their units open the
study's Dask scheduler (``dispatch.dask = "slurm"`` starts worker jobs for them alone)."""

SHARD_FORMAT = 1
"""Version of the skeleton encoding; a shard of another version is refused when read."""


def shard_key(run: str, family: str) -> str:
    """The ``measure`` unit key of a shard: ``<run>/<family>``."""
    return f"{run}/{family}"


def parse_shard_key(key: str) -> tuple[str, str]:
    """``<run>/<family>`` -> (run, family)."""
    run, _, family = key.rpartition("/")
    return run, family


def family_settings(study: StudyConfig, family: str) -> dict[str, Any]:
    """The analysis settings a family's shard reads, as dotted keys (its unit's settings)."""
    a = study.analysis
    out: dict[str, Any] = {f"analysis.{f}": getattr(a, f) for f in FAMILY_FIELDS[family]}
    out["analysis.definitions (resolved)"] = resolve_definitions(a)
    return out


# --------------------------------------------------------------------------- computing


def compute_family(study: StudyConfig, run: str, family: str, ms: list[Member]) -> dict[str, Any]:
    """The results of one family for one run's members ({} without members).

    The caller sets the spread's ddof (:func:`toolkit.analyse.common.spread_ddof`).
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown measure family {family!r}; families: {', '.join(FAMILIES)}")
    if not ms:
        return {}
    if family == "distributions":
        from toolkit.analyse.distributions import counting_run, distribution_run

        res = distribution_run(study, run, ms)
        res.update(counting_run(study, run, res["model_cross_entropy_bits"],
                                res["model_cross_entropy_bits_std"]))
        return res
    if family == "embeddings":
        from toolkit.analyse.embeddings import embedding_run

        return embedding_run(study, run, ms)
    if family == "fisher":
        from toolkit.analyse.fisher import fisher_diagonal_run, fisher_run

        return {"shares": fisher_run(study, run, ms), "diagonal": fisher_diagonal_run(study, run, ms)}
    if family == "training":
        from toolkit.analyse.training import loss_run, weights_run

        return {"weight_distance": weights_run(study, run, ms), "losses": loss_run(study, ms)}
    raise AssertionError(family)  # every family of FAMILIES is handled above


def run_shard(study: StudyConfig, run: str, family: str, ms: list[Member]) -> Path:
    """Compute one shard from ``ms`` (the run's done members) and write its store.

    Returns
    -------
    Path
        The shard store (:meth:`toolkit.study.Layout.shard`).
    """
    t0 = time.perf_counter()
    definitions = resolve_definitions(study.analysis)
    with spread_ddof(definitions["spread_ddof"]):
        result = compute_family(study, run, family, ms)
    path = write_shard(Layout(study), study.name, run, family, ms, result, definitions)
    log.info("measured %s of run %s (%d members) in %s: %s", family, run, len(ms),
             format_duration(time.perf_counter() - t0), path)
    return path


# --------------------------------------------------------------------------- the store


def _encode(value: Any, arrays: dict[str, np.ndarray]) -> Any:
    """``value`` as JSON, each NumPy array replaced by a reference into ``arrays``."""
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise TypeError(f"cannot store an array of dtype {value.dtype} in a shard")
        name = f"a{len(arrays)}"
        arrays[name] = value
        return {"__array__": name, "ndim": value.ndim}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {"__dict__": {k: _encode(v, arrays) for k, v in value.items()}}
        return {"__items__": [[_encode(k, arrays), _encode(v, arrays)] for k, v in value.items()]}
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, arrays) for v in value]}
    if isinstance(value, list):
        return [_encode(v, arrays) for v in value]
    if isinstance(value, np.bool_ | bool):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)  # float64 -> repr -> float64 is exact; float32 widens exactly
    if value is None or isinstance(value, int | float | str):
        return value
    raise TypeError(f"cannot store a {type(value).__name__} in a shard")


def _decode(doc: Any, arrays: dict[str, np.ndarray]) -> Any:
    if isinstance(doc, list):
        return [_decode(v, arrays) for v in doc]
    if not isinstance(doc, dict):
        return doc
    if "__array__" in doc:
        arr = arrays[doc["__array__"]]
        return arr.reshape(()) if doc["ndim"] == 0 else arr
    if "__dict__" in doc:
        return {k: _decode(v, arrays) for k, v in doc["__dict__"].items()}
    if "__items__" in doc:
        return {_hashable(_decode(k, arrays)): _decode(v, arrays) for k, v in doc["__items__"]}
    if "__tuple__" in doc:
        return tuple(_decode(v, arrays) for v in doc["__tuple__"])
    raise StoreError(f"unknown entry {sorted(doc)} in a shard's skeleton")


def _hashable(key: Any) -> Any:
    return tuple(_hashable(k) for k in key) if isinstance(key, tuple | list) else key


def write_shard(layout: Layout, study_name: str, run: str, family: str, ms: list[Member],
                result: dict[str, Any], definitions: dict[str, Any]) -> Path:
    """Write one shard's results (atomically: nothing appears at the path on an error)."""
    arrays: dict[str, np.ndarray] = {}
    skeleton = json.dumps(_encode(result, arrays), allow_nan=True)
    path = layout.shard(run, family)
    attrs = {"study": study_name, "run": run, "family": family, "members": [m.id for m in ms],
             "definitions": definitions, "shard_format": SHARD_FORMAT, "skeleton": skeleton,
             "toolkit_version": __version__}
    with store.writing(path, "shard", attrs, overwrite=True) as group:
        for name, arr in arrays.items():
            data = arr.reshape(1) if arr.ndim == 0 else arr
            store.create_array(group, "shard", f"values/{name}", data=data,
                               chunks=tuple(max(1, s) for s in data.shape),
                               dims=[f"{name}_{i}" for i in range(data.ndim)])
    return path


def read_shard(layout: Layout, run: str, family: str) -> tuple[list[str], dict[str, Any]]:
    """(member ids, results) of one shard, as :func:`compute_family` returned them.

    Raises
    ------
    StoreError
        The shard is missing, damaged (checksums), or of another format.
    """
    path = layout.shard(run, family)
    if not path.exists():
        raise StoreError(f"{path}: the {family} shard of run {run} is missing; run "
                         f"`toolkit run {store.study_ref(path)}` (its measure unit is pending)")
    group = store.open_store(path, "shard")
    attrs = dict(group.attrs)
    if attrs.get("shard_format") != SHARD_FORMAT:
        raise StoreError(f"{path}: shard format {attrs.get('shard_format')!r}, this toolkit reads "
                         f"{SHARD_FORMAT}; rerun its measure unit (`toolkit run STUDY --force "
                         f"measure:{shard_key(run, family)}`)")
    arrays: dict[str, np.ndarray] = {}
    values = group.get("values")
    if values is not None:
        for name, arr in values.arrays():
            arrays[name] = np.asarray(arr[...])
    return list(attrs["members"]), _decode(json.loads(attrs["skeleton"]), arrays)
