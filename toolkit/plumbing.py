"""Small conventions that several modules share, each written once.

- :data:`IGNORE`: the label of a position that is not predicted.
- :data:`EXIT_REQUEUE`: the exit status of a unit that saved its state and must run again.
- :func:`network_order`: the sort key that puts Fisher groups in the order of the network.
- :func:`write_atomic` / :func:`write_json_atomic`: replace a file so that no reader
  ever sees it half written.

Nothing here imports the rest of the toolkit at module level, so any module may import it.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

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


def write_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` so that a reader sees the old file or the new one,
    never a half-written one.

    Written to a temporary file in the same folder (a rename is atomic only within one
    file system), flushed to disk, then renamed over ``path`` (``os.replace`` replaces a
    link at ``path`` itself, never the file it points to). The file gets the mode of any
    file the user creates (:func:`toolkit.study.file_mode`), not mkstemp's 0600, so a
    study in a shared folder stays readable by its group. On any failure the temporary
    file is removed and the error raised.
    """
    from toolkit.study import file_mode

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
        from toolkit.store import raise_if_no_space

        raise_if_no_space(e, path)
        raise
