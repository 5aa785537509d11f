"""How a unit's command line is built, optionally wrapped in an Apptainer/Singularity container.

Every job runs ``python -m toolkit unit <root>/study.json STAGE KEY``. With
``dispatch.container.runtime = "apptainer"`` (or ``"singularity"``) that command runs as::

    apptainer exec [--nv] --containall --cleanenv --bind B1,B2,... --env TOOLKIT_SCRATCH=S IMAGE \\
        python -m toolkit unit <root>/study.json STAGE KEY

``--nv`` only for stages that ask for GPUs. ``--containall`` (``--contain`` + ``--cleanenv``
+ ``--ipc`` + ``--pid``) makes a job see only the image and its binds: no host ``$HOME``
(an empty one instead: no ``~/.local`` packages, ``~/.cache`` or ``~/.config`` of the
user), no host working directory, a private ``/tmp`` and a minimal ``/dev``, its own
PID and IPC namespaces; ``--cleanenv`` is implied but kept explicit, so no host variable
(``PYTHONPATH``, ``TOOLKIT_SCHEMAS``, module-system paths) reaches the unit. Nothing in
a unit depends on what that hides: ``study.json`` holds absolute paths (resolved at
submission), the caches (``HF_HOME``, ``TORCH_HOME``, ``MPLCONFIGDIR``) go below
``TOOLKIT_SCRATCH`` (the image's ``%environment``), models and tokenizers load from the
study folder only, and units share files only through the study folder, never through
``/tmp`` (without ``dispatch.container.scratch`` the caches live in the job's private
``/tmp`` and are lost with it). The submitit process that starts the command stays on
the host (it must call ``scontrol requeue``); the runtime forwards its SIGTERM to the
unit.

The bind list is derived from the study (study folder, each corpus source folder,
external checkpoint folders, scratch, extra binds) and checked before anything is
queued: a path that does not exist, or that ``--bind`` cannot express (its syntax
uses ``,`` and ``:`` as separators), is a :class:`SubmissionError`. A path reached
through a symlink is bound from its real location to the path the study uses, so
that the container sees it where the job looks for it; a corpus file that is itself a
link (a folder of links into a shared store) also gets the folders its links pass
through, and a file that the binds still miss (a linked subfolder) is an error naming
the folder to add to ``dispatch.container.binds``.

Commands are argument lists (never shell strings); :func:`shell_line` quotes one with
:mod:`shlex` for logs and golden files, safe for paths with spaces and quotes. Quoting
does not help against a newline: ``shlex.quote`` keeps it, and in an sbatch script
it ends the ``#SBATCH`` comment and starts a shell line. Every value that reaches a
job script or a container command is checked with :func:`check_script_value` where
the script or command is built (the study file's validation refuses them earlier;
this is the last line of defence, for values set by code or ``--out``).
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import sys
from pathlib import Path

from toolkit.config import ContainerConfig, StudyConfig
from toolkit.errors import SubmissionError
from toolkit.study import Layout

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
"""C0 and C1 control characters, DEL and the Unicode line breaks."""
_NEWLINES = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


def check_script_value(value: object, field: str) -> str:
    """``str(value)``, refused if it holds a newline or another control character.

    Parameters
    ----------
    value
        A value about to be written into a job script or a job's command line.
    field
        Where it comes from (``dispatch.resources.train.account``), for the message.

    Raises
    ------
    SubmissionError
        The value holds a control character; nothing has been queued yet.
    """
    text = str(value)
    m = _CONTROL.search(text)
    if m is None:
        return text
    what = "a newline" if m.group() in _NEWLINES else f"the control character {m.group()!r}"
    shown = repr(text) if len(text) <= 80 else repr(text[:77]) + "..."
    raise SubmissionError(f"{field} contains {what} ({shown}); values are written into job scripts, "
                          "where a newline starts a new shell line: remove it and submit again")


def check_container_values(c: ContainerConfig) -> None:
    """The container settings (``dispatch.container``) that reach the job's command line hold
    no control characters."""
    check_script_value(c.runtime, "dispatch.container.runtime")
    if c.image is not None:
        check_script_value(c.image, "dispatch.container.image")
    if c.scratch:
        check_script_value(c.scratch, "dispatch.container.scratch")
    for i, extra in enumerate(c.binds):
        check_script_value(extra, f"dispatch.container.binds[{i}]")


def is_path_source(source: str) -> bool:
    """True for a file/folder/glob source, False for ``builtin:``, ``synthetic:``, ``shuffle:``."""
    return ":" not in source.split("/", 1)[0]


def _bind_entry(path: Path, what: str) -> str:
    """``real:as_used`` when ``path`` goes through a symlink, else the path itself."""
    check_script_value(path, what)
    if not path.is_absolute():
        raise SubmissionError(f"{what}: '{path}' is not absolute; give an absolute path")
    if not path.exists():
        raise SubmissionError(f"{what}: '{path}' does not exist on the submitting machine; "
                              "fix the path or create it before submitting")
    real = path.resolve()
    for p in {real, path}:
        check_script_value(p, what)  # the real location may differ from the checked path
        if "," in str(p) or ":" in str(p):
            raise SubmissionError(f"{what}: '{p}' cannot be bound into the container (',' and ':' "
                                  "separate --bind entries); move or symlink it to a plain path")
    return str(real) if real == path else f"{real}:{path}"


def _source_path(base_dir: Path, source: str) -> Path:
    """A path source as the job will use it: absolute (relative to the study file's folder
    ``base_dir``), symlinks kept."""
    path = Path(source).expanduser()
    return path if path.is_absolute() else base_dir / path


def _source_folder(base_dir: Path, name: str, source: str) -> Path:
    path = _source_path(base_dir, source)
    if glob.has_magic(str(path)):
        # Bind the deepest folder above the first wildcard; the matches must exist now.
        if not glob.glob(str(path)):
            raise SubmissionError(f"corpora.{name}.source: '{path}' matches no file; "
                                  "fix the pattern before submitting")
        parts = path.parts
        first = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        return Path(*parts[:first])
    if not path.exists():
        raise SubmissionError(f"corpora.{name}.source: '{path}' does not exist; "
                              "fix the path in the study file before submitting")
    return path if path.is_dir() else path.parent


def _source_files(path: Path) -> list[Path]:
    """The files a path source reads, as the study names them (a glob's matches, a folder's files)."""
    if glob.has_magic(str(path)):
        return [Path(p) for p in glob.glob(str(path), recursive=True)]
    if path.is_dir():
        return [Path(d) / f for d, _, files in os.walk(path, followlinks=True) for f in files]
    return [path]


def _link_folders(file: Path, limit: int = 40) -> list[Path]:
    """The folders a symlinked file's chain of links passes through, as each link names them.

    ``data/genome.fa -> /store/v3/genome.fa`` needs ``/store/v3`` in the container as well
    as ``data``; a link to a link needs every hop's folder.
    """
    folders, hop = [], file
    for _ in range(limit):
        if not hop.is_symlink():
            break
        target = Path(os.readlink(hop))
        hop = target if target.is_absolute() else hop.parent / target
        folders.append(Path(os.path.abspath(hop.parent)))
    return folders


def _inside_any(path: Path, folders: list[Path]) -> bool:
    return any(path == f or f in path.parents for f in folders)


def bind_paths(study: StudyConfig) -> list[str]:
    """Every ``--bind`` entry the study needs, checked; in a stable order without duplicates.

    Raises
    ------
    SubmissionError
        A path is missing, relative, or cannot be written in ``--bind`` syntax, or a
        corpus file would not be visible in the container (a linked subfolder).
    """
    c = study.dispatch.container
    entries: list[str] = [_bind_entry(study.root, "study folder (study.output_dir)")]
    files: list[tuple[str, Path]] = []  # corpus files whose real place is outside their folder
    for name, corpus in study.corpora.items():
        if is_path_source(corpus.source):
            what = f"corpora.{name}.source"
            folder = _source_folder(study.base_dir, name, corpus.source)
            entries.append(_bind_entry(folder, what))
            real = Path(os.path.realpath(folder))
            for file in _source_files(_source_path(study.base_dir, corpus.source)):
                if _inside_any(Path(os.path.realpath(file)), [real]):
                    continue
                entries += [_bind_entry(hop, f"{what} (through the link {file})")
                            for hop in _link_folders(file) if not _inside_any(hop, [folder])]
                files.append((what, file))
    for run_name, run in study.runs.items():
        for i, ckpt in enumerate(run.checkpoints):
            entries.append(_bind_entry(study.resolve_path(ckpt), f"runs.{run_name}.checkpoints[{i}]"))
    if c.scratch:
        scratch = study.resolve_path(c.scratch)
        scratch.mkdir(parents=True, exist_ok=True)
        entries.append(_bind_entry(scratch, "dispatch.container.scratch"))
    for i, extra in enumerate(c.binds):
        # Extra binds may be ``src`` or ``src:dst[:opts]``; only ``src`` must exist here.
        src, sep, rest = extra.partition(":")
        host = _bind_entry(study.resolve_path(src), f"dispatch.container.binds[{i}]")
        entries.append(host if not sep else f"{host.split(':')[0]}:{rest}")
    sources = [Path(os.path.realpath(e.split(":")[0])) for e in entries]
    for what, file in files:
        if not _inside_any(Path(os.path.realpath(file)), sources):
            raise SubmissionError(
                f"{what}: '{file}' is outside every bound folder (its real place is "
                f"'{os.path.realpath(file)}', reached through a linked folder), so the container "
                "would not see it; add that folder to dispatch.container.binds")
    return list(dict.fromkeys(entries))


def check_container(study: StudyConfig) -> None:
    """Check the runtime, the image and every bind before anything is queued.

    Raises
    ------
    SubmissionError
        The runtime is not on PATH, the image is missing, or a bind path is bad.
    """
    c = study.dispatch.container
    if c.runtime == "none":
        return
    check_container_values(c)
    if shutil.which(c.runtime) is None:
        raise SubmissionError(f"dispatch.container.runtime: '{c.runtime}' is not on PATH on this "
                              "machine; load its module or set runtime = \"none\"")
    assert c.image is not None  # validate_study guarantees it
    image = study.resolve_path(c.image)
    if not image.is_file():
        raise SubmissionError(f"dispatch.container.image: '{image}' not found; build it with "
                              "`make container` (on a machine with apptainer) or fix the path")
    bind_paths(study)


def unit_argv(study: StudyConfig, stage: str, key: str, *, python: str | None = None) -> list[str]:
    """The command that runs one unit, wrapped in the container when one is configured.

    Parameters
    ----------
    study
        The resolved study; its ``<root>/study.json`` (written by the dispatcher) is what
        the job reads, so ``--set`` overrides and ``--out`` are honoured.
    stage, key
        The unit, as in :func:`toolkit.study.iter_units`.
    python
        Interpreter outside a container (default: this one, i.e. the project's venv).
    """
    study_json = check_script_value(Layout(study).study_file, "study folder (study.output_dir or --out)")
    c = study.dispatch.container
    if c.runtime == "none":
        return [python or sys.executable, "-m", "toolkit", "unit", study_json, stage, key]
    assert c.image is not None
    check_container_values(c)
    scratch = str(study.resolve_path(c.scratch)) if c.scratch else "/tmp"
    gpus = study.dispatch.resources_for(stage).gpus_per_node > 0
    return [
        c.runtime, "exec", *(["--nv"] if gpus else []), "--containall", "--cleanenv",
        "--bind", ",".join(bind_paths(study)),
        "--env", f"TOOLKIT_SCRATCH={scratch}",
        str(study.resolve_path(c.image)),
        "python", "-m", "toolkit", "unit", study_json, stage, key,
    ]


def shell_line(argv: list[str]) -> str:
    """One shell-safe line for an argument list (logs, golden files, sbatch scripts)."""
    return shlex.join(argv)

