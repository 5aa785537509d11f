"""Small conventions that several modules share, each written once.

- :data:`IGNORE`: the label of a position that is not predicted.
- :data:`EXIT_REQUEUE`: the exit status of a unit that saved its state and must run again.
- :func:`network_order`: the sort key that puts Fisher groups in the order of the network.
- :func:`write_atomic` / :func:`write_json_atomic`: replace a file so that no reader
  ever sees it half written.
- :func:`raise_if_no_space`: a full disk or quota as one line naming the mount.
- :func:`open_regular`, :func:`read_small_file`, :func:`tail_lines`: reading files of a
  folder others may write to (never blocking on a planted FIFO or device).
- :func:`release_freed_memory`: hand memory freed by native code back to the system.
- :func:`file_mode`: the mode a new file of this user gets (files made through temporary
  names get it too, so a study in a shared folder stays readable by its group).

Nothing here imports the rest of the toolkit but :mod:`toolkit.errors`, so any module may
import it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

from toolkit.errors import StoreError, ToolkitError

IGNORE = -100
"""Label of a position that is not predicted (masks, losses, Fisher). -100 is the
HuggingFace convention (``ignore_index`` of its losses), so exported masks work there too."""

EXIT_REQUEUE = 75
"""Exit status of a unit that saved its state and wants to be run again (EX_TEMPFAIL):
training exits with it on SIGTERM / SIGUSR2, and dispatch requeues a unit that does."""


def network_order(name: str) -> tuple[int, int, str]:
    """Sort key of a Fisher group (block) name: ``embeddings``, ``layer.0``, ``layer.1``, ...,
    ``head``, then any other name alphabetically.

    Layers sort by number (``layer.10`` after ``layer.9``), which a plain string sort gets
    wrong; stored groups, the summary's blocks and the results tree all use this one order.
    A name below a layer (``layer.3.attention``) sorts with its layer.
    """
    if name == "embeddings":
        return (0, 0, name)
    if name.startswith("layer."):
        index = name[6:].partition(".")[0]
        if index.isdigit():
            return (1, int(index), name)
    return (2 if name == "head" else 3, 0, name)


_UMASK: int | None = None


def _read_umask() -> int:
    """This process's umask, without changing it.

    ``os.umask(0); os.umask(old)`` would briefly give every file created by another
    thread mode 0o666; Linux reports the umask in ``/proc/self/status`` instead. The
    fallback (other systems) does the swap once, at the first call.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8) & 0o777
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old & 0o777


def file_mode() -> int:
    """The mode a plain ``open(path, "w")`` would give a new file here: ``0o666 & ~umask``.

    Files made with :func:`tempfile.mkstemp` (and by safetensors) are 0600 whatever the
    umask, so colleagues sharing a project folder could not read a study; every such
    file is given this mode before it is renamed into place. The umask is read once per
    process (it is a per-process setting that the toolkit never changes).
    """
    global _UMASK
    if _UMASK is None:
        _UMASK = _read_umask()
    return 0o666 & ~_UMASK


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old file or the new one,
    never a half-written one.

    Written to a temporary file in the same folder (a rename is atomic only within one
    file system), flushed to disk, then renamed over ``path`` (``os.replace`` replaces a
    link at ``path`` itself, never the file it points to). The file gets the mode of any
    file the user creates (:func:`file_mode`), not mkstemp's 0600, so a
    study in a shared folder stays readable by its group. On any failure the temporary
    file is removed and the error raised.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.fchmod(f.fileno(), file_mode())
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON with :func:`write_atomic`.

    Insertion order is kept (in study.json the order of runs is the report's order). A
    full disk is one :class:`~toolkit.errors.StoreError` line naming the mount, not a
    traceback.
    """
    text = json.dumps(data, indent=2, default=str)
    try:
        write_atomic(path, text)
    except OSError as e:
        raise_if_no_space(e, path)
        raise


# --------------------------------------------------------------------------- disk full


def mount_point(path: str | Path) -> Path:
    """The mount point of the file system holding ``path`` (or its nearest existing parent)."""
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        p = p.parent
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def _human(n: float) -> str:
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def _no_space_cause(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT OSError inside ``exc`` (its causes, contexts or group), if any."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return e
        if not isinstance(e, OSError) and "(os error 28)" in str(e):  # Rust I/O (safetensors)
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        todo.extend(x for x in (e.__cause__, e.__context__) if x is not None)
        todo.extend(getattr(e, "exceptions", ()) or ())
    return None


def raise_if_no_space(exc: BaseException, target: str | Path, *, needed: int | None = None,
                      error: type[ToolkitError] = StoreError) -> None:
    """Turn a full disk (ENOSPC, or a full quota) met while writing ``target`` into one line.

    Does nothing when ``exc`` is not about space, so callers re-raise it afterwards.

    Parameters
    ----------
    needed
        Bytes the write needed, when the caller knows.
    error
        The :class:`ToolkitError` subclass to raise.
    """
    cause = _no_space_cause(exc)
    if cause is None:
        return
    mount = mount_point(target)
    try:
        free = f"{_human(shutil.disk_usage(mount).free)} free"
    except OSError:
        free = "free space unknown"
    if needed is not None:
        free += f", {_human(needed)} needed"
    what = "quota exceeded" if cause.errno == errno.EDQUOT else "no space left"
    raise error(f"{what} on {mount} ({free}) while writing {target}; free space or choose "
                "another output_dir (--out); the previous results there are unchanged") from exc


# --------------------------------------------------------------------------- reading shared folders


def open_regular(path: str | Path, *, follow: bool = True) -> int | None:
    """A read-only descriptor of ``path`` if it is a regular file, else None.

    Study folders may be shared and writable by others: a FIFO or device planted
    under a log's name must not block or flood ``toolkit status``, so the file is
    opened without blocking and checked before anything is read.
    """
    flags = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    if not follow:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # absent, a link (follow=False), unreadable: nothing to read
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def read_small_file(path: str | Path, limit: int) -> bytes | None:
    """The bytes of a regular file of at most ``limit`` bytes; None if absent, odd or larger.

    Symbolic links are not followed: the files read this way are written by the
    toolkit itself, never through a link.
    """
    try:
        fd = open_regular(path, follow=False)
        if fd is None:
            return None
        with os.fdopen(fd, "rb") as f:
            data = f.read(limit + 1)
    except OSError:
        return None
    return data if len(data) <= limit else None


def tail_lines(path: str | Path, tail_bytes: int) -> list[str]:
    """The lines of the last ``tail_bytes`` of a log file ([] if it is not there yet)."""
    try:
        fd = open_regular(path)
        if fd is None:
            return []
        with os.fdopen(fd, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - tail_bytes))
            return f.read(tail_bytes).decode("utf-8", "replace").splitlines()
    except OSError:
        return []


# --------------------------------------------------------------------------- memory


def release_freed_memory() -> bool:
    """Return memory that native libraries freed to the system (glibc ``malloc_trim``).

    Rust and C extensions (the BPE trainer, NumPy temporaries) free into the C allocator,
    which keeps large freed regions for reuse: a process's resident memory stays at its
    peak although nothing uses it, and a job's memory limit sees that peak for the rest of
    the run. True when the allocator was asked (glibc), False elsewhere (a no-op).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS): nothing to do
        return False
    trim(0)
    return True
