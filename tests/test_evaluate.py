"""Evaluation masks and per-member stores, on a hand-built tiny study with real Zarr and real BERTs.

The masks are a prepare-stage output; here they are built from the hand-written token
store by the same function the prepare unit calls (:func:`toolkit.masks.write_masks`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import transformers
import xarray as xr

from toolkit import store
from toolkit.config import StudyConfig, study_from_dict
from toolkit.errors import CheckpointError, StoreError
from toolkit.masks import masks_path, open_masks, select_positions, write_masks
from toolkit.sequences import EVAL, MASK, SPECIAL_TOKENS, TRAIN, UNUSED, load_sequences
from toolkit.study import Layout, Member, write_json_atomic

# Zarr notes on every consolidated store that consolidation is outside the v3 spec.
pytestmark = pytest.mark.filterwarnings("ignore:Consolidated metadata:UserWarning")

VOCAB = 60
SEQ_LEN = 16
RUN = "toy"


def make_study(root: Path, **analysis: Any) -> StudyConfig:
    raw = {
        "study": {"name": "evaltest", "seeds": [1, 2], "output_dir": str(root)},
        "corpora": {"c": {"source": "synthetic:markov", "train_records": 10, "eval_records": 21}},
        "runs": {RUN: {"corpus": "c", "tokenizer": "kmer1"}},
        "training": {"seq_len": SEQ_LEN, "device": "cpu"},
        "analysis": {"batch_size": 4, "fisher_records": 7, "contextual_records": 6,
                     "prediction_dtype": "float32", **analysis},
    }
    return study_from_dict(raw, where="test")


def write_tokens(study: StudyConfig, seed: int = 0, masks: bool = True) -> str:
    """A token store following storage_schemas/tokens.json: random ids, some [UNK], a ragged
    split; and (``masks``) its evaluation masks, as the prepare unit writes them."""
    rng = np.random.default_rng(seed)
    n_rec = 34
    lengths = rng.integers(2, 30, size=n_rec)  # some longer than seq_len - 2: truncated
    lengths[5] = 0  # an empty record: skipped by load_sequences
    split = np.full(n_rec, TRAIN, dtype=np.uint8)
    split[rng.permutation(n_rec)[:22]] = EVAL  # eval records interleaved with train ones
    split[(split == TRAIN).nonzero()[0][:2]] = UNUSED
    split[5] = EVAL
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = rng.integers(5, VOCAB, size=int(offsets[-1])).astype(np.uint16)
    tokens[rng.random(tokens.shape[0]) < 0.05] = SPECIAL_TOKENS["[UNK]"]
    token_hash = hashlib.sha256(f"toy-tokenizer-{seed}".encode()).hexdigest()
    attrs = {"corpus": "c", "source": "synthetic:markov", "kind": "dna", "tokenizer": "kmer1",
             "tokenizer_hash": token_hash, "vocab_size": VOCAB, "special_tokens": SPECIAL_TOKENS,
             "provenance": [], "split": {"method": "test", "seed": seed}, "entropy_profile": {},
             "toolkit_version": "test"}
    path = Layout(study).run_tokens_dir(RUN) / "tokens.zarr"
    with store.writing(path, "tokens", attrs, overwrite=True) as g:
        store.create_array(g, "tokens", "tokens", data=tokens)
        store.create_array(g, "tokens", "offsets", data=offsets)
        store.create_array(g, "tokens", "split", data=split)
        store.create_array(g, "tokens", "record_symbols", data=lengths.astype(np.int64))
    if masks:
        write_masks(study, "c", "kmer1")
    return token_hash


def tiny_bert(seed: int, layers: int = 2) -> Any:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                  num_attention_heads=2, intermediate_size=48,
                                  max_position_embeddings=32, type_vocab_size=1, pad_token_id=0)
    torch.manual_seed(seed)
    return transformers.BertForMaskedLM(cfg)


def write_member(study: StudyConfig, member: Member, token_hash: str, layers: int = 2) -> None:
    """Checkpoints (final, best, one flow snapshot) and the train marker of a 'trained' member."""
    mdir = Layout(study).member_dir(member)
    model = tiny_bert(100 * member.seed, layers)
    model.save_pretrained(mdir / "checkpoints" / "flow" / "step-5")
    with torch.no_grad():  # later weights: perturbed, so that every snapshot differs
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(mdir / "checkpoints" / "best")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.save_pretrained(mdir / "checkpoints" / "final")
    write_json_atomic(Layout(study).train_marker(member), {
        "final": "checkpoints/final", "best": "checkpoints/best",
        "flow": [{"step": 5, "path": "checkpoints/flow/step-5"}], "final_step": 10,
        "tokenizer_hash": token_hash, "vocab_size": VOCAB})


def load(path: Path) -> Any:
    return transformers.BertForMaskedLM.from_pretrained(str(path)).eval()


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory: pytest.TempPathFactory) -> tuple[StudyConfig, str]:
    """Both members evaluated once (shared by the checks below: the costly part)."""
    from toolkit.evaluate import evaluate_member

    study = make_study(tmp_path_factory.mktemp("study"))
    token_hash = write_tokens(study)
    for seed in study.seeds:
        write_member(study, Member(RUN, seed), token_hash)
        evaluate_member(study, Member(RUN, seed))
    return study, token_hash


def masks_of(study: StudyConfig) -> Any:
    return store.open_store(masks_path(study, RUN), "masks")


# --------------------------------------------------------------------------- masks


def test_select_positions_counts_and_eligibility() -> None:
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 40, size=(200, 24))
    att = (np.arange(24)[None, :] < rng.integers(0, 25, size=200)[:, None]).astype(np.uint8)
    chosen = select_positions(ids, att, 0.15, np.random.default_rng(7))
    for row in range(200):
        maskable = [t for t in range(24) if att[row, t] and ids[row, t] >= 5]
        n = len(maskable)
        want = 0 if n == 0 else max(1, int(np.floor(0.15 * n + 0.5)))
        picked = np.flatnonzero(chosen[row]).tolist()
        assert len(picked) == want
        assert set(picked) <= set(maskable)
    again = select_positions(ids, att, 0.15, np.random.default_rng(7))
    assert np.array_equal(chosen, again)
    # Every maskable position is chosen sometimes: a subset, not a fixed prefix.
    many = sum(select_positions(ids, att, 0.15, np.random.default_rng(s)) for s in range(40))
    maskable_all = (att != 0) & (ids >= 5)
    assert (many[maskable_all] > 0).mean() > 0.95


def test_masks_content_rates_and_determinism(tmp_path: Path) -> None:
    study = make_study(tmp_path / "a")
    write_tokens(study, masks=False)
    path = write_masks(study, "c", "kmer1")
    assert path == masks_path(study, RUN) == open_masks(study, RUN)
    assert path.parent == Layout(study).run_tokens_dir(RUN) and path.name.startswith("masks-")
    g = store.open_store(path, "masks")
    tokens = store.open_store(Layout(study).run_tokens_dir(RUN) / "tokens.zarr", "tokens")
    seqs = load_sequences(tokens, EVAL, SEQ_LEN, "truncate")
    orig, att = seqs.batch(np.arange(len(seqs)))
    split, offsets = np.asarray(tokens["split"][:]), np.asarray(tokens["offsets"][:])
    nonempty_eval = np.flatnonzero((split == EVAL) & (np.diff(offsets) > 0))
    assert 5 in np.flatnonzero(split == EVAL) and 5 not in nonempty_eval  # the empty record
    assert len(seqs) == len(nonempty_eval) >= 20
    d_ids, d_lab = np.asarray(g["distribution/input_ids"][:]), np.asarray(g["distribution/labels"][:])
    assert np.array_equal(np.asarray(g["distribution/attention_mask"][:]), att)
    assert np.array_equal(np.asarray(g["distribution/record"][:]), seqs.record_ids)
    chosen = d_lab != -100
    assert np.array_equal(d_ids, np.where(chosen, MASK, orig))  # [MASK] only, nowhere else
    assert np.array_equal(d_lab[chosen], orig[chosen])
    assert (orig[chosen] >= 5).all() and (att[chosen] == 1).all()
    maskable = ((att == 1) & (orig >= 5)).sum(axis=1)
    assert np.array_equal(chosen.sum(axis=1), np.maximum(1, np.floor(0.10 * maskable + 0.5)))
    assert (chosen.sum(axis=1) >= 1).all()
    rows, offs = np.nonzero(chosen)
    assert np.array_equal(np.asarray(g["distribution/position_sequence"][:]), rows)
    assert np.array_equal(np.asarray(g["distribution/position_offset"][:]), offs)
    f_lab = np.asarray(g["fisher/labels"][:])
    assert f_lab.shape == (7, SEQ_LEN)
    f_chosen = f_lab != -100
    assert np.array_equal(f_chosen.sum(axis=1), np.maximum(1, np.floor(0.15 * maskable[:7] + 0.5)))
    assert np.array_equal(np.asarray(g["fisher/input_ids"][:]), np.where(f_chosen, MASK, orig[:7]))
    assert np.array_equal(np.asarray(g["contextual/input_ids"][:]), orig[:6])
    assert g.attrs["mask_seed"] == 0 and g.attrs["seq_len"] == SEQ_LEN

    # Deterministic: a second study folder with the same tokens and config gets the same masks.
    other = make_study(tmp_path / "b")
    write_tokens(other)
    g2 = store.open_store(open_masks(other, RUN), "masks")
    for name in ("distribution/input_ids", "distribution/labels", "fisher/labels", "contextual/input_ids"):
        assert np.array_equal(np.asarray(g[name][:]), np.asarray(g2[name][:]))
    # ...and another seed moves the positions.
    third = make_study(tmp_path / "c", mask_seed=1)
    write_tokens(third)
    g3 = store.open_store(open_masks(third, RUN), "masks")
    assert not np.array_equal(np.asarray(g3["distribution/labels"][:]), d_lab)


def test_masks_changed_config_builds_beside_and_mismatch_is_refused(tmp_path: Path) -> None:
    study = make_study(tmp_path)
    write_tokens(study, masks=False)
    path = write_masks(study, "c", "kmer1")
    before = (path / "zarr.json").stat().st_mtime_ns
    assert write_masks(study, "c", "kmer1") == path  # same config: kept
    assert (path / "zarr.json").stat().st_mtime_ns == before
    changed = dataclasses.replace(study, analysis=dataclasses.replace(study.analysis,
                                                                      distribution_mask_rate=0.2))
    # Evaluate never builds masks: the store of other settings is missing until prepare builds it.
    with pytest.raises(StoreError) as err:
        open_masks(changed, RUN)
    other = masks_path(changed, RUN)
    assert str(err.value) == (f"{other}: no evaluation masks for the current analysis settings (the prepare "
                              "unit c--kmer1 builds them); rerun `toolkit run STUDY` (or "
                              "`toolkit run STUDY --force prepare:c--kmer1`) to build them")
    assert write_masks(changed, "c", "kmer1") == other  # a store of their own, the old one untouched
    assert other != path and (path / "zarr.json").stat().st_mtime_ns == before
    assert store.open_store(other, "masks").attrs["distribution_mask_rate"] == 0.2
    shutil.rmtree(other)
    shutil.copytree(path, other)  # a store whose attributes disagree with its name
    with pytest.raises(StoreError, match=r"distribution_mask_rate = 0\.1.*--force prepare:c--kmer1"):
        open_masks(changed, RUN)
    write_masks(changed, "c", "kmer1")  # the prepare unit replaces such a store
    assert store.open_store(other, "masks").attrs["distribution_mask_rate"] == 0.2
    write_tokens(study, seed=1, masks=False)  # the token store was rebuilt with another tokenizer
    with pytest.raises(StoreError, match="tokenizer_hash"):
        open_masks(study, RUN)


def test_evaluate_refuses_missing_masks_in_one_line(tmp_path: Path) -> None:
    """evaluate opens the masks of the current settings; it never builds them."""
    from toolkit.evaluate import evaluate_member

    study = make_study(tmp_path)
    token_hash = write_tokens(study, masks=False)
    member = Member(RUN, 1)
    write_member(study, member, token_hash)
    with pytest.raises(StoreError, match=r"no evaluation masks .* rerun `toolkit run STUDY`") as err:
        evaluate_member(study, member)
    assert "\n" not in str(err.value) and str(masks_path(study, RUN)) in str(err.value)
    assert not masks_path(study, RUN).exists()
    assert not [p for p in Layout(study).run_tokens_dir(RUN).iterdir() if p.name.startswith("masks")]
    assert not Layout(study).evaluate_marker(member).exists()


# --------------------------------------------------------------------------- errors


def test_missing_train_marker(tmp_path: Path) -> None:
    from toolkit.evaluate import evaluate_member

    study = make_study(tmp_path)
    write_tokens(study)
    with pytest.raises(StoreError, match=r"train the member first \(toolkit train STUDY --member toy/seed1\)"):
        evaluate_member(study, Member(RUN, 1))
    assert not Layout(study).member_dir(Member(RUN, 1)).exists()


def test_tokenizer_mismatch_and_missing_checkpoint(tmp_path: Path) -> None:
    from toolkit.evaluate import evaluate_member

    study = make_study(tmp_path)
    token_hash = write_tokens(study)
    member = Member(RUN, 1)
    write_member(study, member, "0" * 64)
    with pytest.raises(StoreError, match="retrain the member on the current token store"):
        evaluate_member(study, member)
    write_member(study, member, token_hash)
    shutil.rmtree(Layout(study).member_dir(member) / "checkpoints" / "best")
    with pytest.raises(CheckpointError, match="config.json missing"):
        evaluate_member(study, member)
    mdir = Layout(study).member_dir(member)
    assert not any((mdir / n).exists() for n in ("predictions.zarr", "evaluate.complete.json"))
    assert not [p for p in mdir.iterdir() if p.name.startswith(".")]  # nothing half-written


# --------------------------------------------------------------------------- stores


def test_predictions_match_full_forward(evaluated: tuple[StudyConfig, str]) -> None:
    study, token_hash = evaluated
    g = masks_of(study)
    ids = torch.from_numpy(np.asarray(g["distribution/input_ids"][:]).astype(np.int64))
    att = torch.from_numpy(np.asarray(g["distribution/attention_mask"][:]).astype(np.int64))
    labels = np.asarray(g["distribution/labels"][:])
    seq = np.asarray(g["distribution/position_sequence"][:])
    off = np.asarray(g["distribution/position_offset"][:])
    targets = []
    for seed in study.seeds:
        member = Member(RUN, seed)
        mdir = Layout(study).member_dir(member)
        pred = store.open_store(mdir / "predictions.zarr", "predictions")
        log_probs = np.asarray(pred["log_probs"][:])
        assert log_probs.shape == (seq.shape[0], VOCAB) and log_probs.dtype == np.float32
        assert np.allclose(np.exp(log_probs.astype(np.float64)).sum(axis=1), 1.0, atol=1e-5)
        model = load(mdir / "checkpoints" / "best")  # analysis.checkpoint defaults to best
        with torch.no_grad():
            full = model(input_ids=ids, attention_mask=att).logits.double()  # (S, T, V)
        want = torch.log_softmax(full, dim=-1)[seq, off].numpy()
        np.testing.assert_allclose(log_probs, want, atol=2e-5, rtol=1e-5)
        target = np.asarray(pred["target"][:])
        assert np.array_equal(target, labels[seq, off])
        targets.append(target)
        attrs = dict(pred.attrs)
        assert attrs["member"] == member.id and attrs["seed"] == seed and attrs["run"] == RUN
        assert attrs["checkpoint"] == "best" and attrs["tokenizer_hash"] == token_hash
        assert attrs["vocab_size"] == VOCAB
        nll = -want[np.arange(seq.shape[0]), target].mean()
        marker = json.loads(Layout(study).evaluate_marker(member).read_text())
        assert marker["n_positions"] == seq.shape[0]
        assert marker["mean_nll"] == pytest.approx(nll, rel=1e-5)
        assert marker["top1_accuracy"] == pytest.approx((want.argmax(1) == target).mean())
    assert np.array_equal(targets[0], targets[1])  # same masked inputs for both members


def test_embeddings_equal_weights_and_naive_mean(evaluated: tuple[StudyConfig, str]) -> None:
    study, _ = evaluated
    g = masks_of(study)
    ids = np.asarray(g["contextual/input_ids"][:]).astype(np.int64)
    att = np.asarray(g["contextual/attention_mask"][:])
    for seed in study.seeds:
        mdir = Layout(study).member_dir(Member(RUN, seed))
        emb = store.open_store(mdir / "embeddings.zarr", "embeddings")
        model = load(mdir / "checkpoints" / "best")
        weights = model.bert.embeddings.word_embeddings.weight.detach().numpy()
        assert np.array_equal(np.asarray(emb["word_embeddings"][:]), weights)
        ctx = np.asarray(emb["contextual"][:])
        assert ctx.shape == (6, 32)
        for row in range(ids.shape[0]):  # one unpadded sequence at a time: a naive mean
            n = int(att[row].sum())
            with torch.no_grad():
                hidden = model.bert(input_ids=torch.from_numpy(ids[row:row + 1, :n])).last_hidden_state
            np.testing.assert_allclose(ctx[row], hidden[0].double().mean(0).numpy(), atol=1e-5)


def test_fisher_store_matches_direct_call(evaluated: tuple[StudyConfig, str]) -> None:
    from toolkit.evaluate import fisher_batches
    from toolkit.fisher import fisher_traces

    study, _ = evaluated
    g = masks_of(study)
    member = Member(RUN, 2)
    mdir = Layout(study).member_dir(member)
    ds = store.open_dataset(mdir / "fisher.zarr", "fisher", chunks={})  # "auto" fails on str coords
    assert dict(ds.sizes)["estimator"] == 2 and list(ds["step"].values) == [5, 10]
    assert list(ds["group"].values) == ["embeddings", "layer.0", "layer.1", "head"]
    assert ds["fisher_trace"].dims == ("estimator", "step", "group")
    assert ds["parameter_trace"].dims == ("estimator", "step", "parameter")
    assert ds.attrs["n_sequences"] == 7
    assert ds.attrs["n_masked_tokens"] == int((np.asarray(g["fisher/labels"][:]) != -100).sum())
    batches = fisher_batches(g, study.analysis.batch_size, torch.device("cpu"))
    # One estimator per snapshot keeps this quick while still pinning both axes' order.
    for step, folder, est in ((5, "flow/step-5", "batch"), (10, "best", "per-example")):
        direct = fisher_traces(load(mdir / "checkpoints" / folder), batches, est)
        got = ds["fisher_trace"].sel(estimator=est, step=step).values
        np.testing.assert_allclose(got, [direct.groups[grp] for grp in ds["group"].values], rtol=1e-6)
        got_p = ds["parameter_trace"].sel(estimator=est, step=step).values
        np.testing.assert_allclose(got_p, [direct.parameters[p] for p in ds["parameter"].values],
                                   rtol=1e-6)
    # The two estimators and the two snapshots really differ (so the checks above can fail).
    trace = ds["fisher_trace"].values
    assert not np.allclose(trace[0], trace[1], rtol=1e-3)
    assert not np.allclose(trace[:, 0], trace[:, 1], rtol=1e-3)
    groups = dict(zip(ds["parameter"].values, ds["parameter_group"].values, strict=True))
    assert groups["bert.embeddings.word_embeddings.weight"] == "embeddings"
    assert all(v > 0 for v in ds["fisher_trace"].values.ravel())


def test_stores_open_lazily_and_rerun_keeps_them(evaluated: tuple[StudyConfig, str],
                                                 tmp_path: Path) -> None:
    from toolkit.evaluate import evaluate_member

    shared, _ = evaluated
    study = make_study(tmp_path / "copy")  # a copy: the shared study stays as evaluated
    shutil.copytree(shared.root, study.root)
    member = Member(RUN, 1)
    mdir = Layout(study).member_dir(member)
    # chunks={} (the stored chunking): dask's "auto" cannot size variable-length str coords.
    for name in ("predictions", "embeddings", "fisher"):
        ds = store.open_dataset(mdir / f"{name}.zarr", name, chunks={})
        assert ds.data_vars and all(v.chunks is not None for v in ds.data_vars.values())  # dask-backed
    # The masks store keeps its sets in groups; each opens lazily on its own.
    path = masks_path(study, RUN)
    store.open_dataset(path, "masks")  # validates
    for group in ("distribution", "fisher", "contextual"):
        ds = xr.open_zarr(path, group=group, zarr_format=3, consolidated=False)
        assert ds["input_ids"].chunks is not None
    before = {n: (mdir / f"{n}.zarr" / "zarr.json").stat().st_mtime_ns
              for n in ("predictions", "embeddings", "fisher")}
    shutil.rmtree(mdir / "fisher.zarr")  # as after a crash during the Fisher part
    flow = mdir / "checkpoints" / "flow" / "step-5"
    flow.rename(flow.with_name("away"))  # a lost snapshot: the re-run fails, and says so
    with pytest.raises(CheckpointError, match="step-5"):
        evaluate_member(study, member)
    assert not Layout(study).evaluate_marker(member).exists() and not (mdir / "fisher.zarr").exists()
    flow.with_name("away").rename(flow)
    evaluate_member(study, member)
    assert Layout(study).evaluate_marker(member).exists()
    after = {n: (mdir / f"{n}.zarr" / "zarr.json").stat().st_mtime_ns
             for n in ("predictions", "embeddings", "fisher")}
    assert after["predictions"] == before["predictions"]
    assert after["embeddings"] == before["embeddings"]
    assert after["fisher"] != before["fisher"]
    store.open_store(mdir / "fisher.zarr", "fisher")
    # Other weights asked for: every store is recomputed, none is silently kept.
    final = dataclasses.replace(study, analysis=dataclasses.replace(
        study.analysis, checkpoint="final", fisher_estimators=("batch",)))
    evaluate_member(final, member)
    for name in ("predictions", "embeddings", "fisher"):
        assert store.open_store(mdir / f"{name}.zarr", name).attrs["checkpoint"] == "final"
    weights = load(mdir / "checkpoints" / "final").bert.embeddings.word_embeddings.weight.detach().numpy()
    emb = store.open_store(mdir / "embeddings.zarr", "embeddings")
    assert np.array_equal(np.asarray(emb["word_embeddings"][:]), weights)
    assert json.loads(Layout(study).evaluate_marker(member).read_text())["checkpoint"] == "final"


def test_float16_final_checkpoint_and_no_transformer(tmp_path: Path) -> None:
    """prediction_dtype float16, analysis.checkpoint final, a model with 0 layers, one estimator."""
    from toolkit.evaluate import evaluate_member

    study = make_study(tmp_path, prediction_dtype="float16", checkpoint="final",
                       fisher_estimators=["batch"])
    token_hash = write_tokens(study)
    member = Member(RUN, 1)
    write_member(study, member, token_hash, layers=0)
    evaluate_member(study, member)
    mdir = Layout(study).member_dir(member)
    pred = store.open_store(mdir / "predictions.zarr", "predictions")
    assert pred["log_probs"].dtype == np.float16 and pred.attrs["checkpoint"] == "final"
    g = masks_of(study)
    model = load(mdir / "checkpoints" / "final")
    seq = np.asarray(g["distribution/position_sequence"][:])
    off = np.asarray(g["distribution/position_offset"][:])
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(np.asarray(g["distribution/input_ids"][:]).astype(np.int64)),
                       attention_mask=torch.from_numpy(
                           np.asarray(g["distribution/attention_mask"][:]).astype(np.int64))).logits
    want = torch.log_softmax(logits.double(), -1)[seq, off].numpy()
    np.testing.assert_allclose(np.asarray(pred["log_probs"][:], dtype=np.float64), want, atol=1e-2, rtol=2e-3)
    emb = store.open_store(mdir / "embeddings.zarr", "embeddings")
    ids = np.asarray(g["contextual/input_ids"][:]).astype(np.int64)
    att = np.asarray(g["contextual/attention_mask"][:])
    with torch.no_grad():  # 0 layers: the embedding output, mean-pooled
        out = model.bert.embeddings(input_ids=torch.from_numpy(ids)).double().numpy()
    naive = (out * att[..., None]).sum(1) / att.sum(1, keepdims=True)
    np.testing.assert_allclose(np.asarray(emb["contextual"][:]), naive, atol=1e-5)
    fisher = store.open_dataset(mdir / "fisher.zarr", "fisher", chunks={})
    assert list(fisher["estimator"].values) == ["batch"]
    assert list(fisher["group"].values) == ["embeddings", "head"]
