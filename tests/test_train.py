"""Training a member for real: tiny BERTs on a small Markov token store, on CPU."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_train_study as make_study
from tests.conftest import write_token_store
from toolkit import checkpoint as ckpt
from toolkit import store
from toolkit import train as train_mod
from toolkit.config import StudyConfig, TrainingConfig, study_to_dict
from toolkit.errors import CheckpointError, StoreError
from toolkit.model import build_model, load_model
from toolkit.plumbing import EXIT_REQUEUE
from toolkit.sequences import EVAL, MASK, TRAIN, load_sequences
from toolkit.study import Layout, Member
from toolkit.train import DataStream, lr_factor, mask_tokens, total_steps, train_member
from toolkit.units import run_unit

pytestmark = [pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning"),
              pytest.mark.usefixtures("one_torch_thread")]
REPO = Path(__file__).resolve().parents[1]
VOCAB = 64
MARKER_KEYS = {"member", "final", "best", "best_step", "flow", "final_step", "tokens_seen",
               "tokenizer_hash", "vocab_size", "tokens_per_second"}


def final_weights(study: StudyConfig, member: Member) -> dict[str, torch.Tensor]:
    return load_model(Layout(study).checkpoints_dir(member) / "final").state_dict()


def assert_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k




M1, M2 = Member("r", 1), Member("r", 2)
UNIT_KEYS = {"unit", "marker_format", "fingerprint", "inputs", "outputs", "toolkit_version", "host",
             "finished"}


# --------------------------------------------------------------------------- pure pieces


def test_mask_tokens_statistics() -> None:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 200, size=(64, 512))
    ids[:, 0] = 2
    ids[:, -40:] = 0  # padding
    inputs, selected, labels = mask_tokens(ids, np.random.default_rng(11), 200, 0.15)
    eligible = ids >= 5
    assert not selected[~eligible].any()  # specials and padding never selected
    n_el, n_sel = int(eligible.sum()), int(selected.sum())
    sd = math.sqrt(n_el * 0.15 * 0.85)
    assert abs(n_sel - 0.15 * n_el) < 5 * sd
    assert np.array_equal(labels, ids[selected])
    masked = selected & (inputs == MASK)
    changed = selected & (inputs != MASK) & (inputs != ids)
    kept = selected & (inputs == ids)
    for count, p in ((masked.sum(), 0.8), (changed.sum(), 0.1), (kept.sum(), 0.1)):
        # a random replacement can equal the original (1/195): that slack is below 5 sigma
        assert abs(count - p * n_sel) < 5 * math.sqrt(n_sel * p * (1 - p)) + n_sel / 150
    assert (inputs[changed] >= 5).all() and (inputs[changed] < 200).all()
    assert np.array_equal(inputs[~selected], ids[~selected])


def test_mask_tokens_always_selects_one() -> None:
    ids = np.array([[2, 9, 3, 0, 0]])
    for s in range(20):
        _, selected, labels = mask_tokens(ids, np.random.default_rng(s), 20, 0.01)
        assert selected.sum() == 1 and labels.tolist() == [9]


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_lr_schedule_matches_huggingface(schedule: str) -> None:
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    total, warmup = 97, 10
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    ref = {"cosine": lambda: get_cosine_schedule_with_warmup(opt, warmup, total),
           "linear": lambda: get_linear_schedule_with_warmup(opt, warmup, total),
           "constant": lambda: get_constant_schedule_with_warmup(opt, warmup)}[schedule]()
    ours = lr_factor(schedule, warmup, total)
    for step in range(total + 1):
        assert ours(step) == pytest.approx(ref.lr_lambdas[0](step), abs=1e-12)


def test_total_steps_budgets() -> None:
    t = TrainingConfig(batch_size=8, grad_accum=2)
    assert total_steps(t, 1000, 40.0) == math.ceil(5 * 1000 / 16)  # default: 5 epochs
    assert total_steps(TrainingConfig(batch_size=8, grad_accum=2, epochs=0.5), 1000, 40.0) == 32
    assert total_steps(TrainingConfig(batch_size=8, steps=7), 1000, 40.0) == 7
    # tokens: ceil(tokens / tokens-per-step)
    assert total_steps(TrainingConfig(batch_size=8, tokens=10_000), 1000, 40.0) == math.ceil(10_000 / 320)


def test_data_stream_covers_each_epoch_once(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    group = store.open_store(Layout(study).run_tokens_dir("r") / "tokens.zarr", "tokens")
    seqs = load_sequences(group, TRAIN, 32)
    stream = DataStream(seqs, 7, 8, 2, VOCAB, 0.15)
    n = len(seqs)
    idx = stream.indices(0, 3 * n)
    for e in range(3):  # naive reference: the epoch permutation from rng([data_seed, epoch])
        expected = np.random.default_rng([7, e]).permutation(n)
        assert np.array_equal(idx[e * n:(e + 1) * n], expected)
    # a step straddling an epoch boundary reads the same samples as the flat stream
    step = n // 16
    batches = stream.step(step)
    want, _ = seqs.batch(idx[step * 16:(step + 1) * 16])
    for micro, b in enumerate(batches):
        ids = b.inputs.copy()
        ids[b.selected] = b.labels  # undo the masking
        rows = want[micro * 8:(micro + 1) * 8]
        width = int((rows != 0).sum(axis=1).max())  # batches are cut to their longest sequence
        assert ids.shape == (8, width) and b.attention.shape == (8, width)
        assert np.array_equal(ids, rows[:, :width]) and not rows[:, width:].any()


# --------------------------------------------------------------------------- training


def _record_batches(monkeypatch: pytest.MonkeyPatch, seen: list, on_call=None) -> None:
    real = train_mod.masked_logits

    def recording(model, ids, att, sel):  # type: ignore[no-untyped-def]
        if model.training:
            seen.append((ids.clone(), att.clone(), sel.clone()))
            if on_call is not None:
                on_call(len(seen))
        return real(model, ids, att, sel)

    monkeypatch.setattr(train_mod, "masked_logits", recording)


def test_members_share_batches_and_differ_in_weights(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    study = make_study(tmp_path, steps=6, grad_accum=2, packing=True)
    seen1: list = []
    _record_batches(monkeypatch, seen1)
    train_member(study, M1)
    monkeypatch.undo()
    seen2: list = []
    _record_batches(monkeypatch, seen2)
    train_member(study, M2)
    assert len(seen1) == len(seen2) == 12  # 6 steps x 2 micro-batches
    for a, b in zip(seen1, seen2, strict=True):
        for x, y in zip(a, b, strict=True):
            assert torch.equal(x, y)
    w1, w2 = final_weights(study, M1), final_weights(study, M2)
    name = "bert.embeddings.word_embeddings.weight"
    assert not torch.equal(w1[name], w2[name])
    # members start from different initialisations
    i1 = build_model(study.runs["r"].model, VOCAB, 1, 32).state_dict()[name]
    i2 = build_model(study.runs["r"].model, VOCAB, 2, 32).state_dict()[name]
    assert not torch.equal(i1, i2)


def test_train_member_writes_everything(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    run_unit(study, "train", M1.id)
    layout = Layout(study)
    mdir = layout.member_dir(M1)
    marker = json.loads(layout.train_marker(M1).read_text())
    assert set(marker) == MARKER_KEYS | UNIT_KEYS
    assert marker["unit"] == "train:r/seed1" and set(marker["outputs"]) == {"weights", "log"}
    assert marker["inputs"]["settings"]["training.steps"] == 12
    assert marker["member"] == "r/seed1" and marker["final_step"] == 12
    assert marker["vocab_size"] == VOCAB and marker["tokenizer_hash"] == store.open_store(
        Layout(study).run_tokens_dir("r") / "tokens.zarr", "tokens").attrs["tokenizer_hash"]
    assert marker["tokens_per_second"] > 0
    assert [f["step"] for f in marker["flow"]] == [3, 6, 9]
    for f in marker["flow"]:
        assert load_model(mdir / f["path"]).config.vocab_size == VOCAB
    for key in ("final", "best"):
        assert load_model(mdir / marker[key]).training is False
    ckdir = layout.checkpoints_dir(M1)
    assert [p.name for p in ckpt.step_folders(ckdir)] == ["step-00000012", "step-00000008"]

    ds = store.open_dataset(mdir / "train.zarr", "train")
    assert ds["step"].values.tolist() == [2, 4, 6, 8, 10, 12]
    assert ds["eval_step"].values.tolist() == [4, 8, 12]
    assert ds.attrs["final_step"] == 12 and ds.attrs["member"] == "r/seed1"
    assert ds["tokens_seen"].values[-1] == marker["tokens_seen"]
    # tokens seen: non-padding tokens of every training batch, recomputed naively
    group = store.open_store(layout.run_tokens_dir("r") / "tokens.zarr", "tokens")
    stream = DataStream(load_sequences(group, TRAIN, 32), 7, 8, 1, VOCAB, 0.15)
    assert marker["tokens_seen"] == sum(b.n_tokens for s in range(12) for b in stream.step(s))
    # the best checkpoint has the lowest evaluation loss, recomputed from its weights
    eval_loss = ds["eval_loss"].values
    assert ds.attrs["best_eval_loss"] == pytest.approx(float(eval_loss.min()), rel=1e-6)
    assert marker["best_step"] == int(ds["eval_step"].values[int(np.argmin(eval_loss))])
    evals = train_mod.eval_batches(load_sequences(group, EVAL, 32), 7, 8, 2, VOCAB, 0.15)
    best = train_mod.evaluate_loss(load_model(mdir / "checkpoints/best"), evals, torch.device("cpu"))
    assert best == pytest.approx(float(eval_loss.min()), rel=1e-5)
    assert eval_loss[-1] < math.log(VOCAB - 5)  # it learned something beyond uniform guessing
    # running the unit again is a no-op: its marker is current
    before = layout.train_marker(M1).stat().st_mtime_ns
    run_unit(study, "train", M1.id)
    assert layout.train_marker(M1).stat().st_mtime_ns == before


def test_sigterm_then_corrupt_checkpoint_resumes_bit_identical(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    ref = make_study(tmp_path / "ref", steps=10, checkpoint_every_steps=3, grad_accum=2)
    train_member(ref, M1)
    study = make_study(tmp_path / "cut", steps=10, checkpoint_every_steps=3, grad_accum=2)
    # SIGTERM arrives during the second micro-batch of step 5 (0-based 4): that step finishes.
    seen: list = []
    _record_batches(monkeypatch, seen, lambda n: n == 10 and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit) as exc:
        train_member(study, M1)
    assert exc.value.code == EXIT_REQUEUE
    ckdir = Layout(study).checkpoints_dir(M1)
    assert [p.name for p in ckpt.step_folders(ckdir)] == ["step-00000005", "step-00000003"]
    assert not Layout(study).train_marker(M1).exists()
    # corrupt the newest: it must be skipped with a warning, and training resumes from step 3
    path = ckdir / "step-00000005" / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    (ckdir / "step-00000099").mkdir()  # a partial folder (no meta.json): skipped too
    (ckdir / ".step-00000007.tmp-0a1b2c3d").mkdir()  # leftover of a killed write: pruned
    monkeypatch.undo()
    with caplog.at_level("INFO"):
        train_member(study, M1)
    assert "step-00000005" in caplog.text and "sha256" in caplog.text
    assert "step-00000099: meta.json missing" in caplog.text
    assert "resuming from step-00000003" in caplog.text
    assert_identical(final_weights(study, M1), final_weights(ref, M1))
    assert [p.name for p in ckpt.step_folders(ckdir)] == ["step-00000010", "step-00000009"]
    assert (ckdir / "corrupt-step-00000005").is_dir()
    assert not list(ckdir.glob(".step-*"))
    ref_log = store.open_dataset(Layout(ref).member_dir(M1) / "train.zarr", "train")
    cut_log = store.open_dataset(Layout(study).member_dir(M1) / "train.zarr", "train")
    assert np.array_equal(ref_log["loss"].values, cut_log["loss"].values)
    assert np.array_equal(ref_log["eval_loss"].values, cut_log["eval_loss"].values)


def _cli(study_json: Path, member: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "toolkit", "train", str(study_json), "--member", member],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:  # type: ignore[no-untyped-def]
    t0 = time.monotonic()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early: {proc.stdout.read().decode()[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out")
        time.sleep(0.005)


@pytest.mark.slow
def test_cli_sigkill_and_sigterm_resume_bit_identical(tmp_path: Path) -> None:
    # A checkpoint after every step: slow enough to interrupt, and kill -9 may hit mid-write.
    kw = {"steps": 60, "checkpoint_every_steps": 1, "eval_every_steps": 20, "log_every_steps": 10,
          "batch_size": 4}
    files = {}
    for name in ("ref", "cut"):
        study = make_study(tmp_path / name, **kw)
        files[name] = tmp_path / f"{name}.json"
        files[name].write_text(json.dumps(study_to_dict(study)))
    ref = _cli(files["ref"], "r/seed1")
    cut_study = make_study(tmp_path / "cut", **kw)
    ckdir = Layout(cut_study).checkpoints_dir(M1)
    # 1) SIGKILL once the first checkpoint exists
    proc = _cli(files["cut"], "r/seed1")
    _wait_for(lambda: bool(ckpt.step_folders(ckdir)), proc)
    proc.kill()
    proc.wait()
    assert not Layout(cut_study).train_marker(M1).exists()  # it really died mid-training
    first = ckpt.step_folders(ckdir)[0].name
    # 2) restart; SIGTERM once a later checkpoint exists -> exit 75 after checkpointing
    proc = _cli(files["cut"], "r/seed1")
    _wait_for(lambda: ckpt.step_folders(ckdir)[0].name > first, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 75, out[-2000:]
    assert "exiting with code 75" in out
    assert not Layout(cut_study).train_marker(M1).exists()
    # 3) restart to completion
    proc = _cli(files["cut"], "r/seed1")
    out = proc.communicate(timeout=300)[0].decode()
    assert proc.returncode == 0, out[-2000:]
    assert "resuming from" in out and "ETA" in out and "tok/s" in out
    assert ref.wait(timeout=300) == 0
    ref_study = make_study(tmp_path / "ref", **kw)
    assert_identical(final_weights(cut_study, M1), final_weights(ref_study, M1))


@pytest.mark.slow
def test_preempted_training_unit_is_requeued_by_dispatch(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Training and dispatch agree on what a preempted unit means: the real train unit, sent
    SIGTERM, checkpoints and exits with plumbing's EXIT_REQUEUE, and the dispatcher's job body
    (locally: resume at once) runs it again until it finishes from that checkpoint."""
    import threading

    from toolkit.dispatch.job import UnitJob

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)  # not under SLURM: resume locally
    study = make_study(tmp_path / "s", steps=60, checkpoint_every_steps=1, eval_every_steps=20,
                       log_every_steps=10, batch_size=4)
    study_json = tmp_path / "s.json"
    study_json.write_text(json.dumps(study_to_dict(study)))
    job = UnitJob([sys.executable, "-m", "toolkit", "train", str(study_json), "--member", M1.id],
                  name=f"train {M1.id}")
    codes: list[int] = []  # exit status of each run of the unit's process
    run_child = job._run_child

    def recording() -> int:
        codes.append(run_child())
        return codes[-1]

    monkeypatch.setattr(job, "_run_child", recording)
    done: list[str] = []
    thread = threading.Thread(target=lambda: done.append(job()), daemon=True)
    thread.start()
    ckdir = Layout(study).checkpoints_dir(M1)
    t0 = time.monotonic()
    while not ckpt.step_folders(ckdir):
        assert thread.is_alive() and time.monotonic() - t0 < 120, "no checkpoint appeared"
        time.sleep(0.005)
    job._proc.send_signal(signal.SIGTERM)
    thread.join(timeout=300)
    assert not thread.is_alive()
    assert codes == [EXIT_REQUEUE, 0]
    assert done == [f"train {M1.id}: done"] and job.requeues == 1
    assert Layout(study).train_marker(M1).exists()


# --------------------------------------------------------------------------- failures and externals


def test_external_checkpoints(tmp_path: Path) -> None:
    folders = []
    for seed in (1, 2):
        folder = tmp_path / f"ext model {seed}"
        model = build_model(make_study(tmp_path / "x").runs["r"].model, VOCAB, seed + 40, 32)
        model.save_pretrained(folder)
        folders.append(str(folder))
    study = make_study(tmp_path / "s", checkpoints=folders)
    train_member(study, M2)
    marker = json.loads(Layout(study).train_marker(M2).read_text())
    assert set(marker) == MARKER_KEYS and marker["flow"] == [] and marker["final_step"] == 0
    expected = load_model(folders[1]).state_dict()
    assert_identical(final_weights(study, M2), expected)
    assert_identical(load_model(Layout(study).member_dir(M2) / "checkpoints/best").state_dict(), expected)

    wrong = make_study(tmp_path / "w", vocab=VOCAB + 3, checkpoints=folders)
    with pytest.raises(CheckpointError, match=rf"ext model 1.*{VOCAB}.*{VOCAB + 3}"):
        train_member(wrong, M1)
    assert not Layout(wrong).train_marker(M1).exists()
    assert not (Layout(wrong).checkpoints_dir(M1) / "final").exists()

    from dataclasses import replace

    short = tmp_path / "short"
    build_model(replace(study.runs["r"].model, max_position_embeddings=16), VOCAB, 1).save_pretrained(short)
    few = make_study(tmp_path / "p", checkpoints=[str(short), str(short)])
    with pytest.raises(CheckpointError, match="16 positions.*sequences of 32"):
        train_member(few, M1)


def test_missing_or_wrong_store(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    tokens = Layout(study).run_tokens_dir("r") / "tokens.zarr"
    import shutil

    shutil.rmtree(tokens)
    with pytest.raises(StoreError, match="toolkit prepare"):
        train_member(study, M1)
    write_token_store(study, VOCAB)
    import zarr

    g = zarr.open_group(str(tokens), mode="r+")
    g.attrs["schema_version"] = 99
    zarr.consolidate_metadata(str(tokens))
    with pytest.raises(StoreError, match="schema version 99"):
        train_member(study, M1)


def test_unwritable_checkpoint_folder(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    member_dir = Layout(study).member_dir(M1)
    member_dir.mkdir(parents=True)
    (member_dir / "checkpoints").write_text("a file where the folder should be")
    with pytest.raises(CheckpointError, match="checkpoints"):
        train_member(study, M1)
    assert not (member_dir / "train.zarr").exists()


def test_changed_configuration_refuses_to_resume(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    study = make_study(tmp_path, steps=8)
    seen: list = []
    _record_batches(monkeypatch, seen, lambda n: n == 2 and os.kill(os.getpid(), signal.SIGUSR2))
    with pytest.raises(SystemExit):
        train_member(study, M1)
    changed = make_study(tmp_path, steps=8, lr=1e-2)
    with pytest.raises(CheckpointError, match="training.lr"):
        train_member(changed, M1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_bf16_training_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    study = make_study(tmp_path, steps=10, precision="bf16", device="cuda", checkpoint_every_steps=3)
    seen: list = []
    _record_batches(monkeypatch, seen, lambda n: n == 5 and os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(SystemExit):
        train_member(study, M1)
    assert seen[0][0].device.type == "cuda"
    monkeypatch.undo()
    train_member(study, M1)
    ds = store.open_dataset(Layout(study).member_dir(M1) / "train.zarr", "train")
    assert ds.attrs["device"].startswith("cuda") and ds.attrs["final_step"] == 10
    assert np.isfinite(ds["loss"].values).all()
    assert all(torch.isfinite(v).all() for v in final_weights(study, M1).values())

