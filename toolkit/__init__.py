"""Entropy versus learnability: ensembles of masked LMs on text and DNA corpora.

Public API (imported lazily so that ``import toolkit`` stays fast and runs nothing):

- :func:`toolkit.load_study` - read and validate a study file from ``jobs/``.
- :func:`toolkit.empirical_fisher` - per-group empirical Fisher traces of a BertForMaskedLM.
- :func:`toolkit.open_results` - a study's results as a lazy xarray DataTree.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "load_study": ("toolkit.config", "load_study"),
    "empirical_fisher": ("toolkit.fisher", "empirical_fisher"),
    "open_results": ("toolkit.results", "open_results"),
    "open_progress": ("toolkit.progress", "open_progress"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'toolkit' has no attribute {name!r}")
