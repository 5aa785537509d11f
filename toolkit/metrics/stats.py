"""Weight distance between members, and uncertainty over positions and member pairs.

:func:`weight_distance` (relative L2 distance between two members' state dicts),
:func:`bootstrap_ci` (percentile bootstrap of a mean over positions) and
:func:`pair_mean_std` (mean and std over members or member pairs, ddof 0 or 1).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from toolkit.errors import CheckpointError, ConfigError

__all__ = ["bootstrap_ci", "pair_mean_std", "weight_distance"]


# --------------------------------------------------------------------------- weights


def _as_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor, without importing torch here
        t = t.detach().cpu()
        if getattr(t, "dtype", None) is not None and "bfloat16" in str(t.dtype):
            t = t.float()
        t = t.numpy()
    return np.asarray(t)


def weight_distance(state_a: Mapping[str, Any], state_b: Mapping[str, Any]) -> float:
    """Relative L2 distance between two members' weights: ||a - b|| / ((||a|| + ||b||) / 2).

    Over every floating-point entry of the two state dicts (torch tensors or arrays; integer
    buffers such as position ids are skipped). 0 for identical weights, about sqrt(2) for
    independent initialisations of equal scale.
    """
    if set(state_a) != set(state_b):
        diff = sorted(set(state_a) ^ set(state_b))
        raise CheckpointError(f"the two state dicts differ in parameters ({', '.join(diff[:5])}); compare "
                              "members of the same run")
    dd = na = nb = 0.0
    for name in state_a:
        a, b = _as_numpy(state_a[name]), _as_numpy(state_b[name])
        if a.dtype.kind != "f":
            continue
        if a.shape != b.shape:
            raise CheckpointError(f"parameter '{name}' has shape {a.shape} in one member and {b.shape} in "
                                  "the other; compare members of the same run")
        a, b = a.astype(np.float64), b.astype(np.float64)
        dd += float(((a - b) ** 2).sum())
        na += float((a * a).sum())
        nb += float((b * b).sum())
    scale = 0.5 * (math.sqrt(na) + math.sqrt(nb))
    return math.sqrt(dd) / scale if scale > 0 else 0.0


# --------------------------------------------------------------------------- uncertainty


def bootstrap_ci(values: np.ndarray, n_boot: int = 200, confidence: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of ``values`` (axis 0).

    NaN entries are dropped first (e.g. k = 1 Spearman). Resampling runs in blocks, so memory
    stays bounded for millions of positions. Returns (nan, nan) when nothing is left.
    """
    if not 0 < confidence < 1:
        raise ConfigError(f"analysis.confidence = {confidence}: must lie strictly between 0 and 1")
    if n_boot < 1:
        raise ConfigError(f"analysis.bootstrap = {n_boot}: need at least 1 resample")
    x = np.asarray(values, dtype=np.float64).ravel()
    x = x[~np.isnan(x)]
    n = x.size
    if n == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    per_block = max(1, 4_000_000 // n)  # about 32 MB of indices per block
    for s in range(0, n_boot, per_block):
        m = min(per_block, n_boot - s)
        means[s:s + m] = x[rng.integers(0, n, size=(m, n))].mean(axis=1)
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(means, [alpha, 1 - alpha])
    return float(lo), float(hi)


def pair_mean_std(values: Sequence[float], ddof: int = 0) -> tuple[float, float]:
    """Mean and standard deviation over members or member pairs.

    ``ddof = 0`` is the population std (the toolkit's default; the authors' ``meanstd``
    helper); ``ddof = 1`` the sample std their figures' error bars use
    (``analysis.spread_ddof``). A NaN value propagates (skip undefined metrics before
    calling); no values gives (nan, nan), and so does the std of fewer than ddof + 1 values.
    """
    if ddof not in (0, 1):
        raise ConfigError(f"analysis.spread_ddof = {ddof!r}: must be 0 or 1")
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        return float("nan"), float("nan")
    if x.size <= ddof:
        return float(x.mean()), float("nan")
    return float(x.mean()), float(x.std(ddof=ddof))
