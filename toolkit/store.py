"""The one module that reads and writes the toolkit's Zarr stores.

Every store kind (``tokens``, ``masks``, ``train``, ``predictions``, ...) is defined
by a JSON document in ``storage_schemas/<kind>.json``: its arrays (dims, dtype,
chunking), its attributes and their meaning, and a version. This module

- creates stores all-or-nothing (:func:`writing`: build in a hidden temporary folder,
  validate, then rename into place; a crash leaves nothing that reads as complete),
- validates a store against its schema on write and on open (:func:`open_store`),
- opens stores lazily for analysis (:func:`open_dataset`: Dask-backed xarray).

Arrays carry Zarr v3 ``dimension_names``, so ``xarray.open_zarr`` reads them directly.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import StoreError

# Zarr warns that consolidated metadata is not in the v3 spec; we rely on it for fast opens.
warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)

SCHEMA_DIR = Path(os.environ.get("TOOLKIT_SCHEMAS", Path(__file__).resolve().parents[1] / "storage_schemas"))


@functools.cache
def schema(kind: str) -> dict[str, Any]:
    """The parsed schema document of a store kind."""
    path = SCHEMA_DIR / f"{kind}.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        known = sorted(p.stem for p in SCHEMA_DIR.glob("*.json"))
        raise StoreError(f"no schema for store kind '{kind}' in {SCHEMA_DIR}; known: {', '.join(known)}") from e
    if doc.get("store") != kind or not isinstance(doc.get("version"), int):
        raise StoreError(f"{path}: schema must have \"store\": \"{kind}\" and an integer \"version\"")
    return doc


def _spec(kind: str, name: str) -> dict[str, Any]:
    arrays = schema(kind)["arrays"]
    if name not in arrays:
        raise StoreError(f"store kind '{kind}' has no array '{name}' in its schema; "
                         f"arrays: {', '.join(arrays)}")
    return arrays[name]


def _norm(dtype: Any) -> str:
    """Schema name of a dtype: numpy's name, or "str" for any string dtype."""
    dt = np.dtype(dtype) if not isinstance(dtype, str) or dtype != "str" else None
    if dt is None or dt.kind in "TUO":
        return "str"
    return dt.name


def _dtypes(spec: dict[str, Any]) -> list[str]:
    d = spec["dtype"]
    return [d] if isinstance(d, str) else list(d)


def create_array(group: Any, kind: str, name: str, *, shape: tuple[int, ...] | None = None,
                 data: np.ndarray | None = None, dtype: str | None = None,
                 chunks: tuple[int, ...] | None = None) -> Any:
    """Create array ``name`` in ``group`` as the schema of ``kind`` says.

    The dims, dtype and default chunking come from the schema; a chunk entry of -1
    in the schema means "the whole dimension". ``data``, when given, is written.
    """
    spec = _spec(kind, name)
    if data is not None:
        shape = data.shape
    assert shape is not None, "give shape or data"
    dims = spec["dims"]
    if len(shape) != len(dims):
        raise StoreError(f"{kind}.{name}: shape {shape} does not match dims {dims}")
    dtype = dtype or (_norm(data.dtype) if data is not None and _norm(data.dtype) in _dtypes(spec) else _dtypes(spec)[0])
    if dtype not in _dtypes(spec):
        raise StoreError(f"{kind}.{name}: dtype {dtype} not allowed; schema allows {_dtypes(spec)}")
    if chunks is None:
        want = spec.get("chunks")
        if want is None:
            chunks = tuple(max(1, s) for s in shape)
        else:
            chunks = tuple(max(1, s if c == -1 else min(c, max(s, 1))) for c, s in zip(want, shape, strict=True))
    parent, _, leaf = name.rpartition("/")
    target = group.require_group(parent) if parent else group
    is_str = dtype == "str"
    arr = target.create_array(leaf, shape=shape, chunks=chunks, dtype=str if is_str else dtype,
                              dimension_names=dims,
                              fill_value="" if is_str else spec.get("fill_value", 0),
                              overwrite=True)
    if spec.get("units"):
        arr.attrs["units"] = spec["units"]
    if spec.get("description"):
        arr.attrs["description"] = spec["description"]
    if data is not None:
        arr[...] = data.astype(str) if is_str else data.astype(dtype, copy=False)
    return arr


def validate(group: Any, kind: str, where: str | Path) -> None:
    """Check a store against its schema: kind, version, attributes, arrays, dims, dtypes."""
    doc = schema(kind)
    attrs = dict(group.attrs)
    if attrs.get("schema") != kind:
        raise StoreError(f"{where}: not a '{kind}' store (its schema attribute is {attrs.get('schema')!r})")
    version = attrs.get("schema_version")
    if version != doc["version"]:
        hint = ("rebuild it with this toolkit version" if isinstance(version, int) and version < doc["version"]
                else "upgrade the toolkit to read it")
        raise StoreError(f"{where}: '{kind}' store has schema version {version}, this toolkit reads "
                         f"version {doc['version']}; {hint}")
    for name, spec in doc.get("attributes", {}).items():
        if not spec.get("optional") and name not in attrs:
            raise StoreError(f"{where}: attribute '{name}' missing ({spec.get('description', '')})")
    for name, spec in doc["arrays"].items():
        try:
            arr = group[name]
        except KeyError:
            if spec.get("optional"):
                continue
            raise StoreError(f"{where}: array '{name}' missing; the store is incomplete or from "
                             "another tool, rebuild it") from None
        if _norm(arr.dtype) not in _dtypes(spec):
            raise StoreError(f"{where}: array '{name}' has dtype {arr.dtype}, schema wants {_dtypes(spec)}")
        dims = list(arr.metadata.dimension_names or [])
        if dims != list(spec["dims"]):
            raise StoreError(f"{where}: array '{name}' has dims {dims}, schema wants {spec['dims']}")


def _zarr() -> Any:
    import zarr

    return zarr


def replace_folder(src: Path, dst: Path) -> None:
    """Move a finished folder into place, replacing an older ``dst`` (readers never see a mix)."""
    if dst.exists():
        trash = dst.with_name(f".{dst.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dst, trash)
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(src, dst)


@contextmanager
def writing(path: str | Path, kind: str, attrs: Mapping[str, Any] | None = None,
            *, overwrite: bool = False) -> Iterator[Any]:
    """Create a store all-or-nothing.

    Yields a Zarr group in a hidden temporary folder next to ``path``. When the block
    ends without error the store is validated, its metadata consolidated and the
    folder renamed to ``path``; on any error the temporary folder is removed and
    nothing appears at ``path``.
    """
    zarr = _zarr()
    path = Path(path)
    if path.exists() and not overwrite:
        raise StoreError(f"{path}: store already exists; remove it or pass overwrite")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(f"{path.parent}: cannot create output folder ({e.strerror}); "
                         "choose a writable output_dir") from e
    if not os.access(path.parent, os.W_OK):
        raise StoreError(f"{path.parent}: output folder is not writable; choose a writable output_dir")
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
        group.attrs.update({"schema": kind, "schema_version": schema(kind)["version"], **(attrs or {})})
        yield group
        validate(group, kind, path)
        zarr.consolidate_metadata(str(tmp))
        replace_folder(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def open_store(path: str | Path, kind: str, mode: str = "r") -> Any:
    """Open and validate a store; a missing store or schema mismatch is a :class:`StoreError`."""
    zarr = _zarr()
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no '{kind}' store here; run the stage that writes it first")
    try:
        group = zarr.open_group(store=str(path), mode=mode, zarr_format=3)
    except Exception as e:  # zarr raises several unrelated types for a broken folder
        raise StoreError(f"{path}: not a readable Zarr v3 store ({e})") from e
    validate(group, kind, path)
    return group


def open_dataset(path: str | Path, kind: str, chunks: Any = None, group: str | None = None) -> Any:
    """Open a store lazily as a Dask-backed ``xarray.Dataset`` (validated first).

    ``chunks=None`` keeps the stored chunking (``"auto"`` cannot chunk string
    arrays); ``group`` opens a sub-group such as ``distribution`` of a masks store.
    """
    import xarray as xr

    open_store(path, kind)
    return xr.open_zarr(str(path), chunks={} if chunks is None else chunks, zarr_format=3,
                        consolidated=True, group=group)
