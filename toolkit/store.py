"""The one module that reads and writes the toolkit's Zarr stores.

Every store kind (``tokens``, ``masks``, ``train``, ``predictions``, ...) is defined
by a JSON document in ``storage_schemas/<kind>.json``: its arrays (dims, dtype,
chunking), its attributes and their meaning, and a version. This module

- creates stores all-or-nothing (:func:`writing`: build in a hidden temporary folder,
  validate, record the chunk inventory, then rename into place; a crash leaves nothing
  that reads as complete),
- validates a store against its schema on write and on open (:func:`open_store`),
- verifies a store's files against its inventory on open (:func:`verify_store`),
- opens stores lazily for analysis (:func:`open_dataset`: Dask-backed xarray).

Arrays carry Zarr v3 ``dimension_names``, so ``xarray.open_zarr`` reads them directly.

Integrity: Zarr reads an absent chunk as the fill value, so a deleted chunk would
silently read as zeros. Every store therefore carries ``inventory.json`` at its root:
every file of the store (chunks and metadata), its size and its SHA-256. Opening a
store checks that exactly those files are there with those sizes (``verify="size"``,
a directory walk) or also re-reads and checksums every byte (``verify="full"``, what
the stages use before computing numbers). Every array also ends its codec chain with
Zarr's ``crc32c`` codec, so a chunk damaged after a cheap open still fails to decode
instead of decoding to garbage.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

from toolkit.errors import StoreError
from toolkit.plumbing import raise_if_no_space, write_atomic
from toolkit.study import Layout

# Zarr warns that consolidated metadata is not in the v3 spec; we rely on it for fast opens.
warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)



def _schema_dir() -> Path:
    """Where the store schemas live.

    ``TOOLKIT_SCHEMAS`` overrides; a regular install ships them in the package as
    ``toolkit/storage_schemas`` (copied there by the build hook in ``setup.py``); a source
    checkout or an editable install reads the single source, the top-level ``storage_schemas/``.

    Returns
    -------
    Path
        The folder of ``<kind>.json`` documents.
    """
    override = os.environ.get("TOOLKIT_SCHEMAS")
    if override:
        return Path(override)
    shipped = Path(str(resources.files("toolkit") / "storage_schemas"))
    if shipped.is_dir():
        return shipped
    return Path(__file__).resolve().parents[1] / "storage_schemas"


SCHEMA_DIR = _schema_dir()
CF_ATTRS = ("long_name", "units")
"""Array attributes (CF conventions) every schema entry defines and every array carries."""


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
    check_schema(doc, path)
    return doc


def check_schema(doc: dict[str, Any], where: str | Path) -> None:
    """Require the CF attributes of every array of a schema document.

    Every array entry needs a non-empty ``long_name`` (a short human title, CF) and
    ``units`` (a UDUNITS string: ``"1"`` for dimensionless values, counts, ids and
    labels; ``"bit"``, ``"nat"``, ``"bit/token"``, ...). Both are written on the array
    when it is created and set again by :func:`open_dataset`, so a variable without
    them cannot be added to a schema.

    Raises
    ------
    StoreError
        An array entry lacks either attribute; the message names the file and the array.
    """
    for name, spec in doc.get("arrays", {}).items():
        for attr in CF_ATTRS:
            value = spec.get(attr) if isinstance(spec, dict) else None
            if not isinstance(value, str) or not value.strip():
                raise StoreError(f"{where}: array '{name}' has no {attr!r}; every array of a schema "
                                 f"needs a non-empty \"long_name\" and \"units\" (CF conventions; "
                                 "\"1\" for dimensionless values, counts and ids)")


def _template(kind: str, name: str) -> str | None:
    """The schema entry ``<group>/*`` that array ``name`` (``<group>/<leaf>``) falls under."""
    parent, _, leaf = name.rpartition("/")
    key = f"{parent}/*"
    return key if parent and leaf and key in schema(kind)["arrays"] else None


def _spec(kind: str, name: str) -> dict[str, Any]:
    # An entry "<group>/*" describes every array of that group (one per parameter tensor,
    # say); its dims may end in "...", the array's own trailing dims (named by the writer).
    arrays = schema(kind)["arrays"]
    if name not in arrays:
        key = _template(kind, name)
        if key is not None:
            return arrays[key]
        raise StoreError(f"store kind '{kind}' has no array '{name}' in its schema; "
                         f"arrays: {', '.join(arrays)}")
    return arrays[name]


def _dims_match(dims: list[str], want: list[str]) -> bool:
    """Array dims against schema dims, a trailing "..." standing for any further dims."""
    if want and want[-1] == "...":
        return dims[: len(want) - 1] == want[:-1]
    return dims == want


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
                 chunks: tuple[int, ...] | None = None, dims: list[str] | None = None) -> Any:
    """Create array ``name`` in ``group`` as the schema of ``kind`` says.

    The dims, dtype and default chunking come from the schema; a chunk entry of -1
    in the schema means "the whole dimension". ``data``, when given, is written.
    ``dims`` names all dims of an array whose schema dims end in "..." (a ``<group>/*``
    entry); ``chunks`` is then required.
    """
    spec = _spec(kind, name)
    if data is not None:
        shape = data.shape
    assert shape is not None, "give shape or data"
    named = list(spec["dims"])
    if named and named[-1] == "...":
        if dims is None or chunks is None or not _dims_match(list(dims), named):
            raise StoreError(f"{kind}.{name}: give dims starting {named[:-1]} and chunks")
    else:
        dims = named
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
                              dimension_names=dims, compressors=_compressors(),
                              fill_value="" if is_str else spec.get("fill_value", 0),
                              overwrite=True)
    arr.attrs.update(_cf_attrs(spec))
    if data is not None:
        arr[...] = data.astype(str) if is_str else data.astype(dtype, copy=False)
    return arr


def _cf_attrs(spec: dict[str, Any]) -> dict[str, str]:
    """The attributes an array of this schema entry carries: long_name, units, description."""
    return {k: spec[k] for k in (*CF_ATTRS, "description") if spec.get(k)}


def validate(group: Any, kind: str, where: str | Path) -> None:
    """Check a store against its schema: kind, version, attributes, arrays, dims, dtypes."""
    doc = schema(kind)
    attrs = dict(group.attrs)
    if attrs.get("schema") != kind:
        raise StoreError(f"{where}: not a '{kind}' store (its schema attribute is {attrs.get('schema')!r})")
    version = attrs.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise StoreError(f"{where}: '{kind}' store has schema_version {version!r}, which is not an "
                         f"integer (this toolkit reads version {doc['version']}); the store was not "
                         "written by the toolkit or was edited; rebuild it")
    if version != doc["version"]:
        hint = ("rebuild it with this toolkit version" if version < doc["version"]
                else "upgrade the toolkit to read it")
        raise StoreError(f"{where}: '{kind}' store has schema version {version}, this toolkit reads "
                         f"version {doc['version']}; {hint}")
    for name, spec in doc.get("attributes", {}).items():
        if not spec.get("optional") and name not in attrs:
            raise StoreError(f"{where}: attribute '{name}' missing ({spec.get('description', '')})")
    checks: list[tuple[str, Any, dict[str, Any]]] = []
    for name, spec in doc["arrays"].items():
        if name.endswith("/*"):  # every array of that group, if the group is there
            sub = group.get(name[:-2])
            if sub is not None:
                checks += [(f"{name[:-2]}/{leaf}", arr, spec) for leaf, arr in sub.arrays()]
            continue
        try:
            checks.append((name, group[name], spec))
        except KeyError:
            if spec.get("optional"):
                continue
            raise StoreError(f"{where}: array '{name}' missing; the store is incomplete or from "
                             "another tool, rebuild it") from None
    for name, arr, spec in checks:
        if _norm(arr.dtype) not in _dtypes(spec):
            raise StoreError(f"{where}: array '{name}' has dtype {arr.dtype}, schema wants {_dtypes(spec)}")
        dims = list(arr.metadata.dimension_names or [])
        if not _dims_match(dims, list(spec["dims"])):
            raise StoreError(f"{where}: array '{name}' has dims {dims}, schema wants {spec['dims']}")


def _zarr() -> Any:
    import zarr

    return zarr


def _compressors() -> tuple[Any, ...]:
    """Zarr's default compressor followed by a CRC32C of the compressed bytes.

    The checksum codec comes last so that a flipped bit anywhere in a chunk file is
    caught before decompression: the chunk fails to decode instead of decoding to
    garbage (zstd alone decodes many flips into wrong numbers).
    """
    from zarr.codecs import Crc32cCodec, ZstdCodec

    return (ZstdCodec(level=0, checksum=False), Crc32cCodec())


# --------------------------------------------------------------------------- integrity

INVENTORY = "inventory.json"
INVENTORY_FORMAT = 1

# Which stage writes each store kind: what a user reruns when a store is damaged.
STAGE = {"tokens": "prepare", "masks": "prepare", "train": "train", "predictions": "evaluate",
         "embeddings": "evaluate", "fisher": "evaluate", "summary": "analyse"}

Verify = Literal["none", "size", "full"]


def _digest(path: Path) -> str:
    """SHA-256 (first 128 bits, hex) of a file's bytes.

    Not CRC32C: every chunk file already ends with the CRC32C of its bytes (the codec),
    and a CRC over data followed by its own CRC is the same constant for every valid
    chunk, so it could not tell two chunks apart (a chunk copied over another). SHA-256
    is hardware-accelerated on current CPUs (about 2 GB/s a core) and needs no package.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:32]


def _walk(root: Path) -> dict[str, int]:
    """Every file below ``root`` but the inventory: store key -> size in bytes.

    Dot files are left out: NFS and some editors leave ``.nfsXXXX`` / ``.swp`` files
    that are not part of the store and that Zarr never reads.
    """
    found: dict[str, int] = {}
    stack = [root]
    while stack:
        folder = stack.pop()
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
                else:
                    key = Path(entry.path).relative_to(root).as_posix()
                    if key != INVENTORY:
                        found[key] = entry.stat(follow_symlinks=False).st_size
    return found


def write_inventory(root: str | Path, kind: str) -> None:
    """Record every file of the finished store at ``root`` with its size and checksum.

    Called by :func:`writing` after the metadata is consolidated and before the store
    is renamed into place, so the inventory describes exactly the files readers see.
    """
    root = Path(root)
    files = _walk(root)
    with ThreadPoolExecutor(max_workers=_threads()) as pool:
        sums = dict(zip(files, pool.map(lambda k: _digest(root / k), files), strict=True))
    doc = {"format": INVENTORY_FORMAT, "store": kind, "checksum": "sha256-128",
           "files": {k: [files[k], sums[k]] for k in sorted(files)}}
    write_atomic(root / INVENTORY, json.dumps(doc, indent=0, separators=(",", ":")))


def _threads() -> int:
    # Checksumming is I/O plus GIL-free hashing: a few threads overlap reads on network disks.
    return max(1, min(8, os.cpu_count() or 1))


def rerun_hint(path: str | Path, kind: str) -> str:
    """What to run to rebuild a store of ``kind`` at ``path``, as one clause."""
    stage = STAGE.get(kind, "prepare")
    if kind == "masks":
        # A missing masks store makes its prepare unit stale, and such a unit rebuilds only
        # the masks (identically, from a fixed seed): cheaper than re-preparing everything.
        return f"delete {path} and rerun the study: toolkit run {study_ref(path)} (its prepare unit rebuilds the masks)"
    return f"rerun the {stage} stage: toolkit run {study_ref(path)} --force {stage}"


def study_ref(path: str | Path) -> str:
    """The study file to name in a hint about ``path``: the study.json of the study folder
    holding it (written by the dispatcher), else the placeholder ``STUDY``."""
    # Stores and checkpoints sit at most 5 levels below the study root (toolkit/study.py).
    for parent in list(Path(path).resolve().parents)[:6]:
        study_file = Layout.of_folder(parent).study_file
        if study_file.is_file():
            return str(study_file)
    return "STUDY"


def _describe(key: str) -> str:
    """A store key in words: which chunk of which array, or which metadata file."""
    parts = key.split("/")
    if "c" in parts[:-1] or parts[0] == "c":
        i = parts.index("c")
        array = "/".join(parts[:i]) or "/"
        return f"array '{array}' chunk {'/'.join(parts[i:])}"
    if parts[-1] == "zarr.json":
        owner = "/".join(parts[:-1])
        return f"metadata of '{owner}' ({key})" if owner else "root metadata (zarr.json)"
    return f"file {key}"


def _read_inventory(path: Path, kind: str) -> dict[str, Any] | None:
    """The parsed inventory of a store, or None when the store has none."""
    file = path / INVENTORY
    if not file.is_file():
        return None
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
        files = doc["files"]
        ok = (doc.get("format") == INVENTORY_FORMAT and isinstance(files, dict)
              and all(isinstance(v, list) and len(v) == 2 for v in files.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        ok = False
    if not ok:
        raise StoreError(f"{path}: {INVENTORY} is unreadable or damaged, so the store cannot be "
                         f"checked; {rerun_hint(path, kind)}")
    return doc


def verify_store(path: str | Path, kind: str, level: Verify = "size",
                 inventory: dict[str, Any] | None = None) -> None:
    """Check a store's files against its inventory.

    Parameters
    ----------
    level
        ``"size"``: every inventoried file is present with its recorded size, no other
        file is there, and metadata files (``zarr.json``, small) match their checksum.
        ``"full"``: also every chunk's checksum (reads the whole store once).
        ``"none"``: nothing.

    Raises
    ------
    StoreError
        The inventory is missing or damaged, or a file is missing, of the wrong size,
        unexpected or corrupt; the message names the store, the array and the chunk.
    """
    if level == "none":
        return
    if level not in ("size", "full"):
        raise ValueError(f"verify must be 'none', 'size' or 'full', not {level!r}")
    path = Path(path)
    doc = inventory if inventory is not None else _read_inventory(path, kind)
    if doc is None:
        raise StoreError(f"{path}: '{kind}' store has no {INVENTORY} (written by an older toolkit, "
                         f"another tool, or damaged), so missing chunks cannot be detected; "
                         f"{rerun_hint(path, kind)}")
    want: dict[str, list[Any]] = doc["files"]
    try:
        have = _walk(path)
    except OSError as e:
        raise StoreError(f"{path}: cannot list the store ({e.strerror or e}); check the disk") from e
    fix = rerun_hint(path, kind)
    for key, (size, _) in want.items():
        if key not in have:
            raise StoreError(f"{path}: {_describe(key)} is missing (deleted or lost after the store "
                             f"was written; Zarr would read it as fill values); {fix}")
        if have[key] != size:
            raise StoreError(f"{path}: {_describe(key)} has {have[key]} bytes, {size} were written "
                             f"(truncated or replaced); {fix}")
    extra = sorted(set(have) - set(want))
    if extra:
        raise StoreError(f"{path}: {_describe(extra[0])} is not in the store's inventory "
                         f"({len(extra)} unexpected file(s); the store was changed after it was "
                         f"written); {fix}")
    keys = list(want) if level == "full" else [k for k in want if k.endswith("zarr.json")]
    with ThreadPoolExecutor(max_workers=_threads()) as pool:
        for key, got in zip(keys, pool.map(lambda k: _digest(path / k), keys), strict=True):
            if got != want[key][1]:
                raise StoreError(f"{path}: {_describe(key)} does not match its recorded checksum "
                                 f"(corrupt bytes); {fix}")


# --------------------------------------------------------------------------- write / open


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
    ends without error the store is validated, its metadata consolidated, its
    inventory (:data:`INVENTORY`) written and the folder renamed to ``path``; on any
    error the temporary folder is removed and nothing appears at ``path`` (an older
    store there is left as it was).

    Raises
    ------
    StoreError
        ``path`` exists (without ``overwrite``), the folder is not writable, the disk
        is full (naming the mount point and its free space), or the store does not
        match its schema.
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
        try:
            group = zarr.open_group(store=str(tmp), mode="w", zarr_format=3)
            group.attrs.update({"schema": kind, "schema_version": schema(kind)["version"], **(attrs or {})})
            yield group
            validate(group, kind, path)
            zarr.consolidate_metadata(str(tmp))
            write_inventory(tmp, kind)
        except Exception as e:  # zarr may wrap the OSError of a full disk in its own types
            raise_if_no_space(e, path)
            raise
        replace_folder(tmp, path)
    finally:
        if tmp.exists():
            _remove(tmp)


def _remove(folder: Path) -> None:
    """Remove a temporary store folder, also when Zarr's writer tasks still add chunks.

    When one chunk write of ``arr[...] = data`` fails (a full disk), Zarr's other writes
    of that call go on in its event-loop thread and recreate folders after a first
    removal; so remove until the folder stays absent for a while (a few seconds at most).
    """
    absent_since = None
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if folder.exists():
            absent_since = None
            shutil.rmtree(folder, ignore_errors=True)
        elif absent_since is None:
            absent_since = time.monotonic()
        elif time.monotonic() - absent_since > 0.3:
            return
        time.sleep(0.05)


def open_store(path: str | Path, kind: str, mode: str = "r", *, verify: Verify = "full") -> Any:
    """Open, validate and verify a store.

    Parameters
    ----------
    verify
        ``"full"`` (default): every chunk's checksum is checked before anything is
        read, as needed before numbers are computed from the store. ``"size"``: only
        that every chunk is present with its size (a directory walk), for callers that
        read attributes only or read lazily. ``"none"``: no file checks, but the store
        must still have an inventory. See :func:`verify_store`.

    Raises
    ------
    StoreError
        No store there, not a readable Zarr v3 store, a schema mismatch, no inventory
        (an older toolkit's store), or a missing, extra or damaged chunk.
    """
    zarr = _zarr()
    path = Path(path)
    if not path.exists():
        raise StoreError(f"{path}: no '{kind}' store here; run the stage that writes it first")
    inventory = _read_inventory(path, kind)
    try:
        group = zarr.open_group(store=str(path), mode=mode, zarr_format=3)
    except Exception as e:  # zarr raises several unrelated types for a broken folder
        if inventory is not None:  # damaged metadata: name the file rather than zarr's complaint
            verify_store(path, kind, "size", inventory)
        why = " ".join(str(e).split())[:300]  # one line: the CLI prints one line per error
        raise StoreError(f"{path}: not a readable Zarr v3 store ({why}); {rerun_hint(path, kind)}") from e
    # Schema first: a store of another version is refused with the version, not its files.
    validate(group, kind, path)
    if verify != "none" or inventory is None:
        verify_store(path, kind, "size" if verify == "none" else verify, inventory)
    return group


def open_dataset(path: str | Path, kind: str, chunks: Any = None, group: str | None = None,
                 *, verify: Verify = "full") -> Any:
    """Open a store lazily as a Dask-backed ``xarray.Dataset`` (validated and verified first).

    ``chunks=None`` keeps the stored chunking (``"auto"`` cannot chunk string
    arrays); ``group`` opens a sub-group such as ``distribution`` of a masks store;
    ``verify`` as in :func:`open_store` (``"size"`` keeps opening cheap; a corrupt
    chunk then fails when read, through the arrays' CRC32C codec).

    Every variable carries ``long_name``, ``units`` and ``description`` as the schema
    of this toolkit defines them (also for a store written before one of them existed),
    and string arrays are fixed-width ``<U`` rather than StringDType (:func:`plain_strings`).
    """
    import xarray as xr

    open_store(path, kind, verify=verify)
    ds = xr.open_zarr(str(path), chunks={} if chunks is None else chunks, zarr_format=3,
                      consolidated=True, group=group)
    return plain_strings(_with_schema_attrs(ds, kind, group))


def _with_schema_attrs(ds: Any, kind: str, group: str | None) -> Any:
    """Every variable of the schema with its attributes as this toolkit's schema defines them.

    Stores written before long_name existed (or with other unit spellings) present the
    same attributes as new ones: the schema, not the store, is the source of truth.
    """
    arrays = schema(kind)["arrays"]
    prefix = f"{group.strip('/')}/" if group else ""
    for name in ds.variables:
        key = prefix + str(name)
        spec = arrays.get(key) or (arrays.get(f"{prefix}*") if prefix else None)
        if spec is not None:
            ds.variables[name].attrs.update(_cf_attrs(spec))
    return ds


def fixed_strings(values: Any) -> np.ndarray:
    """Any array of strings (StringDType, object) as a fixed-width ``<U`` numpy array."""
    arr = np.asarray(values)
    return np.asarray([str(v) for v in arr.ravel()], dtype=str).reshape(arr.shape)


def plain_strings(ds: Any) -> Any:
    """Zarr v3 string arrays as fixed-width numpy strings (``<U``), not numpy's StringDType.

    xarray refuses to plot StringDType coordinates (``s.fisher_share.plot.line(x="group")``)
    and matplotlib needs ``<U``, not ``object``. Coordinates are labels, read at once; string
    data variables stay lazy (Dask, declared ``object`` as the width is not known before) and
    are ``<U`` as wide as their longest value once computed.
    """
    import dask.array as da

    fixed = fixed_strings
    for name in list(ds.variables):
        var = ds.variables[name]
        if var.dtype.kind != "T":
            continue
        if name in ds.coords:
            ds = ds.assign_coords({name: (var.dims, fixed(var.values), var.attrs)})
        elif isinstance(var.data, da.Array):
            ds[name] = (var.dims, da.map_blocks(fixed, var.data, dtype=object), var.attrs)
        else:
            ds[name] = (var.dims, fixed(var.values), var.attrs)
    return ds
