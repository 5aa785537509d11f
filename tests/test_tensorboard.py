"""training.tensorboard: event files read back with TensorBoard's own EventAccumulator."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from toolkit.errors import ConfigError
from toolkit.tensorboard_log import TensorBoardWriter, require_tensorboard

pytest.importorskip("tensorboard")


def scalars(folder: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_curves_and_a_resume_read_back_as_each_step_once(tmp_path: Path) -> None:
    """A member logs steps 1-10, is killed after its checkpoint at step 5 and resumes: the
    resumed process's steps replace the killed one's, as in train.zarr."""
    first = TensorBoardWriter(tmp_path)
    first.start(0, {}, {})
    for step in range(1, 11):
        first.log_point(step, loss=10.0 - step, lr=1e-3, tokens_seen=100 * step, tokens_per_second=50.0, eta_s=1.0)
        if step % 5 == 0:
            first.eval_point(step, loss=20.0 - step)
    first.close()  # killed after step 10; its last checkpoint was step 5
    resumed = TensorBoardWriter(tmp_path)
    resumed.start(5, {}, {})
    for step in range(6, 9):
        resumed.log_point(step, loss=100.0 + step, lr=5e-4, tokens_seen=0, tokens_per_second=60.0, eta_s=0.0)
    resumed.end("done", 8)
    resumed.close()
    folder = tmp_path / "tensorboard"
    assert scalars(folder, "train/loss") == [(s, 10.0 - s) for s in range(1, 6)] + [(s, 100.0 + s) for s in range(6, 9)]
    assert scalars(folder, "eval/loss") == [(5, 15.0)]
    assert [s for s, _ in scalars(folder, "train/tokens_per_second")] == list(range(1, 9))
    lr = scalars(folder, "train/lr")
    assert lr[0] == (1, pytest.approx(1e-3)) and lr[-1] == (8, pytest.approx(5e-4))


def test_missing_package_is_a_config_error_naming_the_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now fails
    with pytest.raises(ConfigError, match=r"training.tensorboard = true needs the tensorboard package.*"
                                          r"pip install 'toolkit\[tensorboard\]'"):
        require_tensorboard()


def test_unwritable_folder_warns_once_and_training_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "tensorboard").write_text("a file where the folder should be")
    w = TensorBoardWriter(tmp_path)
    w.start(0, {}, {})
    w.log_point(1, 1.0, 1e-3, 1, 1.0, 1.0)
    w.eval_point(1, 1.0)
    w.close()
    assert caplog.text.count("cannot write TensorBoard events") == 1


def test_a_member_trained_with_tensorboard_writes_the_curves_of_train_zarr(tmp_path: Path) -> None:
    """A real tiny member (training.tensorboard = true): the event files hold train.zarr's
    loss curve and evaluation losses, step for step."""
    import numpy as np

    from tests.conftest import study_doc
    from toolkit import store
    from toolkit.config import study_from_dict
    from toolkit.study import Layout, Member
    from toolkit.units import run_unit

    study = study_from_dict(study_doc("tb", tmp_path / "out", seeds=(1,), training={"tensorboard": True}),
                            where="test")
    run_unit(study, "prepare", "markov--kmer3")
    run_unit(study, "train", "r/seed1")
    member_dir = Layout(study).member_dir(Member("r", 1))
    g = store.open_store(member_dir / "train.zarr", "train")
    loss = scalars(member_dir / "tensorboard", "train/loss")
    assert [s for s, _ in loss] == np.asarray(g["step"][...]).tolist()
    np.testing.assert_allclose([v for _, v in loss], np.asarray(g["loss"][...], np.float64), rtol=1e-6)
    evals = scalars(member_dir / "tensorboard", "eval/loss")
    assert [s for s, _ in evals] == np.asarray(g["eval_step"][...]).tolist()
    np.testing.assert_allclose([v for _, v in evals], np.asarray(g["eval_loss"][...], np.float64), rtol=1e-6)
