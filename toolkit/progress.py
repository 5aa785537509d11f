"""Progress, written once: durations for people (:func:`format_duration`), the one
progress line of long loops (:class:`LogProgress`, :func:`progress_bar`) and a member's
live loss curve while it trains.

``train.zarr`` is written once, when a member finishes (its inventory, digests and the
unit model see only complete stores). While the member trains, the same curve grows in
``members/<run>/seed<N>/train.progress.jsonl``, one JSON object a line:

- ``{"event": "start", "member", "total_steps", "step", "pid", "host", "time"}``: a
  training process began (``step``: where it resumed);
- ``{"event": "log", "step", "total_steps", "loss", "lr", "tokens_seen", "time",
  "tokens_per_second", "eta_s"}``: a log point (``log_every_steps``), the entries of
  ``train.zarr``'s ``step``/``loss``/``lr``/``tokens_seen`` plus the rate of the last
  window and the ETA of the process when it was written;
- ``{"event": "eval", "step", "loss"}``: an evaluation (``eval_step``/``eval_loss``);
- ``{"event": "end", "reason", "step", "time"}``: ``done`` or ``preempted``.

The file is not an output of the train unit: nothing digests or verifies it, and
``train.zarr`` is exactly what it was without it. Every process start rewrites it
(atomically) from the resumed checkpoint's log, so steps logged after that checkpoint by
a killed process are dropped and a resumed member's curve has no duplicate steps; lines
are then appended, at most one write a second (see :class:`ProgressWriter`). A reader
skips a last line that is still being written.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

PROGRESS_FILE = "train.progress.jsonl"
FLUSH_EVERY_S = 1.0
"""Lines are buffered and written at most this often (evaluations and ends at once): one
small append a second costs nothing next to a training step, and a reader is at most
this much behind."""


def format_duration(seconds: float | None) -> str:
    """A duration for people: ``42 s``, ``3 min 05 s``, ``1 h 02 min``, ``2 d 03 h``.

    Rounded down to the unit shown last; ``?`` when unknown (None, NaN, infinite).
    Negative durations are shown as ``0 s``.
    """
    if seconds is None or not math.isfinite(seconds):
        return "?"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 86400:
        return f"{s // 3600} h {s // 60 % 60:02d} min"
    return f"{s // 86400} d {s // 3600 % 24:02d} h"


def remaining_s(done: float, total: float | None, elapsed: float) -> float | None:
    """Seconds left at the average rate so far: ``(total - done) * elapsed / done``; None when
    it cannot be told (no total, nothing done yet)."""
    if total is None or done <= 0 or elapsed <= 0:
        return None
    return max(total - done, 0) * elapsed / done


def _amount(x: float) -> str:
    """A count for a progress line: integers as they are, large rates with a suffix."""
    if x >= 1e9:
        return f"{x / 1e9:.2f} G"
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x == int(x):
        return f"{int(x)}"
    return f"{x:.1f}"


class LogProgress:
    """Progress as plain log lines: ``what: 40/95 task (12.3 task/s, ETA 4 s)``.

    The toolkit's one progress line, for every long loop that is not a training step
    (reading a corpus, encoding it, writing predictions, accumulating Fisher information,
    a Dask computation): a line at most every ``every_s`` seconds while it runs and one
    when it is closed (count, rate, time taken), so even a short loop leaves its rate in
    the log. What :func:`progress_bar` gives when stderr is not a terminal: a job's log
    file would otherwise collect a tqdm bar's carriage-return fragments.

    Used like a tqdm bar: :meth:`update`, :meth:`close`, a context manager, or iterated
    when made with an ``iterable``. Beyond a bar it takes

    - :meth:`moveto`: the count as a position (bytes read so far, records generated) and
      a total that grows (a Dask graph);
    - further counts by name, shown with their own rate (``update(1, {"tokens": 512})`` ->
      ``..., 512 tokens (1.2 M tokens/s)``);
    - ``scale`` and ``unit``: a count shown in other units (bytes as ``MB``: ``scale=1e6``);
    - ``note``: a text appended to every line (``3 worker(s)``).
    """

    def __init__(self, iterable: Any = None, *, total: float | None = None, desc: str = "",
                 unit: str = "it", every_s: float = 10.0, logger: logging.Logger | None = None,
                 scale: float = 1.0) -> None:
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.every_s, self.log, self.scale = every_s, logger or log, scale
        self.n: float = 0
        self.counts: dict[str, float] = {}
        self.note = ""
        self.t0 = self.last = time.monotonic()
        self.closed = False

    def update(self, n: float = 1, counts: dict[str, float] | None = None) -> None:
        """Add ``n`` to the count (and each named count to its own)."""
        self.n += n
        for k, v in (counts or {}).items():
            self.counts[k] = self.counts.get(k, 0) + v
        self._tick()

    def moveto(self, n: float, *, total: float | None = None, note: str | None = None,
               counts: dict[str, float] | None = None) -> None:
        """Set the count (and named counts, total, note) to where the work is now."""
        self.n = n
        self.counts.update(counts or {})
        if total is not None:
            self.total = total
        if note is not None:
            self.note = note
        self._tick()

    def _tick(self) -> None:
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self.last = now
            self.log.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        """The current progress line (what :meth:`update` logs)."""
        elapsed = max((time.monotonic() if now is None else now) - self.t0, 1e-9)
        rate = self.n / self.scale / elapsed
        count = _amount(self.n / self.scale)
        if self.total is not None:
            count += f"/{_amount(self.total / self.scale)}"
        extra = "".join(f", {_amount(v)} {k} ({_amount(round(v / elapsed, 1))} {k}/s)"
                        for k, v in self.counts.items())
        note = f"; {self.note}" if self.note else ""
        if self.closed:
            return (f"{self.desc}: {count} {self.unit} in {format_duration(elapsed)} "
                    f"({rate:.1f} {self.unit}/s){extra}{note}")
        eta = remaining_s(self.n, self.total, elapsed)
        return f"{self.desc}: {count} {self.unit} ({rate:.1f} {self.unit}/s, ETA {format_duration(eta)}){extra}{note}"

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.log.info("%s", self.line())

    def __iter__(self) -> Any:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def progress_bar(iterable: Any = None, *, total: int | None = None, desc: str = "", unit: str = "it",
                 every_s: float = 10.0, logger: logging.Logger | None = None) -> Any:
    """A tqdm bar when stderr is a terminal, else a :class:`LogProgress` (same use).

    Jobs write stderr to a log file, where a bar's redraws would be kept as
    ``\r``-separated fragments; there the progress becomes a log line every ``every_s``
    seconds and one at the end.
    """
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, total=total, desc=desc, unit=unit, mininterval=2.0, leave=False)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, every_s=every_s, logger=logger)


def progress_path(member_dir: Path) -> Path:
    """The live curve of the member whose folder is ``member_dir``."""
    return member_dir / PROGRESS_FILE


class ProgressWriter:
    """Appends a member's live curve while it trains (see the module docstring).

    Writing the live curve is a convenience: an error (full disk, unwritable folder) is
    logged once and the writer goes quiet; training is never stopped by it.

    Parameters
    ----------
    path
        The member's ``train.progress.jsonl``.
    member, total_steps
        Written into every start and log line.
    """

    def __init__(self, path: Path, member: str, total_steps: int) -> None:
        self.path, self.member, self.total = path, member, total_steps
        self._buffer: list[str] = []
        self._last_write = 0.0
        self._broken = False

    def start(self, step: int, logs: dict[str, list], evals: dict[str, list]) -> None:
        """Rewrite the file from a (resumed) state's log: ``logs`` holds ``step``, ``loss``,
        ``lr``, ``tokens_seen`` lists, ``evals`` ``step`` and ``loss`` (all up to ``step``)."""
        from toolkit.plumbing import write_atomic

        lines = [self._line({"event": "start", "member": self.member, "total_steps": self.total,
                             "step": step, "pid": os.getpid(), "host": socket.gethostname(),
                             "time": time.time()})]
        for s, loss, lr, seen in zip(logs["step"], logs["loss"], logs["lr"], logs["tokens_seen"],
                                     strict=True):
            lines.append(self._line({"event": "log", "step": s, "total_steps": self.total,
                                     "loss": loss, "lr": lr, "tokens_seen": seen}))
        lines += [self._line({"event": "eval", "step": s, "loss": loss})
                  for s, loss in zip(evals["step"], evals["loss"], strict=True)]
        try:
            write_atomic(self.path, "".join(lines))  # replaces a planted link itself, never its target
        except OSError as e:
            self._fail(e)
        self._last_write = time.monotonic()

    def log_point(self, step: int, loss: float, lr: float, tokens_seen: int,
                  tokens_per_second: float, eta_s: float) -> None:
        """A log point; written with the next flush (at most :data:`FLUSH_EVERY_S` later)."""
        self._buffer.append(self._line({
            "event": "log", "step": step, "total_steps": self.total, "loss": loss, "lr": lr,
            "tokens_seen": tokens_seen, "time": time.time(),
            "tokens_per_second": tokens_per_second, "eta_s": eta_s}))
        if time.monotonic() - self._last_write >= FLUSH_EVERY_S:
            self.flush()

    def eval_point(self, step: int, loss: float) -> None:
        """An evaluation loss; written at once with whatever is buffered."""
        self._buffer.append(self._line({"event": "eval", "step": step, "loss": loss}))
        self.flush()

    def end(self, reason: str, step: int) -> None:
        """The process stops training: ``done`` or ``preempted``."""
        self._buffer.append(self._line({"event": "end", "reason": reason, "step": step,
                                        "time": time.time()}))
        self.flush()

    def flush(self) -> None:
        """Append the buffered lines (one write, the file closed again for readers elsewhere:
        network file systems show other hosts a file's new data once it is closed)."""
        if self._buffer and not self._broken:
            try:
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write("".join(self._buffer))
            except OSError as e:
                self._fail(e)
        self._buffer.clear()
        self._last_write = time.monotonic()

    def close(self) -> None:
        """Write what is buffered (the training loop's exit, however it happens)."""
        self.flush()

    @staticmethod
    def _line(doc: dict[str, Any]) -> str:
        # NaN (a step without masked tokens) is written as null: the file stays strict JSON.
        clean = {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                 for k, v in doc.items()}
        return json.dumps(clean, separators=(",", ":")) + "\n"

    def _fail(self, e: OSError) -> None:
        if not self._broken:
            log.warning("%s: cannot write the live loss curve (%s); training goes on, the curve "
                        "is in train.zarr when it ends", self.path, e.strerror or e)
        self._broken = True


class CurveSinks:
    """Several writers of a member's curve (the live curve, TensorBoard events) behind one:
    each call goes to every sink, in order."""

    def __init__(self, sinks: list[Any]) -> None:
        self.sinks = sinks

    def start(self, step: int, logs: dict[str, list], evals: dict[str, list]) -> None:
        for s in self.sinks:
            s.start(step, logs, evals)

    def log_point(self, step: int, loss: float, lr: float, tokens_seen: int,
                  tokens_per_second: float, eta_s: float) -> None:
        for s in self.sinks:
            s.log_point(step, loss, lr, tokens_seen, tokens_per_second, eta_s)

    def eval_point(self, step: int, loss: float) -> None:
        for s in self.sinks:
            s.eval_point(step, loss)

    def end(self, reason: str, step: int) -> None:
        for s in self.sinks:
            s.end(reason, step)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


def parse_lines(lines: list[str]) -> list[dict[str, Any]]:
    """The entries of a progress file's lines; lines that are not JSON objects are skipped
    (the last one may be half-written)."""
    out = []
    for line in lines:
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict) and isinstance(doc.get("event"), str):
            out.append(doc)
    return out


def last_entries(path: Path, tail_bytes: int = 8192) -> list[dict[str, Any]]:
    """The entries near the end of a progress file ([] when there is none).

    Reads only the tail, never a FIFO or device planted under the name (a study folder
    may be writable by others): cheap enough for ``toolkit status`` on every member.
    """
    from toolkit.plumbing import tail_lines

    # A line cut at the start of the tail is not a JSON object (the entries hold none) and
    # is skipped like a half-written last line.
    return parse_lines(tail_lines(path, tail_bytes))


def open_progress(path: str | Path) -> Any:
    """The live loss curve of a member, as an :class:`xarray.Dataset`.

    Same variables as the member's ``train.zarr`` (``step``, ``loss``, ``lr``,
    ``tokens_seen`` along ``log_entry``; ``eval_step``, ``eval_loss`` along
    ``eval_entry``), from the lines written so far; attributes ``member``,
    ``total_steps`` and ``complete`` (the last process ended with ``done``).

    Parameters
    ----------
    path
        A member folder (``members/<run>/seed<N>``) or its ``train.progress.jsonl``.

    Raises
    ------
    FileNotFoundError
        The member has not started training (or was trained before live curves existed).
    """
    import numpy as np
    import xarray as xr

    path = Path(path)
    if path.is_dir():
        path = progress_path(path)
    with open(path, encoding="utf-8") as f:
        entries = parse_lines(f.read().splitlines())
    logs = [e for e in entries if e["event"] == "log"]
    evals = [e for e in entries if e["event"] == "eval"]
    starts = [e for e in entries if e["event"] == "start"]
    ends = [e for e in entries if e["event"] == "end"]

    def col(rows: list[dict[str, Any]], key: str, dtype: Any) -> Any:
        return np.asarray([np.nan if r.get(key) is None else r[key] for r in rows], dtype=dtype)

    return xr.Dataset(
        {"step": ("log_entry", col(logs, "step", np.int64)),
         "loss": ("log_entry", col(logs, "loss", np.float32)),
         "lr": ("log_entry", col(logs, "lr", np.float32)),
         "tokens_seen": ("log_entry", col(logs, "tokens_seen", np.int64)),
         "eval_step": ("eval_entry", col(evals, "step", np.int64)),
         "eval_loss": ("eval_entry", col(evals, "loss", np.float32))},
        attrs={"member": starts[-1]["member"] if starts else "",
               "total_steps": starts[-1]["total_steps"] if starts else None,
               "complete": bool(ends) and ends[-1].get("reason") == "done"})
