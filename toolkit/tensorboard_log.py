"""TensorBoard event files of a member's training curves (``training.tensorboard = true``).

A second sink next to the live curve (:class:`toolkit.progress.ProgressWriter`), with
the same calls: the training loss, learning rate and tokens per second at every log
point and the evaluation loss, as scalars ``train/loss``, ``train/lr``,
``train/tokens_per_second`` and ``eval/loss`` in ``members/<run>/seed<N>/tensorboard/``.
Watch a study with ``tensorboard --logdir <study>/members``.

A resumed member opens a new event file whose first event purges what an earlier
process logged after the checkpoint it resumed from (TensorBoard's ``purge_step``), so
the curve shows each step once, as ``train.zarr`` does.

Writing events is a convenience, like the live curve: an error while writing is logged
once and training goes on. Needs the ``tensorboard`` package
(``pip install 'toolkit[tensorboard]'``); :func:`require_tensorboard` says so before
training starts.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from toolkit.errors import ConfigError

log = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
"""Folder of a member's event files, inside the member's folder."""
INSTALL_HINT = "pip install 'toolkit[tensorboard]'"


def require_tensorboard() -> None:
    """Raise a :class:`ConfigError` naming the install command when TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError as e:
        raise ConfigError(f"training.tensorboard = true needs the tensorboard package ({e}); "
                          f"install it ({INSTALL_HINT}) or set training.tensorboard = false") from e


class TensorBoardWriter:
    """Writes a member's curves as TensorBoard scalars (see the module docstring).

    Parameters
    ----------
    member_dir
        The member's folder; events go to ``member_dir / "tensorboard"``.
    """

    def __init__(self, member_dir: Path) -> None:
        self.folder = member_dir / TENSORBOARD_DIR
        self._writer: Any = None
        self._broken = False

    def start(self, step: int, logs: dict[str, list], evals: dict[str, list]) -> None:
        """Open a new event file; on a resume (``step`` > 0) purge later steps of earlier files.

        ``logs`` and ``evals`` (the checkpoint's curve) are already in the earlier event
        files when resuming; a fresh member has none.
        """
        from torch.utils.tensorboard import SummaryWriter

        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._writer = SummaryWriter(str(self.folder), purge_step=step + 1 if step > 0 else None)
        except OSError as e:
            self._fail(e)

    def log_point(self, step: int, loss: float, lr: float, tokens_seen: int,
                  tokens_per_second: float, eta_s: float) -> None:
        self._scalars(step, {"train/loss": loss, "train/lr": lr, "train/tokens_per_second": tokens_per_second})

    def eval_point(self, step: int, loss: float) -> None:
        self._scalars(step, {"eval/loss": loss})
        self.flush()

    def end(self, reason: str, step: int) -> None:
        self.flush()

    def flush(self) -> None:
        if self._writer is not None and not self._broken:
            try:
                self._writer.flush()
            except OSError as e:
                self._fail(e)

    def close(self) -> None:
        if self._writer is not None:
            try:
                self._writer.close()
            except OSError as e:
                self._fail(e)
            self._writer = None

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None or self._broken:
            return
        try:
            for tag, value in values.items():
                self._writer.add_scalar(tag, value, global_step=step)
        except OSError as e:
            self._fail(e)

    def _fail(self, e: OSError) -> None:
        if not self._broken:
            log.warning("%s: cannot write TensorBoard events (%s); training goes on, the curve is in "
                        "train.progress.jsonl and train.zarr", self.folder, e.strerror or e)
        self._broken = True
