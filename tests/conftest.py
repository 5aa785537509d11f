"""Shared fixtures. Real components only: real files, real Zarr stores, real tiny models."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def weird_tmp_path(tmp_path: Path) -> Path:
    """A temporary folder whose path has spaces and quotes (submitit's habit)."""
    path = tmp_path / "we ird 'quoted' \"dir\""
    path.mkdir()
    return path
