"""Per-member outputs: predictions, embeddings and Fisher stores of one trained member.

``evaluate_member`` is the body of an ``evaluate`` unit. Given a member whose training
finished (``train.complete.json``), it evaluates the weights chosen by
``analysis.checkpoint`` on the shared evaluation masks (:mod:`toolkit.masks`, built by
the prepare unit of the member's token store; evaluate only opens them and refuses,
in one line, a store that is missing or was built with other settings) and writes, in
``members/<run>/seed<N>/``:

- ``predictions.zarr``: the log-softmax over the vocabulary at every masked position
  of the 'distribution' set, in the masks store's (sequence, seq_pos) order;
- ``embeddings.zarr``: the input word-embedding matrix and mean-pooled last-layer
  states of the 'contextual' set;
- ``fisher.zarr``: empirical Fisher traces per group and per parameter tensor, for
  every estimator and every weight snapshot (the Fisher flow, then the evaluated
  checkpoint, labelled with the step its weights were saved at), and the full diagonal of the tensors of the groups
  ``analysis.fisher_diagonal`` names (``diagonal/<parameter>``, chunked per tensor);

then ``evaluate.complete.json`` last. Each store is all-or-nothing and a store that
exists, validates and was computed from the same inputs is kept, so a re-run after a
crash redoes only what is missing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from toolkit import store
from toolkit.checkpoint import model_positions
from toolkit.config import StudyConfig
from toolkit.errors import CheckpointError, ConfigError, StoreError
from toolkit.masks import CHECKED_ATTRS, open_masks
from toolkit.model import last_hidden, load_model, masked_logits, pick_device
from toolkit.plumbing import IGNORE, network_order, write_json_atomic
from toolkit.progress import LogProgress
from toolkit.study import Layout, Member

log = logging.getLogger(__name__)

_ROWS = 1024  # mask rows read from Zarr at a time (the masks store's chunk length)
# Elements of one chunk of a stored Fisher diagonal (4 MiB of float32): a tensor reads
# alone, and bert-base's 4096 x 768 word embeddings are 3 blocks of 1365 token rows.
DIAGONAL_CHUNK = 1 << 20
_LOG_EVERY_S = 15.0  # progress lines of the prediction and embedding loops


# --------------------------------------------------------------------------- helpers


class _RowWriter:
    """Fills a 2-D Zarr array row block by row block, writing whole chunks only.

    Writing whole chunks avoids Zarr's read-modify-write of partially filled chunks
    and keeps memory at one chunk (chunk x V), never positions x V.
    """

    def __init__(self, array: Any) -> None:
        self.array = array
        self.chunk = int(array.chunks[0])
        self.buf = np.empty((self.chunk, array.shape[1]), dtype=array.dtype)  # (chunk, V)
        self.n = 0
        self.start = 0

    def add(self, rows: np.ndarray) -> None:
        i = 0
        while i < rows.shape[0]:
            take = min(self.chunk - self.n, rows.shape[0] - i)
            self.buf[self.n:self.n + take] = rows[i:i + take]
            self.n += take
            i += take
            if self.n == self.chunk:
                self.flush()

    def flush(self) -> None:
        if self.n:
            self.array[self.start:self.start + self.n] = self.buf[:self.n]
            self.start += self.n
            self.n = 0


def _row_blocks(arrays: list[Any], batch_size: int) -> Any:
    """Yield (lo, hi, [numpy rows]) batches, reading each Zarr chunk of rows once."""
    n = arrays[0].shape[0]
    for lo in range(0, n, _ROWS):
        hi = min(n, lo + _ROWS)
        block = [np.asarray(a[lo:hi]) for a in arrays]
        for b in range(0, hi - lo, batch_size):
            yield lo + b, min(hi, lo + b + batch_size), [x[b:b + batch_size] for x in block]


def read_train_marker(study: StudyConfig, member: Member) -> dict[str, Any]:
    """The member's train marker, checked for the keys evaluation needs."""
    path = Layout(study).train_marker(member)
    if not path.is_file():
        raise StoreError(f"{path}: member {member.id} has not finished training; train the member "
                         f"first (toolkit train STUDY --member {member.id})")
    try:
        marker = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoreError(f"{path}: unreadable train marker ({e}); retrain the member") from e
    for key in ("final", "final_step", "tokenizer_hash"):
        if key not in marker:
            raise StoreError(f"{path}: train marker lacks '{key}'; retrain the member with this toolkit")
    for i, entry in enumerate(marker.get("flow") or []):
        if not isinstance(entry, dict) or "step" not in entry or "path" not in entry:
            raise StoreError(f"{path}: flow[{i}] must be {{\"step\": int, \"path\": str}}; retrain the member")
    marker["_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return marker


def _checkpoint(study: StudyConfig, member: Member, marker: dict[str, Any]) -> tuple[str, Path]:
    """(label recorded in the stores, folder) of the weights ``analysis.checkpoint`` selects."""
    member_dir = Layout(study).member_dir(member)
    name = study.analysis.checkpoint
    if not marker.get(name):
        log.warning("%s: no '%s' checkpoint in the train marker; evaluating 'final'", member.id, name)
        name = "final"
    path = (member_dir / marker[name]).resolve()
    # A checkpoint outside the member folder is an external one (runs.X.checkpoints).
    label = name if path.is_relative_to(member_dir.resolve()) else str(path)
    return label, path


def _checkpoint_step(study: StudyConfig, member: Member, marker: dict[str, Any], label: str) -> int:
    """Training step of the weights ``label`` names: what the last Fisher-flow point measured.

    'final' and adopted checkpoints: the final step; 'best': the marker's ``best_step``, or for
    markers written before it was recorded, the same rule as training (first evaluation, then
    every strictly lower loss) over ``train.zarr``'s evaluation record.
    """
    final_step = int(marker["final_step"])
    if label != "best":
        return final_step
    if marker.get("best_step") is not None:
        return int(marker["best_step"])
    from toolkit.train import best_eval_step

    path = Layout(study).member_store(member, "train")
    if not path.exists():
        log.warning("%s: no train.zarr to find the step of 'best'; labelling it with the final step %d",
                    member.id, final_step)
        return final_step
    g = store.open_store(path, "train")
    return best_eval_step([int(x) for x in g["eval_step"][...]], [float(x) for x in g["eval_loss"][...]],
                          final_step)


def _reusable(path: Path, kind: str, expected: dict[str, Any]) -> Any:
    """The existing store at ``path`` if it validates and matches ``expected``, else None."""
    if not path.exists():
        return None
    try:
        group = store.open_store(path, kind)
    except StoreError as e:
        log.warning("%s: existing store unusable (%s); rebuilding it", path, e)
        return None
    attrs = dict(group.attrs)
    for key, value in expected.items():
        if attrs.get(key) != value:
            log.warning("%s: built with %s = %r, now %r; rebuilding it", path, key, attrs.get(key), value)
            return None
    return group


# --------------------------------------------------------------------------- stores


def write_predictions(model: Any, masks: Any, path: Path, attrs: dict[str, Any], *,
                      dtype: str, batch_size: int) -> dict[str, Any]:
    """Log-probabilities at every masked position of the 'distribution' set.

    The MLM head runs only at masked positions, and rows are written chunk by chunk:
    memory is one batch of hidden states plus one chunk of (positions x V).
    Returns the summary attributes (n_positions, mean_nll, top1_accuracy).
    """
    import torch

    device = next(model.parameters()).device
    ids_a, att_a, lab_a = (masks[f"distribution/{k}"] for k in ("input_ids", "attention_mask", "labels"))
    pos_seq = np.asarray(masks["distribution/position_sequence"][...])
    pos_off = np.asarray(masks["distribution/position_offset"][...])
    n_pos, vocab = int(pos_seq.shape[0]), int(model.config.vocab_size)
    if n_pos == 0:
        raise StoreError(f"{path}: the evaluation masks have no masked position (no maskable token in "
                         "the evaluation split); use a larger evaluation split")
    targets = np.empty(n_pos, dtype=np.int32)
    nll_sum, correct, done = 0.0, 0, 0
    progress = LogProgress(desc=f"predictions {attrs['member']}", total=n_pos, unit="positions",
                           every_s=_LOG_EVERY_S, logger=log)
    with store.writing(path, "predictions", attrs, overwrite=True) as g:
        log_probs = store.create_array(g, "predictions", "log_probs", shape=(n_pos, vocab), dtype=dtype)
        writer = _RowWriter(log_probs)
        with torch.inference_mode():
            for lo, _hi, (ids, att, lab) in _row_blocks([ids_a, att_a, lab_a], batch_size):
                sel = lab != IGNORE  # (B, T)
                rows, offs = np.nonzero(sel)
                m = rows.shape[0]
                # The masks store's position list must describe exactly these positions.
                if not (np.array_equal(rows + lo, pos_seq[done:done + m])
                        and np.array_equal(offs, pos_off[done:done + m])):
                    raise StoreError(f"the masks store of {attrs['run']}: labels and position lists disagree "
                                     f"at sequence {lo}; rebuild it (`toolkit run STUDY --force prepare`)")
                if m == 0:
                    continue
                input_ids = torch.from_numpy(ids.astype(np.int64)).to(device)  # (B, T)
                attention = torch.from_numpy(att.astype(np.int64)).to(device)  # (B, T)
                sel_t = torch.from_numpy(sel).to(device)
                logits = masked_logits(model, input_ids, attention, sel_t)  # (M, V), row-major like np.nonzero
                logp = torch.log_softmax(logits.float(), dim=-1)  # (M, V)
                tgt = torch.from_numpy(lab[sel].astype(np.int64)).to(device)  # (M,)
                nll_sum += float(-logp.gather(1, tgt[:, None]).double().sum())
                correct += int((logp.argmax(dim=-1) == tgt).sum())
                # Cast before the copy: on a GPU, float16 halves the device-to-host traffic.
                writer.add(logp.to(getattr(torch, dtype)).cpu().numpy())
                targets[done:done + m] = lab[sel]
                done += m
                progress.update(m)
        progress.close()
        writer.flush()
        assert done == n_pos, (done, n_pos)
        store.create_array(g, "predictions", "target", data=targets)
        summary = {"n_positions": n_pos, "mean_nll": nll_sum / n_pos, "top1_accuracy": correct / n_pos}
        g.attrs.update(summary)
    return summary


def write_embeddings(model: Any, masks: Any, path: Path, attrs: dict[str, Any], *,
                     batch_size: int) -> None:
    """Word-embedding matrix and mean-pooled last hidden states of the 'contextual' set."""
    import torch

    device = next(model.parameters()).device
    # The input word embeddings of any architecture (BERT, RoBERTa, ESM, ...).
    words = model.get_input_embeddings().weight.detach().float().cpu().numpy()  # (V, d)
    ids_a, att_a = masks["contextual/input_ids"], masks["contextual/attention_mask"]
    pooled = np.empty((ids_a.shape[0], words.shape[1]), dtype=np.float32)  # (C, d)
    progress = LogProgress(desc=f"contextual {attrs['member']}", total=ids_a.shape[0], unit="sequences",
                           every_s=_LOG_EVERY_S, logger=log)
    with torch.inference_mode():
        for lo, hi, (ids, att) in _row_blocks([ids_a, att_a], batch_size):
            input_ids = torch.from_numpy(ids.astype(np.int64)).to(device)  # (B, T)
            attention = torch.from_numpy(att.astype(np.int64)).to(device)  # (B, T)
            # With no transformer layers this is the embedding output, as wanted.
            hidden = last_hidden(model, input_ids, attention)  # (B, T, d)
            weight = attention.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
            mean = (hidden * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)  # (B, d)
            pooled[lo:hi] = mean.float().cpu().numpy()
            progress.update(hi - lo)
    progress.close()
    with store.writing(path, "embeddings", attrs, overwrite=True) as g:
        store.create_array(g, "embeddings", "word_embeddings", data=words)
        store.create_array(g, "embeddings", "contextual", data=pooled)


def fisher_batches(masks: Any, batch_size: int, device: Any) -> list[dict[str, Any]]:
    """The 'fisher' set as model batches: input_ids, attention_mask, labels (-100 unmasked)."""
    import torch

    arrays = [masks[f"fisher/{k}"] for k in ("input_ids", "attention_mask", "labels")]
    batches = []
    for _lo, _hi, (ids, att, lab) in _row_blocks(arrays, batch_size):
        batches.append({
            "input_ids": torch.from_numpy(ids.astype(np.int64)).to(device),  # (B, T)
            "attention_mask": torch.from_numpy(att.astype(np.int64)).to(device),  # (B, T)
            "labels": torch.from_numpy(lab.astype(np.int64)).to(device),  # (B, T)
        })
    return batches


def diagonal_chunks(shape: tuple[int, ...]) -> tuple[int, ...]:
    """Chunks of a stored Fisher diagonal (estimator, step, *shape): one estimator and step,
    the whole tensor or blocks of its leading rows of at most ``DIAGONAL_CHUNK`` elements."""
    rest = int(np.prod(shape[1:], dtype=np.int64))  # 1 for a vector
    rows = max(1, min(shape[0], DIAGONAL_CHUNK // max(rest, 1)))
    return (1, 1, rows, *shape[1:])


def write_fisher(snapshots: list[tuple[int, Any]], masks: Any, path: Path, attrs: dict[str, Any], *,
                 estimators: tuple[str, ...], batch_size: int, device: Any,
                 diagonal: str | tuple[str, ...] | list[str] = "all") -> None:
    """Fisher traces, and the full diagonals of the ``diagonal`` groups, for every estimator
    and snapshot.

    ``snapshots`` is ``[(step, model or checkpoint folder), ...]``; folders are loaded
    one at a time, so only one extra model is in memory. ``diagonal`` is
    ``analysis.fisher_diagonal``: ``"all"``, ``"none"`` or a list of group names. The
    diagonal comes from the same pass as the traces (the traces are then its sums) and
    each one is written as soon as it is computed, so at most one diagonal is in memory.
    """
    from toolkit.fisher import fisher_traces

    batches = fisher_batches(masks, batch_size, device)
    n_masked = int(sum(int((b["labels"] != IGNORE).sum()) for b in batches))
    n_seq = int(masks["fisher/input_ids"].shape[0])
    steps = [s for s, _ in snapshots]
    wanted = None if diagonal in ("all", "none") else set(diagonal)
    results: dict[tuple[str, int], Any] = {}
    arrays: dict[str, Any] = {}  # parameter -> its diagonal/ array
    with store.writing(path, "fisher", {**attrs, "n_sequences": n_seq, "n_masked_tokens": n_masked},
                       overwrite=True) as g:
        for i, (step, source) in enumerate(snapshots):
            t0 = time.perf_counter()
            model = source if not isinstance(source, Path) else load_model(source, device)
            for e, est in enumerate(estimators):
                r = fisher_traces(model, batches, est, device=device,  # type: ignore[arg-type]
                                  diagonal=diagonal != "none")
                if r.diagonal is not None:
                    if not arrays and not results:
                        arrays = _diagonal_arrays(g, r, wanted, len(estimators), len(steps), attrs)
                    for name, arr in arrays.items():
                        d = r.diagonal.get(name)
                        if d is None or d.shape != arr.shape[2:]:
                            raise CheckpointError(f"{attrs['member']}: the snapshot at step {step} has other "
                                                  "parameters than the first one; the Fisher flow mixes "
                                                  "model shapes")
                        arr[e, i] = d
                    r = dataclasses.replace(r, diagonal=None)  # written: free it
                results[(est, step)] = r
            del model
            log.info("fisher %s: step %d (%d/%d snapshots), %d sequences, %d masked tokens, %.1f s",
                     attrs["member"], step, i + 1, len(snapshots), n_seq, n_masked, time.perf_counter() - t0)
        first = results[(estimators[0], snapshots[0][0])]
        groups = sorted(first.groups, key=network_order)
        params = list(first.parameters)
        fisher = np.empty((len(estimators), len(steps), len(groups)), dtype=np.float64)
        per_param = np.empty((len(estimators), len(steps), len(params)), dtype=np.float64)
        for e, est in enumerate(estimators):
            for s, step in enumerate(steps):
                r = results[(est, step)]
                if set(r.groups) != set(groups) or set(r.parameters) != set(params):
                    raise CheckpointError(f"{attrs['member']}: the snapshot at step {step} has other "
                                          "parameters than the first one; the Fisher flow mixes model shapes")
                fisher[e, s] = [r.groups[g] for g in groups]
                per_param[e, s] = [r.parameters[p] for p in params]
        g.attrs.update(diagonal=diagonal if isinstance(diagonal, str) else list(diagonal),
                       diagonal_parameters=list(arrays))
        store.create_array(g, "fisher", "estimator", data=np.array(estimators, dtype=str))
        store.create_array(g, "fisher", "step", data=np.array(steps, dtype=np.int64))
        store.create_array(g, "fisher", "group", data=np.array(groups, dtype=str))
        store.create_array(g, "fisher", "parameter", data=np.array(params, dtype=str))
        store.create_array(g, "fisher", "parameter_group",
                           data=np.array([first.parameter_groups[p] for p in params], dtype=str))
        store.create_array(g, "fisher", "fisher_trace", data=fisher)
        store.create_array(g, "fisher", "parameter_trace", data=per_param)


def _diagonal_arrays(g: Any, r: Any, wanted: set[str] | None, n_est: int, n_steps: int,
                     attrs: dict[str, Any]) -> dict[str, Any]:
    """Create the diagonal/ arrays of the wanted groups' tensors (all when ``wanted`` is None)."""
    if wanted is not None and (missing := sorted(wanted - set(r.groups))):
        raise ConfigError(f"analysis.fisher_diagonal names {', '.join(missing)}, which member "
                          f"{attrs['member']} does not have; its groups: {', '.join(r.groups)}")
    out = {}
    for name, d in r.diagonal.items():
        if wanted is None or r.parameter_groups[name] in wanted:
            out[name] = store.create_array(
                g, "fisher", f"diagonal/{name}", shape=(n_est, n_steps, *d.shape), dtype="float32",
                chunks=diagonal_chunks(d.shape),
                dims=["estimator", "step", *(f"{name}[{k}]" for k in range(d.ndim))])
    return out


# --------------------------------------------------------------------------- the unit


def evaluate_member(study: StudyConfig, member: Member) -> None:
    """Write one member's predictions, embeddings and Fisher stores, then its marker.

    Parameters
    ----------
    study
        The study; ``analysis`` selects the checkpoint, masks, dtypes and estimators.
    member
        A member whose training finished (its ``train.complete.json`` exists).

    Raises
    ------
    StoreError
        The member was not trained, its tokenizer differs from the token store's, or
        the evaluation masks of the current settings are missing (rerun the prepare unit:
        ``toolkit run STUDY``) or were built with other settings.
    CheckpointError
        A checkpoint named by the train marker is missing or does not fit the data.
    """
    t0 = time.perf_counter()
    layout = Layout(study)
    a = study.analysis
    marker = read_train_marker(study, member)
    tokens = store.open_store(layout.run_tokens_store(member.run), "tokens",
                              verify="size")  # attributes only; the masks were built from its bytes
    token_hash = tokens.attrs.get("tokenizer_hash")
    if marker["tokenizer_hash"] != token_hash:
        raise StoreError(f"{layout.train_marker(member)}: member {member.id} was trained with tokenizer "
                         f"{str(marker['tokenizer_hash'])[:12]}, the token store now has "
                         f"{str(token_hash)[:12]}; retrain the member on the current token store")
    masks = store.open_store(open_masks(study, member.run), "masks")
    mask_attrs = dict(masks.attrs)
    label, ckpt = _checkpoint(study, member, marker)
    device = pick_device(study.training.device)
    vocab = int(tokens.attrs["vocab_size"])
    base = {"member": member.id, "run": member.run, "seed": member.seed, "checkpoint": label,
            "tokenizer_hash": token_hash, "vocab_size": vocab,
            "masks": {k: mask_attrs.get(k) for k in CHECKED_ATTRS},
            "train_marker_sha256": marker["_sha256"]}
    member_dir = layout.member_dir(member)
    # A re-run (forced, or after other settings) may replace stores: until it finishes
    # the unit must not read as complete.
    layout.evaluate_marker(member).unlink(missing_ok=True)
    model = None

    def analysis_model() -> Any:
        nonlocal model
        if model is None:
            model = load_model(ckpt, device)
            if int(model.config.vocab_size) != vocab:
                raise CheckpointError(f"{ckpt}: model vocabulary {model.config.vocab_size} differs from "
                                      f"the token store's {vocab}; retrain the member")
            if model_positions(model) < int(mask_attrs["seq_len"]):
                raise CheckpointError(f"{ckpt}: the model has {model_positions(model)} "
                                      f"positions, evaluation sequences {mask_attrs['seq_len']}; "
                                      "set analysis.seq_len to at most that")
        return model

    pred_attrs = {**base, "prediction_dtype": a.prediction_dtype}
    pred = _reusable(layout.member_store(member, "predictions"), "predictions", pred_attrs)
    if pred is not None and all(k in pred.attrs for k in ("n_positions", "mean_nll", "top1_accuracy")):
        summary = {k: pred.attrs[k] for k in ("n_positions", "mean_nll", "top1_accuracy")}
        log.info("predictions %s: kept the existing store", member.id)
    else:
        summary = write_predictions(analysis_model(), masks, layout.member_store(member, "predictions"), pred_attrs,
                                    dtype=a.prediction_dtype, batch_size=a.batch_size)
    if _reusable(layout.member_store(member, "embeddings"), "embeddings", base) is None:
        write_embeddings(analysis_model(), masks, layout.member_store(member, "embeddings"), base,
                         batch_size=a.batch_size)
    # The evaluated checkpoint comes last, labelled with the step its weights are from (for
    # 'best' that can precede the last flow snapshots); a flow snapshot of that step holds the
    # same weights, so it is not measured twice.
    ckpt_step = _checkpoint_step(study, member, marker, label)
    flow = sorted((int(f["step"]), (member_dir / f["path"]).resolve()) for f in marker.get("flow") or [])
    steps = [s for s, _ in flow if s != ckpt_step] + [ckpt_step]
    diagonal = a.fisher_diagonal if isinstance(a.fisher_diagonal, str) else list(a.fisher_diagonal)
    fisher_attrs = {**base, "estimators": list(a.fisher_estimators), "steps": steps, "diagonal": diagonal,
                    "checkpoint_step": ckpt_step}
    if _reusable(layout.member_store(member, "fisher"), "fisher", fisher_attrs) is None:
        snapshots: list[tuple[int, Any]] = [(s, p) for s, p in flow if s != ckpt_step]
        snapshots.append((ckpt_step, analysis_model()))
        write_fisher(snapshots, masks, layout.member_store(member, "fisher"), fisher_attrs,
                     estimators=tuple(a.fisher_estimators), batch_size=a.batch_size, device=device,
                     diagonal=diagonal)
    summary = {**summary, "perplexity": math.exp(summary["mean_nll"]), "member": member.id,
               "checkpoint": label, "checkpoint_step": ckpt_step, "device": str(device),
               "fisher_steps": steps,
               "wall_seconds": round(time.perf_counter() - t0, 3)}
    write_json_atomic(layout.evaluate_marker(member), summary)
    log.info("evaluate %s: %d positions, mean NLL %.4f nats, top-1 %.3f (%.1f s)", member.id,
             summary["n_positions"], summary["mean_nll"], summary["top1_accuracy"],
             summary["wall_seconds"])
