"""The data side of a run: the entropy profile that prepare stored in the run's token store."""

from __future__ import annotations

from typing import Any

import numpy as np

from toolkit import store
from toolkit.analyse.common import NAN, log
from toolkit.config import StudyConfig
from toolkit.study import Layout


def profile_run(study: StudyConfig, run: str) -> dict[str, Any]:
    """The data-side entropy profile of the run's token store (NaN if it was never prepared)."""
    path = Layout(study).run_tokens_store(run)
    if path.exists():
        attrs = dict(store.open_store(path, "tokens", verify="size").attrs)  # attributes only
    else:
        log.warning("%s: no token store (run `toolkit prepare`); its entropy profile is NaN", path)
        attrs = {}
    p = attrs.get("entropy_profile") or {}

    def num(key: str) -> float:
        v = p.get(key)
        return float(v) if v is not None else NAN

    spt = num("symbols_per_token")
    cond = np.asarray([NAN if v is None else v for v in p.get("conditional_bits", [])], np.float64)
    coverage = np.asarray([NAN if v is None else v for v in p.get("context_coverage", [])], np.float64)
    plateau = p.get("entropy_rate_plateau_order")
    return {
        "context_coverage": coverage,
        # The rate with its interval (toolkit/entropy/rate.py); NaN for a store prepared
        # before the profile had one (the prepare unit is then stale and re-run).
        "entropy_rate_bits_per_symbol": num("entropy_rate_bits_per_symbol"),
        "entropy_rate_low": num("entropy_rate_low"),
        "entropy_rate_high": num("entropy_rate_high"),
        "entropy_rate_method": str(p.get("entropy_rate_method") or "not estimated"),
        "entropy_rate_heldout_bits_per_symbol": num("entropy_rate_heldout_bits_per_symbol"),
        "entropy_rate_ppmd_bits_per_symbol": num("entropy_rate_ppmd_bits_per_symbol"),
        "entropy_rate_order": -1 if plateau is None else int(plateau),
        "kind": str(attrs.get("kind", "")),
        "vocab_size": int(attrs.get("vocab_size", -1)),
        "unigram_entropy_bits": num("unigram_bits"),
        "unigram_entropy_bits_per_symbol": num("unigram_bits_per_symbol"),
        "conditional_entropy_bits": cond,
        "conditional_entropy_bits_per_symbol": cond / spt,
        "compression_bits_per_symbol": num("compression_bits_per_symbol"),
        "analytic_entropy_rate_bits_per_symbol": num("analytic_entropy_rate_bits_per_symbol"),
        "symbols_per_token": spt,
    }
