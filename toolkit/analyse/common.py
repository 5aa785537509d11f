"""What every measure of the analysis shares: the definitions in force, mean/std over
members or pairs, bootstrap intervals and a progress callback for Dask graphs."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from toolkit.config import AnalysisConfig

log = logging.getLogger("toolkit.analyse")  # one logger for the whole stage

NAN = math.nan


DEFINITIONS: dict[str, dict[str, Any]] = {
    "toolkit": {"top_p_rule": "reach", "spread_ddof": 0, "kl_headline": "model_to_uniform",
                "js_nan": "none"},
    "authors": {"top_p_rule": "authors", "spread_ddof": 1, "kl_headline": "uniform_to_model",
                "js_nan": "pair_mean"},
}
"""What ``analysis.definitions`` selects. ``js_nan`` follows ``top_p_rule``: the "reach" rule
never gives NaN (float64, clipped before the square root); the authors' float32 arithmetic
can, and they replace a NaN by the mean over the pair's other positions."""


def resolve_definitions(a: AnalysisConfig) -> dict[str, Any]:
    """The definitions an analysis uses: ``analysis.definitions`` gives the defaults, and each of
    ``top_p_rule``, ``spread_ddof``, ``kl_headline`` that is set (not None) overrides its own
    entry. Recorded in the summary's ``definitions`` attribute."""
    out = {"definitions": a.definitions, **DEFINITIONS[a.definitions]}
    for key in ("top_p_rule", "spread_ddof", "kl_headline"):
        value = getattr(a, key)
        if value is not None:
            out[key] = value
    out["js_nan"] = "pair_mean" if out["top_p_rule"] == "authors" else "none"
    return out


# --------------------------------------------------------------------------- shared

_DDOF: contextvars.ContextVar[int] = contextvars.ContextVar("spread_ddof", default=0)
"""ddof of every std the analysis reports; set for one analysis by :func:`spread_ddof`, so every
helper (and any later analysis that calls :func:`mean_std`) uses the same one."""


@contextlib.contextmanager
def spread_ddof(ddof: int) -> Iterator[None]:
    """Within the block, :func:`mean_std` uses ``ddof`` (``analysis.spread_ddof`` resolved)."""
    token = _DDOF.set(int(ddof))
    try:
        yield
    finally:
        _DDOF.reset(token)


def mean_std(values: list[float] | np.ndarray) -> tuple[float, float]:
    """Mean and std (see :func:`toolkit.metrics.pair_mean_std`; ddof from :func:`spread_ddof`)
    of finite values; NaN if none, std NaN from a single value."""
    from toolkit.metrics import pair_mean_std

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return NAN, NAN
    if v.size == 1:
        return float(v[0]), NAN
    mean, std = pair_mean_std(v.tolist(), ddof=_DDOF.get())
    return float(mean), float(std)


def ci(values: np.ndarray, analysis: AnalysisConfig) -> tuple[float, float]:
    """Bootstrap CI of the mean over axis 0 of a 1-D array (NaN entries dropped)."""
    from toolkit.metrics import bootstrap_ci

    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size < 2:
        return NAN, NAN
    lo, hi = bootstrap_ci(v, n_boot=analysis.bootstrap, confidence=analysis.confidence)
    return float(lo), float(hi)


def dask_progress(desc: str) -> Any:
    """A Dask callback that shows progress over tasks (rate and ETA, on stderr): a tqdm bar
    on a terminal, plain log lines in a job's log (:func:`toolkit.progress.progress_bar`)."""
    from dask.callbacks import Callback

    from toolkit.progress import progress_bar

    class TqdmCallback(Callback):
        def _start_state(self, dsk: Any, state: Any) -> None:
            total = sum(len(state[k]) for k in ("ready", "waiting", "running", "finished"))
            self.bar = progress_bar(total=total, desc=desc, unit="task", logger=log)

        def _posttask(self, key: Any, result: Any, dsk: Any, state: Any, worker_id: Any) -> None:
            self.bar.update(1)

        def _finish(self, dsk: Any, state: Any, errored: bool) -> None:
            self.bar.close()

    return TqdmCallback()


