"""Data integrity: a missing or damaged chunk, checkpoint or disk is an error, never zeros.

Real stores on disk, written by the store module (the synthetic study of test_analyse and
the token store of test_train, both written through ``store.writing``), then damaged the
way disks and people damage them: a chunk deleted, truncated, bytes flipped, a file added,
the inventory lost. Each must be a :class:`StoreError` naming the store, the array and the
chunk, and the stage to rerun; through the CLI one line on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_study as make_analysis_study
from toolkit import store
from toolkit.cli import main
from toolkit.config import StudyConfig, study_to_dict
from toolkit.errors import CheckpointError, StoreError
from toolkit.study import Layout, Member, write_json_atomic

# --------------------------------------------------------------------------- fixtures

_PRISTINE: dict[str, StudyConfig] = {}


def _pristine(factory: pytest.TempPathFactory) -> StudyConfig:
    """One analysed synthetic study (two runs x two members, summary.zarr, study.json)."""
    from toolkit.analyse import analyse_study

    if "study" not in _PRISTINE:
        study = make_analysis_study(factory.mktemp("pristine"), seeds=(1, 2))
        analyse_study(study, [Member(run, seed) for run in study.runs for seed in study.seeds])
        write_json_atomic(study.root / "study.json", study_to_dict(study))
        _PRISTINE["study"] = study
    return _PRISTINE["study"]


@pytest.fixture
def study(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path) -> StudyConfig:
    """A private copy of the analysed study, free to damage."""
    src = _pristine(tmp_path_factory)
    dst = tmp_path / "study"
    shutil.copytree(src.root, dst)
    copy = dataclasses.replace(src, output_dir=str(dst))
    write_json_atomic(dst / "study.json", study_to_dict(copy))
    return copy


M = Member("dna-kmer2", 1)


def store_path(study: StudyConfig, kind: str) -> Path:
    layout = Layout(study)
    if kind == "tokens":
        return layout.run_tokens_dir(M.run) / "tokens.zarr"
    if kind == "summary":
        return layout.summary
    return layout.member_dir(M) / f"{kind}.zarr"


def chunk_of(path: Path) -> tuple[str, str]:
    """(array, chunk key) of the largest chunk file of a store: the one worth damaging."""
    chunks = [p for p in path.rglob("*") if p.is_file() and "c" in p.relative_to(path).parts]
    biggest = max(chunks, key=lambda p: p.stat().st_size)
    parts = biggest.relative_to(path).parts
    i = parts.index("c")
    return "/".join(parts[:i]), "/".join(parts[i:])


def flip(file: Path, at: int | None = None) -> None:
    data = bytearray(file.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 0xFF
    file.write_bytes(bytes(data))


def assert_names(err: pytest.ExceptionInfo, path: Path, array: str, chunk: str, stage: str) -> None:
    msg = str(err.value)
    assert "\n" not in msg
    assert str(path) in msg and f"'{array}'" in msg and chunk in msg, msg
    assert f"rerun the {stage} stage" in msg and f"--force {stage}" in msg, msg


STAGES = {"tokens": "prepare", "train": "train", "predictions": "evaluate",
          "embeddings": "evaluate", "fisher": "evaluate", "summary": "analyse"}


# --------------------------------------------------------------------------- every store kind


@pytest.mark.parametrize("kind", list(STAGES))
def test_deleted_chunk_is_named(study: StudyConfig, kind: str) -> None:
    path = store_path(study, kind)
    array, chunk = chunk_of(path)
    store.open_store(path, kind)  # intact: opens
    (path / array / chunk).unlink()
    with pytest.raises(StoreError, match="is missing") as err:
        store.open_store(path, kind, verify="size")
    assert_names(err, path, array, chunk, STAGES[kind])
    assert "fill values" in str(err.value)


@pytest.mark.parametrize("kind", list(STAGES))
def test_flipped_bytes_are_named(study: StudyConfig, kind: str) -> None:
    path = store_path(study, kind)
    array, chunk = chunk_of(path)
    flip(path / array / chunk)
    store.open_store(path, kind, verify="size")  # same size: only the content check sees it
    with pytest.raises(StoreError, match="does not match its recorded checksum") as err:
        store.open_store(path, kind)
    assert_names(err, path, array, chunk, STAGES[kind])


def test_masks_store_damage_says_delete_and_rerun(tmp_path: Path) -> None:
    """A missing masks store makes its prepare unit rebuild only the masks, so the hint
    says to delete it and rerun the study; doing so rebuilds the same store."""
    from tests.conftest import make_train_study
    from toolkit.masks import open_masks
    from toolkit.units import run_unit, unit_states

    study = make_train_study(tmp_path)
    path = open_masks(study, "r")
    array, chunk = chunk_of(path)
    good = (path / array / chunk).read_bytes()
    (path / array / chunk).write_bytes(good[:-3])  # truncated
    with pytest.raises(StoreError, match=r"bytes, \d+ were written \(truncated") as err:
        store.open_store(path, "masks", verify="size")
    assert f"delete {path} and rerun the study: toolkit run STUDY" in str(err.value)
    assert f"'{array}'" in str(err.value) and chunk in str(err.value)
    shutil.rmtree(path)
    assert unit_states(study)[("prepare", "c--kmer2")].reason == f"output {path.name} is missing"
    run_unit(study, "prepare", "c--kmer2")
    assert (path / array / chunk).read_bytes() == good
    store.open_store(path, "masks")


def test_deleted_tokens_chunk_stops_training_before_it_starts(tmp_path: Path) -> None:
    """Today's failure: a deleted token chunk trained on padding and marked training done."""
    from tests.conftest import make_train_study
    from toolkit.train import train_member

    first = Member("r", 1)
    study = make_train_study(tmp_path)
    path = Layout(study).run_tokens_dir("r") / "tokens.zarr"
    (path / "tokens" / "c" / "0").unlink()
    with pytest.raises(StoreError, match="chunk c/0 is missing") as err:
        train_member(study, first)
    assert "rerun the prepare stage" in str(err.value)
    assert not Layout(study).train_marker(first).exists()
    assert not (Layout(study).checkpoints_dir(first) / "final").exists()


def test_lazy_read_of_a_flipped_chunk_fails_instead_of_decoding_garbage(study: StudyConfig) -> None:
    """A lazy open checks sizes only (as open_results does); the crc32c codec still refuses
    the damaged bytes when they are read, instead of decoding them to garbage."""
    path = store_path(study, "predictions")
    flip(path / "log_probs" / "c" / "0" / "0", at=40)
    ds = store.open_dataset(path, "predictions", verify="size")  # lazy, sizes only: opens
    assert np.isfinite(ds.target.values).all()  # undamaged arrays still read
    with pytest.raises(ValueError, match="checksum"):
        ds.log_probs.compute()


def test_truncated_and_extra_chunks(study: StudyConfig) -> None:
    path = store_path(study, "predictions")
    file = path / "log_probs" / "c" / "0" / "0"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    with pytest.raises(StoreError, match="truncated or replaced"):
        store.open_store(path, "predictions", verify="size")
    file.write_bytes(data)
    store.open_store(path, "predictions")
    (path / "log_probs" / "c" / "7" / "0").parent.mkdir(parents=True)
    (path / "log_probs" / "c" / "7" / "0").write_bytes(data)
    with pytest.raises(StoreError, match=r"array 'log_probs' chunk c/7/0 is not in the store's inventory"):
        store.open_store(path, "predictions", verify="size")


def test_damaged_metadata_and_inventory(study: StudyConfig) -> None:
    path = store_path(study, "embeddings")
    meta = path / "zarr.json"
    good = meta.read_bytes()
    meta.write_bytes(b"{" + good[1:-5])  # unparseable root metadata
    with pytest.raises(StoreError, match=r"root metadata \(zarr.json\) has \d+ bytes"):
        store.open_store(path, "embeddings", verify="size")
    meta.write_bytes(good)
    inv = path / store.INVENTORY
    inv.write_text("{not json")
    with pytest.raises(StoreError, match="inventory.json is unreadable or damaged.*rerun the evaluate"):
        store.open_store(path, "embeddings")
    inv.unlink()
    with pytest.raises(StoreError, match="has no inventory.json"):
        store.open_store(path, "embeddings")


def test_store_of_an_older_toolkit_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A version-1 store (before inventories) reads as 'rebuild it', not as a damaged store."""
    import zarr

    path = tmp_path / "train.zarr"
    g = zarr.open_group(str(path), mode="w", zarr_format=3)
    g.attrs.update({"schema": "train", "schema_version": 1})
    zarr.consolidate_metadata(str(path))
    with pytest.raises(StoreError, match="schema version 1, this toolkit reads version 2; rebuild it"):
        store.open_store(path, "train")
    g = zarr.open_group(str(path), mode="r+")
    g.attrs["schema_version"] = "2"
    zarr.consolidate_metadata(str(path))
    with pytest.raises(StoreError, match="schema_version '2', which is not an integer") as err:
        store.open_store(path, "train")
    assert "reads version 2" in str(err.value) and "has schema version" not in str(err.value)


# --------------------------------------------------------------------------- stages and the CLI


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_analyse_refuses_damaged_predictions(study: StudyConfig, damage: str) -> None:
    """Today a deleted chunk gave a wrong KL and flipped bytes an OverflowError traceback."""
    from toolkit.analyse import analyse_study

    path = store_path(study, "predictions")
    chunk = path / "log_probs" / "c" / "0" / "0"
    summary_before = (study.root / "summary.zarr" / store.INVENTORY).read_bytes()
    chunk.unlink() if damage == "delete" else flip(chunk)
    with pytest.raises(StoreError) as err:
        analyse_study(study, [Member(run, seed) for run in study.runs for seed in study.seeds])
    assert_names(err, path, "log_probs", "c/0/0", "evaluate")
    assert f"toolkit run {study.root / 'study.json'} --force evaluate" in str(err.value)
    # the previous summary is untouched
    assert (study.root / "summary.zarr" / store.INVENTORY).read_bytes() == summary_before


STUDY_TOML = """
[study]
name = "damaged"
seeds = [1]
output_dir = "{out}"
[corpora.m]
source = "synthetic:markov"
train_records = 60
eval_records = 10
synthetic = {{ alphabet = "ACGT", order = 2, entropy_rate = 1.5 }}
[runs.m]
corpus = "m"
tokenizer = "kmer1"
model = {{ shape = "tiny", hidden_size = 32, num_hidden_layers = 1, num_attention_heads = 2, intermediate_size = 64 }}
[training]
steps = 4
batch_size = 4
seq_len = 32
"""


@pytest.mark.parametrize("damage", ["delete", "flip"])
def test_train_cli_refuses_damaged_tokens(tmp_path: Path, damage: str,
                                          capsys: pytest.CaptureFixture) -> None:
    """The real prepare stage, then a token chunk lost or flipped, then `toolkit train`:
    one line on stderr, exit 2, no traceback, no training marked done (today it trained
    on padding and marked training complete)."""
    study_file = tmp_path / "s.toml"
    study_file.write_text(STUDY_TOML.format(out=tmp_path / "out"))
    assert main(["prepare", str(study_file)]) == 0
    path = tmp_path / "out" / "tokens" / "m--kmer1" / "tokens.zarr"
    chunk = path / "tokens" / "c" / "0"
    chunk.unlink() if damage == "delete" else flip(chunk)
    capsys.readouterr()
    code = main(["train", str(study_file), "--member", "m/seed1"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("toolkit: error: "), err
    assert str(path) in lines[0] and "array 'tokens' chunk c/0" in lines[0], lines[0]
    assert "rerun the prepare stage" in lines[0]
    assert not (tmp_path / "out" / "members" / "m" / "seed1" / "train.complete.json").exists()


# --------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def tiny_model():  # type: ignore[no-untyped-def]
    from toolkit.config import ModelConfig
    from toolkit.model import build_model

    cfg = ModelConfig(shape="tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64)
    return build_model(cfg, 32, 1, 64)


def test_truncated_best_checkpoint_is_a_checkpoint_error(tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    from toolkit import checkpoint as ckpt
    from toolkit.model import load_model

    best = tmp_path / "members" / "r" / "seed1" / "checkpoints" / "best"
    ckpt.save_hf(tiny_model, best)
    assert ckpt.verify_export(best) is True
    load_model(best)
    weights = best / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as err:
        load_model(best)
    msg = str(err.value)
    assert msg.startswith(f"{weights}: ") and "truncated" in msg and "--force train" in msg
    assert "\n" not in msg
    weights.write_bytes(data[:-8] + bytes(8))  # same size, other bytes
    with pytest.raises(CheckpointError, match="does not match its sha256"):
        load_model(best)


def test_corrupt_external_checkpoint_is_one_line(tmp_path: Path, tiny_model) -> None:  # type: ignore[no-untyped-def]
    """External checkpoints have no checksum file: loadable, but damage is still a clean error."""
    from toolkit.model import load_model

    ext = tmp_path / "external"
    tiny_model.save_pretrained(str(ext), safe_serialization=True)
    assert not (ext / "checksums.json").exists()
    load_model(ext)
    weights = ext / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError) as err:
        load_model(ext)
    msg = str(err.value)
    assert msg.startswith(f"{weights}: truncated or corrupt safetensors file") and "\n" not in msg


# --------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def small_disk(tmp_path: Path, size: str = "1m") -> Iterator[Path]:
    """A real small tmpfs file system (needs root, as in the CI containers), else skip.

    ENOSPC is not injected here: Python's file objects call write(2) from C, so no Python
    function can stand in for a full disk end to end. test_no_space_error_from_the_lowest_write
    covers the message without root.
    """
    mnt = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()})")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_no_space_error_from_the_lowest_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC injected into the last write of a store (its inventory): runs without root."""
    import os

    def full(root: Path, kind: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(root / store.INVENTORY))

    monkeypatch.setattr(store, "write_inventory", full)
    path = tmp_path / "predictions.zarr"
    attrs = dict(member="r/seed1", run="r", seed=1, checkpoint="final", tokenizer_hash="x",
                 vocab_size=4)
    with (pytest.raises(StoreError, match=r"^no space left on /\S* \(\d+(\.\d)? [kMGT]?B(ytes)? "
                        r"free\) while writing .*predictions.zarr; free space or choose another "
                        "output_dir"),
          store.writing(path, "predictions", attrs) as g):
        store.create_array(g, "predictions", "log_probs", data=np.zeros((3, 4), np.float32))
        store.create_array(g, "predictions", "target", data=np.zeros(3, np.int32))
    assert not path.exists() and list(tmp_path.iterdir()) == []


def test_disk_full_writing_a_store_keeps_the_old_one(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    attrs = dict(member="r/seed1", run="r", seed=1, checkpoint="final", tokenizer_hash="x",
                 vocab_size=64)
    with small_disk(tmp_path) as disk:
        path = disk / "study" / "predictions.zarr"
        small = np.log(np.full((64, 64), 1 / 64, np.float32))
        with store.writing(path, "predictions", attrs) as g:
            store.create_array(g, "predictions", "log_probs", data=small)
            store.create_array(g, "predictions", "target", data=np.zeros(64, np.int32))
        big = np.random.default_rng(0).normal(size=(40_000, 64)).astype(np.float32)  # ~10 MB
        with (pytest.raises(StoreError) as err,
              store.writing(path, "predictions", attrs, overwrite=True) as g):
            store.create_array(g, "predictions", "log_probs", data=big)
            store.create_array(g, "predictions", "target", data=np.zeros(40_000, np.int32))
        msg = str(err.value)
        assert msg.startswith(f"no space left on {disk} (") and "free) while writing" in msg, msg
        assert str(path) in msg and "choose another output_dir" in msg and "\n" not in msg
        ds = store.open_dataset(path, "predictions")  # the previous store, intact and verified
        assert ds.sizes["position"] == 64
        assert [p.name for p in path.parent.iterdir()] == ["predictions.zarr"]  # no leftovers


def test_disk_full_writing_a_checkpoint_or_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                tiny_model) -> None:  # type: ignore[no-untyped-def]
    from toolkit import checkpoint as ckpt

    with small_disk(tmp_path, size="64k") as disk:
        with pytest.raises(CheckpointError, match=r"^no space left on .* while writing .*best; free space"):
            ckpt.save_hf(tiny_model, disk / "checkpoints" / "best")  # ~150 kB of weights
        filler = disk / "filler"  # fill what is left: then a marker cannot be written either
        with contextlib.suppress(OSError), open(filler, "wb") as f:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        with pytest.raises(StoreError, match=r"^no space left on .*train.complete.json"):
            write_json_atomic(disk / "train.complete.json", {"x": "y" * 100_000})
        assert not (disk / "checkpoints" / "best").exists()
        assert not (disk / "train.complete.json").exists()


def test_disk_full_in_prepare_is_one_cli_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The real prepare stage on a 256 kB disk: tokens of a 2 Mb synthetic genome do not fit."""
    with small_disk(tmp_path, size="256k") as disk:
        study_file = tmp_path / "s.toml"
        study_file.write_text(
            '[study]\nname = "full"\nseeds = [1]\n'
            f'output_dir = "{disk / "out"}"\n'
            '[corpora.m]\nsource = "synthetic:markov"\ntrain_records = 400\neval_records = 20\n'
            'synthetic = { alphabet = "ACGT", order = 2, entropy_rate = 1.5 }\n'
            '[runs.m]\ncorpus = "m"\ntokenizer = "kmer1"\n')
        capsys.readouterr()
        code = main(["prepare", str(study_file)])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        lines = [ln for ln in err.splitlines() if ln.startswith("toolkit:")]
        assert len(lines) == 1 and lines[0].startswith("toolkit: error: no space left on "), err
        assert "free space or choose another output_dir" in lines[0]
        tokens_dir = disk / "out" / "tokens"
        assert not tokens_dir.exists() or not any(p.name.endswith("kmer1") for p in tokens_dir.iterdir())
