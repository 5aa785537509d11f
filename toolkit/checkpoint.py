"""Resumable training state on disk, written atomically and verified before use.

A checkpoint is a folder ``checkpoints/step-XXXXXXXX/`` holding::

    model.safetensors   model weights (tied weights stored once)
    optim.pt            optimizer and LR-scheduler state (tensors, numbers, lists only)
    rng.pt              torch CPU and CUDA generator states
    state.json          step, data position, logs, Python and NumPy RNG states
    meta.json           sha256 of every file above; written last

It is built in a hidden temporary folder and renamed into place, so a crash leaves
either the complete folder or nothing under that name. On start the newest folder
whose checksums verify is used; a corrupt or partial one is skipped with a warning.
Nothing is unpickled: ``torch.load(weights_only=True)``, safetensors and JSON only.

Exported HuggingFace folders (``final``, ``best``, Fisher-flow snapshots) are written
the same way with :func:`save_hf`: weights, ``config.json`` and the run's tokenizer
(``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``), then
``checksums.json`` (size and sha256 of every file) last; :func:`verify_export` checks it before the folder is loaded
(``toolkit.model.load_model``). Folders without it (external checkpoints given in
``runs.X.checkpoints``) are loaded unchecked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from toolkit.errors import CheckpointError

log = logging.getLogger(__name__)

PREFIX = "step-"
FORMAT = 1
EXPORT_META = "checksums.json"
_FILES = ("model.safetensors", "optim.pt", "rng.pt", "state.json")


def step_name(step: int) -> str:
    """Folder name of the checkpoint after ``step`` optimizer steps."""
    return f"{PREFIX}{step:08d}"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and prove a file can be written in it, else :class:`CheckpointError`.

    A probe file is used rather than ``os.access``: it also catches read-only mounts
    and full quotas, and is honest when running as root.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"{folder}: checkpoint folder is not writable ({e.strerror or e}); "
                              "choose a writable output_dir") from e


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _share(folder: Path) -> None:
    """Give every file in ``folder`` the user's umask mode (:func:`toolkit.plumbing.file_mode`).

    safetensors creates its file with mode 0600 whatever the umask, which would hide
    the weights from colleagues sharing the project folder.
    """
    from toolkit.plumbing import file_mode

    mode = file_mode()
    for f in folder.iterdir():
        if f.is_file() and not f.is_symlink():
            os.chmod(f, mode)


def _install(tmp: Path, dest: Path) -> None:
    """Rename a finished temporary folder to ``dest``, replacing what is there."""
    if dest.exists():
        trash = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(dest, trash)
        os.replace(tmp, dest)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, dest)


def save_hf(model: Any, dest: Path, tokenizer: Any = None) -> None:
    """``model.save_pretrained`` into ``dest`` atomically (replacing an older folder).

    Parameters
    ----------
    model
        A ``transformers`` model.
    dest
        The folder to (re)place.
    tokenizer
        Written next to the weights, in the same temporary folder, so that
        ``AutoTokenizer.from_pretrained(dest)`` and ``pipeline("fill-mask", model=dest)``
        work on the folder alone: a toolkit :class:`~toolkit.tokenizers.Tokenizer` (its
        ``save_pretrained``, ``model_max_length`` = the model's positions) or a
        ``transformers`` tokenizer (an adopted checkpoint's own). None: weights only.

    The files' sizes and sha256 (tokenizer files included) go to ``checksums.json``,
    written last.
    """
    from transformers.utils import logging as hf_logging

    tmp = dest.with_name(f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}")
    bars = hf_logging.is_progress_bar_enabled()
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        hf_logging.disable_progress_bar()  # a "Writing model shards" bar per save drowns the log
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            _save_tokenizer(tokenizer, model, tmp)
        # The checksums let a reader tell a truncated or damaged export from a good one.
        files = sorted(f for f in tmp.iterdir() if f.is_file())
        meta = {"format": FORMAT, "files": {f.name: {"bytes": f.stat().st_size, "sha256": sha256(f)}
                                            for f in files}}
        (tmp / EXPORT_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _share(tmp)
        for f in tmp.iterdir():
            _fsync_file(f)
        _install(tmp, dest)
    except Exception as e:  # safetensors reports a full disk as its own SafetensorError
        from toolkit.plumbing import raise_if_no_space

        raise_if_no_space(e, dest, error=CheckpointError)
        if not isinstance(e, OSError):
            raise
        raise CheckpointError(f"{dest}: cannot write model folder ({e.strerror or e})") from e
    finally:
        if bars:
            hf_logging.enable_progress_bar()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def model_positions(model: Any) -> int:
    """The longest input (tokens, specials included) the model's position table takes.

    RoBERTa-style absolute positions start after the padding index (ids ``padding_idx +
    1 ...``), so they take ``num_embeddings - padding_idx - 1`` tokens; rotary models
    (ESM-2) have no table and report ``max_position_embeddings``.
    """
    emb = getattr(model.base_model, "embeddings", None)
    table = getattr(emb, "position_embeddings", None)
    if table is None or not hasattr(table, "num_embeddings"):
        return int(getattr(model.config, "max_position_embeddings", 1 << 30))
    if getattr(model.config, "model_type", None) != "bert" and table.padding_idx is not None:
        return int(table.num_embeddings) - int(table.padding_idx) - 1
    return int(table.num_embeddings)


def _save_tokenizer(tokenizer: Any, model: Any, folder: Path) -> None:
    from toolkit.tokenizers import Tokenizer

    if isinstance(tokenizer, Tokenizer):
        tokenizer.save_pretrained(folder, model_max_length=model_positions(model))
    else:
        tokenizer.save_pretrained(str(folder))


# --------------------------------------------------------------------------- RNG states


def rng_state_json() -> dict[str, Any]:
    """Python and NumPy global RNG states as JSON-able lists."""
    version, internal, gauss = random.getstate()
    legacy: Any = np.random.get_state()
    name, keys, pos, has_gauss, cached = legacy
    return {"python": [version, list(internal), gauss],
            "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def restore_rng_json(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def _torch_rng() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def _restore_torch_rng(state: dict[str, Any]) -> None:
    import torch

    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            log.warning("checkpoint has CUDA RNG states of %d devices, %d visible now; "
                        "dropout will not replay exactly", len(state["cuda"]), torch.cuda.device_count())
        else:
            torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- save / load


def save_checkpoint(folder: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
                    state: dict[str, Any], keep: int = 2) -> Path:
    """Write the full training state after ``step`` steps; keep the newest ``keep``.

    Parameters
    ----------
    folder
        The member's ``checkpoints/`` folder.
    state
        JSON-able training state (step, data position, logs, ...). The Python and
        NumPy RNG states are added here.

    Returns
    -------
    Path
        The installed ``step-XXXXXXXX`` folder.
    """
    import torch
    from safetensors.torch import save_model

    dest = folder / step_name(step)
    tmp = folder / f".{dest.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir(parents=True)
        save_model(model, str(tmp / "model.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "optim.pt")
        torch.save(_torch_rng(), tmp / "rng.pt")
        full = {**state, "format": FORMAT, "step": step, "rng": rng_state_json()}
        (tmp / "state.json").write_text(json.dumps(full), encoding="utf-8")
        _share(tmp)
        for name in _FILES:
            _fsync_file(tmp / name)
        meta = {"format": FORMAT, "step": step, "files": {n: sha256(tmp / n) for n in _FILES}}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
        _fsync_file(tmp / "meta.json")
        _install(tmp, dest)
    except Exception as e:  # safetensors reports a full disk as its own SafetensorError
        from toolkit.plumbing import raise_if_no_space

        raise_if_no_space(e, dest, error=CheckpointError)
        if not isinstance(e, OSError):
            raise
        raise CheckpointError(f"{dest}: cannot write checkpoint ({e.strerror or e}); "
                              "check the disk and the folder's permissions") from e
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    prune(folder, keep)
    return dest


def step_folders(folder: Path) -> list[Path]:
    """``step-*`` folders, newest first."""
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def prune(folder: Path, keep: int = 2) -> None:
    """Remove all but the newest ``keep`` checkpoints and leftovers of interrupted writes."""
    for old in step_folders(folder)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in folder.glob(f".{PREFIX}*.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)


def verify(path: Path) -> dict[str, Any]:
    """Check a checkpoint folder's files against its meta.json; return the meta.

    Raises
    ------
    CheckpointError
        meta.json is missing or unreadable, a file is missing, or a checksum differs.
    """
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
        files = meta["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: meta.json missing or unreadable ({e})") from e
    if meta.get("format") != FORMAT or set(files) != set(_FILES):
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} not readable "
                              f"by this toolkit (format {FORMAT})")
    for name, digest in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: {name} missing")
        if sha256(file) != digest:
            raise CheckpointError(f"{path}: {name} does not match its sha256 (corrupt file)")
    return meta


def verify_export(path: Path) -> bool:
    """Check an exported model folder against its ``checksums.json``.

    Returns
    -------
    bool
        True when the folder was verified, False when it has no checksum file (an
        external checkpoint: nothing to check against).

    Raises
    ------
    CheckpointError
        The checksum file is unreadable, or a listed file is missing, of another size
        (truncated) or of other content; the message names the file and says to rerun
        the member's training.
    """
    from toolkit.store import study_ref

    meta_file = path / EXPORT_META
    if not meta_file.exists():
        return False
    fix = f"rerun training for this member: toolkit run {study_ref(path)} --force train"
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        files = {str(k): (int(v["bytes"]), str(v["sha256"])) for k, v in meta["files"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{meta_file}: unreadable or damaged ({type(e).__name__}); {fix}") from e
    for name, (size, digest) in files.items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing from the exported checkpoint; {fix}")
        have = file.stat().st_size
        if have != size:
            raise CheckpointError(f"{file}: {have} bytes, {size} were written (truncated or "
                                  f"replaced); {fix}")
        if sha256(file) != digest:
            raise CheckpointError(f"{file}: does not match its sha256 (corrupt bytes); {fix}")
    return True


def latest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint under ``folder`` whose checksums verify, or None.

    A folder that fails verification is skipped with a warning and renamed
    ``corrupt-step-XXXXXXXX`` (kept for inspection, never pruned nor resumed from), so
    that it no longer counts as one of the checkpoints kept.
    """
    for path in step_folders(folder):
        try:
            verify(path)
        except CheckpointError as e:
            aside = path.with_name(f"corrupt-{path.name}")
            log.warning("skipping checkpoint: %s; moved to %s", e, aside.name)
            if aside.exists():
                shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            continue
        return path
    return None


def load_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, device: Any) -> dict[str, Any]:
    """Restore weights, optimizer, scheduler and every RNG from a verified checkpoint.

    Returns the training state saved with it (``state.json``).
    """
    import torch
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(path / "model.safetensors"), strict=False,
                                         device=str(device))
        # save_model drops one of two tied names; anything else missing is a real mismatch.
        real = [k for k in missing if k not in _tied_names(model)]
        if real or unexpected:
            raise CheckpointError(f"{path}: weights do not fit the model (missing {real[:3]}, "
                                  f"unexpected {list(unexpected)[:3]}); was the study's model changed?")
        opt = torch.load(path / "optim.pt", map_location=device, weights_only=True)
        optimizer.load_state_dict(opt["optimizer"])
        scheduler.load_state_dict(opt["scheduler"])
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
        state = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path}: cannot restore checkpoint ({e}); delete it to restart "
                              "from the previous one") from e
    _restore_torch_rng(rng)
    restore_rng_json(state["rng"])
    return state


def _tied_names(model: Any) -> set[str]:
    """Parameter names sharing storage with an earlier-named parameter."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        ptr = tensor.data_ptr()
        if ptr in seen:
            tied.add(name)
            tied.add(seen[ptr])
        else:
            seen[ptr] = name
    return tied
