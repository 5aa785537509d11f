"""Train one ensemble member: masked-LM pre-training with exact, resumable state.

Members of a run differ ONLY in the initialisation seed. Everything else that is
random is derived from ``study.data_seed``:

- data order: sample ``p`` of the training stream is sequence
  ``perm_e[p % N]`` of epoch ``e = p // N``, ``perm_e`` drawn from
  ``np.random.default_rng([data_seed, e])``; an optimizer step takes the next
  ``batch_size * grad_accum`` samples (so a step may straddle two epochs);
- dynamic MLM masks: micro-batch ``m`` of step ``s`` (0-based) is masked with
  ``np.random.default_rng([data_seed, s, m, 1])`` (the trailing tag keeps these
  streams apart from the permutations: NumPy seeds ``[a, b]`` and ``[a, b, 0]`` alike);
- dropout: the torch generator is seeded with ``data_seed`` after initialisation.

Batches are cut to their longest sequence (no compute on all-padding columns).
The loss of a step is the mean cross-entropy over all masked tokens of its
micro-batches (token-weighted across gradient accumulation, as one big batch would).
Resuming restores weights, optimizer, scheduler, every RNG and the data position, so
a run killed at any point and restarted ends bit-identical (on CPU) to an
uninterrupted one. SIGTERM / SIGUSR2 finish the current step, checkpoint and exit 75.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from toolkit import checkpoint as ckpt
from toolkit import store
from toolkit.checkpoint import model_positions
from toolkit.config import StudyConfig, TrainingConfig
from toolkit.errors import CheckpointError, ConfigError, StoreError
from toolkit.model import (
    build_model,
    load_model,
    masked_logits,
    n_parameters,
    pick_device,
)
from toolkit.plumbing import EXIT_REQUEUE, write_json_atomic
from toolkit.progress import CurveSinks, ProgressWriter, format_duration, progress_path, remaining_s
from toolkit.sequences import EVAL, MASK, TRAIN, SequenceSet, load_sequences
from toolkit.study import Layout, Member
from toolkit.tokenizers import (
    CHECKPOINT_TOKENIZER,
    N_SPECIALS,
    Tokenizer,
    exported_identity,
    has_tokenizer,
    load_checkpoint_tokenizer,
    load_tokenizer,
)

log = logging.getLogger(__name__)

_MASK_TAG, _EVAL_TAG = 1, 2


# --------------------------------------------------------------------------- pure pieces


def total_steps(t: TrainingConfig, n_sequences: int, tokens_per_sequence: float) -> int:
    """Optimizer steps implied by the budget: steps, non-padding tokens, or epochs (default 5)."""
    per_step = t.batch_size * t.grad_accum
    if t.steps is not None:
        return t.steps
    if t.tokens is not None:
        return max(1, math.ceil(t.tokens / (tokens_per_sequence * per_step)))
    epochs = t.epochs if t.epochs is not None else 5.0
    return max(1, math.ceil(epochs * n_sequences / per_step))


def lr_factor(schedule: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the peak LR at a step (HuggingFace's formulas for each schedule)."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        if schedule == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, vocab_size: int,
                probability: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT dynamic masking of a batch.

    ``probability`` of the non-special tokens are selected (at least one per batch
    when any is eligible); of those 80% become [MASK], 10% a random non-special
    token, 10% stay.

    Parameters
    ----------
    ids
        (B, T) int64 token ids with [CLS]/[SEP]/[PAD].

    Returns
    -------
    inputs, selected, labels
        (B, T) masked ids, (B, T) bool selection, (M,) original ids at the selection.
    """
    eligible = ids >= N_SPECIALS  # (B, T): the specials (PAD, UNK, CLS, SEP, MASK) are never selected
    selected = eligible & (rng.random(ids.shape) < probability)
    if not selected.any() and eligible.any():
        # A micro-batch with no target would give a NaN loss; take one eligible token.
        selected.flat[rng.choice(np.flatnonzero(eligible))] = True
    action = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[selected & (action < 0.8)] = MASK
    rand = selected & (action >= 0.8) & (action < 0.9)
    inputs[rand] = rng.integers(N_SPECIALS, vocab_size, size=int(rand.sum()))  # nor drawn as replacements
    return inputs, selected, ids[selected]


@dataclasses.dataclass
class Batch:
    """One masked micro-batch (NumPy; moved to the device by the loop)."""

    inputs: np.ndarray     # (B, T) int64
    attention: np.ndarray  # (B, T) int64
    selected: np.ndarray   # (B, T) bool
    labels: np.ndarray     # (M,) int64

    @property
    def n_tokens(self) -> int:
        return int(self.attention.sum())


def _trim(ids: np.ndarray, attention: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Drop the all-padding columns of a (B, seq_len) batch: no compute spent on them."""
    width = int(attention.sum(axis=1).max())
    return ids[:, :width], attention[:, :width]


class DataStream:
    """The training stream shared by every member: fixed order, fixed masks."""

    def __init__(self, seqs: SequenceSet, data_seed: int, batch_size: int, grad_accum: int,
                 vocab_size: int, probability: float) -> None:
        self.seqs, self.data_seed = seqs, data_seed
        self.batch_size, self.grad_accum = batch_size, grad_accum
        self.vocab_size, self.probability = vocab_size, probability
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {k: v for k, v in self._perms.items() if k >= epoch - 1}
            self._perms[epoch] = np.random.default_rng([self.data_seed, epoch]).permutation(len(self.seqs))
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> np.ndarray:
        """Sequence indices of stream samples ``start .. start + count - 1``."""
        n = len(self.seqs)
        pos = np.arange(start, start + count)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(pos // n):
            sel = pos // n == epoch
            out[sel] = self._perm(int(epoch))[pos[sel] % n]
        return out

    def step(self, step: int) -> list[Batch]:
        """The ``grad_accum`` micro-batches of optimizer step ``step`` (0-based)."""
        per_step = self.batch_size * self.grad_accum
        out = []
        for micro in range(self.grad_accum):
            idx = self.indices(step * per_step + micro * self.batch_size, self.batch_size)
            ids, attention = _trim(*self.seqs.batch(idx))
            rng = np.random.default_rng([self.data_seed, step, micro, _MASK_TAG])
            inputs, selected, labels = mask_tokens(ids, rng, self.vocab_size, self.probability)
            out.append(Batch(inputs, attention, selected, labels))
        return out


def eval_batches(seqs: SequenceSet, data_seed: int, batch_size: int, n_batches: int,
                 vocab_size: int, probability: float) -> list[Batch]:
    """Fixed evaluation batches: the first records of the evaluation split, fixed masks."""
    out = []
    for b in range(n_batches):
        idx = np.arange(b * batch_size, min(len(seqs), (b + 1) * batch_size))
        if idx.size == 0:
            break
        ids, attention = _trim(*seqs.batch(idx))
        rng = np.random.default_rng([data_seed, b, 0, _EVAL_TAG])
        inputs, selected, labels = mask_tokens(ids, rng, vocab_size, probability)
        out.append(Batch(inputs, attention, selected, labels))
    return out


# --------------------------------------------------------------------------- preemption


class Preemption:
    """SIGTERM / SIGUSR2 set a flag; the loop checkpoints and exits 75 after the current step."""

    SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR2", None)) if s)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum  # only set a flag: the handler may run in the middle of anything

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._old[sig] = signal.signal(sig, self._handler)
        else:
            log.debug("not the main thread: preemption signals are not handled")
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


# --------------------------------------------------------------------------- the member


def _open_tokens(study: StudyConfig, run: str) -> Any:
    path = Layout(study).run_tokens_store(run)
    try:
        return store.open_store(path, "tokens")
    except StoreError as e:
        raise StoreError(f"{e}; run `toolkit prepare {study.source_file or study.name}` first") from e


def _to_device(batch: Batch, device: Any) -> tuple[Any, Any, Any, Any]:
    import torch

    nb = device.type == "cuda"
    return (torch.from_numpy(batch.inputs).to(device, non_blocking=nb),
            torch.from_numpy(batch.attention).to(device, non_blocking=nb),
            torch.from_numpy(batch.selected).to(device, non_blocking=nb),
            torch.from_numpy(batch.labels).to(device, non_blocking=nb))


def _autocast(device: Any, precision: str) -> contextlib.AbstractContextManager[Any]:
    import torch

    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate_loss(model: Any, batches: list[Batch], device: Any, precision: str = "fp32") -> float:
    """Mean MLM cross-entropy (nats) over every masked token of ``batches``."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            ids, att, sel, labels = _to_device(batch, device)
            with _autocast(device, precision):
                logits = masked_logits(model, ids, att, sel)  # (M, V)
            total += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            count += labels.numel()
    model.train(was_training)
    return total / max(count, 1)


def _fingerprint(training: TrainingConfig, data_seed: int, member: Member, model_cfg: dict,
                 tokenizer_hash: str, data_digest: str | None) -> dict:
    """What a checkpoint must agree on to be resumed (cadence fields excluded)."""
    t = dataclasses.asdict(training)
    for key in ("checkpoint_every_steps", "checkpoint_every_minutes", "eval_every_steps",
                "log_every_steps", "device"):
        t.pop(key)
    t["fisher_flow"] = list(t["fisher_flow"])
    model_cfg = {k: v for k, v in model_cfg.items() if k != "transformers_version"}
    return {"member": member.id, "data_seed": data_seed, "tokenizer_hash": tokenizer_hash,
            "data": data_digest, "training": t, "model": model_cfg}


def train_member(study: StudyConfig, member: Member, data_digest: str | None = None) -> None:
    """Train one member (or adopt its external checkpoint), resuming from its last checkpoint.

    Writes ``checkpoints/{step-*,best,final,flow/step-*}`` (the exported folders with the
    run's tokenizer, see :func:`toolkit.checkpoint.save_hf`), ``train.zarr`` and, last,
    the ``train.complete.json`` marker under the member folder; while it trains, the loss
    curve so far is in ``train.progress.jsonl`` (:mod:`toolkit.progress`). Whether the member
    needs training at all is decided by the caller (:func:`toolkit.units.run_unit`),
    which passes ``data_digest``, the digest of the token store's contents: a resume
    checkpoint written on other data is refused, never continued.

    Raises
    ------
    StoreError
        The run's token store is missing or of another schema version.
    CheckpointError
        The checkpoint folder is not writable, or an external checkpoint does not fit.
    SystemExit
        With code 75 after SIGTERM / SIGUSR2 (state saved; run again to resume).
    """
    layout = Layout(study)
    group = _open_tokens(study, member.run)
    vocab_size = int(group.attrs["vocab_size"])
    tokenizer_hash = str(group.attrs["tokenizer_hash"])
    ckpt.ensure_writable(layout.checkpoints_dir(member))
    run = study.runs[member.run]
    if run.checkpoints:
        _adopt_external(study, member, vocab_size, tokenizer_hash)
        return
    if study.training.tensorboard:
        from toolkit.tensorboard_log import require_tensorboard

        require_tensorboard()  # before any work: the error names the install command
    _run_training(study, member, group, vocab_size, tokenizer_hash, data_digest)


def _adopt_external(study: StudyConfig, member: Member, vocab_size: int, tokenizer_hash: str) -> None:
    """Use the run's given checkpoint for this seed as the member: no training."""
    layout = Layout(study)
    run = study.runs[member.run]
    source = study.resolve_path(run.checkpoints[study.seeds.index(member.seed)])
    model = load_model(source)
    model_type = getattr(model.config, "model_type", None)
    if model_type != "bert" and run.tokenizer != CHECKPOINT_TOKENIZER:
        raise CheckpointError(f"{source}: a '{model_type}' checkpoint reads the ids of its own tokenizer; "
                              f"set runs.{member.run}.tokenizer = \"checkpoint\"")
    if model.config.vocab_size != vocab_size:
        raise CheckpointError(f"{source}: checkpoint vocabulary size {model.config.vocab_size} differs "
                              f"from the token store's {vocab_size} (run '{member.run}'); give a "
                              "checkpoint trained with this run's tokenizer")
    tokenizer: Any
    if run.tokenizer == CHECKPOINT_TOKENIZER:
        # The token store was built with this very tokenizer (prepare checked every folder's identity).
        tokenizer = load_checkpoint_tokenizer(source).hf
    else:
        tokenizer = _run_tokenizer(study, member.run, tokenizer_hash)
        _check_checkpoint_tokenizer(source, tokenizer, member.run)
    seq_len = study.eval_seq_len
    if model_positions(model) < seq_len:
        raise CheckpointError(f"{source}: checkpoint has {model_positions(model)} "
                              f"positions, the study evaluates sequences of {seq_len}; lower "
                              "analysis.seq_len or training.seq_len")
    folder = layout.checkpoints_dir(member)
    ckpt.save_hf(model, folder / "final", tokenizer)
    ckpt.save_hf(model, folder / "best", tokenizer)
    write_record(layout.member_store(member, "train"), _record_attrs(
        study.data_seed, member, model, tokenizer_hash, final_step=0, tokens_seen=0, tps=0.0,
        device="external", best=None, source=str(source)), empty_log())
    log.info("%s: adopted external checkpoint %s", member.id, source)
    write_json_atomic(layout.train_marker(member), marker_doc(member, [], 0, 0, tokenizer_hash,
                                                              vocab_size, 0.0))


def _run_tokenizer(study: StudyConfig, run: str, tokenizer_hash: str) -> Tokenizer:
    """The run's toolkit tokenizer, written into every exported model folder.

    Raises
    ------
    StoreError
        The token store's ``tokenizer.json`` is unreadable or is not the one the store
        was built with: an export without it, or with another one, would mislead.
    """
    path = Layout(study).run_tokenizer_file(run)
    fix = f"rebuild it with `toolkit run {study.source_file or study.name} --force prepare`"
    try:
        tokenizer = load_tokenizer(path)
    except StoreError as e:
        raise StoreError(f"{e}; run '{run}' cannot export its models without it: {fix}") from e
    if tokenizer.hash != tokenizer_hash:
        raise StoreError(f"{path}: not the tokenizer the token store was built with (sha256 "
                         f"{tokenizer.hash[:12]}, the store records {tokenizer_hash[:12]}): {fix}")
    return tokenizer


def _check_checkpoint_tokenizer(source: Path, tokenizer: Tokenizer, run: str) -> None:
    """Refuse an adopted checkpoint whose saved tokenizer is not the run's toolkit tokenizer.

    The identities (:mod:`toolkit.tokenizers.hf`: vocabulary, rules, specials) are compared,
    not vocabulary sizes. A checkpoint saved without a tokenizer can only be checked by
    its vocabulary size (done by the caller), which a warning says.
    """
    if not has_tokenizer(source):
        log.warning("%s: no tokenizer saved with the checkpoint; only its vocabulary size could be "
                    "checked against run '%s''s tokenizer", source, run)
        return
    try:
        theirs = load_checkpoint_tokenizer(source).hash
    except ConfigError as e:
        raise CheckpointError(f"{e} (run '{run}' needs the checkpoint's tokenizer to be its "
                              f"{tokenizer.spec})") from e
    if theirs != exported_identity(tokenizer):
        raise CheckpointError(f"{source}: the checkpoint's saved tokenizer is not run '{run}''s "
                              f"{tokenizer.spec} (other vocabulary, ids or rules); give a checkpoint "
                              f"trained with this run's tokenizer, or set runs.{run}.tokenizer = "
                              '"checkpoint" to read the corpus with the checkpoint\'s own')


def _fresh_state(total: int, fingerprint: dict[str, Any]) -> dict[str, Any]:
    return {"step": 0, "samples_seen": 0, "epoch": 0, "index_in_epoch": 0, "tokens_seen": 0,
            "train_seconds": 0.0, "best_eval_loss": None, "window": [0.0, 0],
            "total_steps": total, "fingerprint": fingerprint, **empty_log()}


def _check_fingerprint(path: Path, saved: dict[str, Any], now: dict[str, Any], member: str) -> None:
    if saved == now:
        return
    diff = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if "training" in diff:
        a, b = saved.get("training", {}), now["training"]
        diff += [f"training.{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    raise CheckpointError(f"{path}: written with a different configuration ({', '.join(diff)} "
                          "changed); restore the study's settings, or discard the checkpoints and "
                          f"train from scratch with `toolkit run STUDY --force train:{member}`")


def _run_training(study: StudyConfig, member: Member, group: Any, vocab_size: int,
                  tokenizer_hash: str, data_digest: str | None) -> None:
    import torch
    import torch.nn.functional as F

    t = study.training
    layout = Layout(study)
    folder = layout.checkpoints_dir(member)
    mode: Literal["truncate", "pack"] = "pack" if t.packing else "truncate"
    train = load_sequences(group, TRAIN, t.seq_len, mode=mode)
    if len(train) == 0:
        raise StoreError(f"{layout.run_tokens_dir(member.run)}: the token store has no training "
                         "records; check the corpus' train_records and rebuild it with --force")
    evals = load_sequences(group, EVAL, t.seq_len, mode=mode)
    total = total_steps(t, len(train), train.n_tokens() / len(train))
    per_step = t.batch_size * t.grad_accum
    device = pick_device(t.device)
    precision = t.precision
    if precision == "bf16" and device.type != "cuda":
        log.warning("training.precision = 'bf16' applies on CUDA only; training in fp32 on %s", device)
        precision = "fp32"

    tokenizer = _run_tokenizer(study, member.run, tokenizer_hash)  # exported with every model folder
    model = build_model(study.runs[member.run].model, vocab_size, member.seed,
                        max_positions=t.seq_len).to(device)  # type: ignore[arg-type]
    model.train()
    torch.manual_seed(study.data_seed)  # dropout draws the same stream in every member
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "LayerNorm" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "LayerNorm" not in n)]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": t.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=t.lr, betas=(0.9, 0.999), eps=1e-8)
    warmup = math.ceil(t.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(t.schedule, warmup, total))
    stream = DataStream(train, study.data_seed, t.batch_size, t.grad_accum, vocab_size, t.mlm_probability)
    evals_fixed = eval_batches(evals, study.data_seed, t.batch_size, t.eval_batches, vocab_size,
                               t.mlm_probability)
    model_cfg = {k: v for k, v in json.loads(model.config.to_json_string()).items()
                 if k != "transformers_version"}
    fingerprint = json.loads(json.dumps(_fingerprint(t, study.data_seed, member, model_cfg,
                                                     tokenizer_hash, data_digest)))

    state = _fresh_state(total, fingerprint)
    latest = ckpt.latest_checkpoint(folder)
    if latest is not None:
        saved = json.loads((latest / "state.json").read_text(encoding="utf-8"))
        _check_fingerprint(latest, saved.get("fingerprint", {}), fingerprint, member.id)
        state = ckpt.load_checkpoint(latest, model, optimizer, scheduler, device)
        log.info("%s: resuming from %s (step %d/%d)", member.id, latest.name, state["step"], total)
    flow_steps = list(iter_flow_steps(t.fisher_flow, total))
    log.info("%s: %s parameters, %d steps of %d x %d sequences (%d train, %d eval batches), "
             "device %s, %s", member.id, f"{n_parameters(model):,}", total, t.batch_size,
             t.grad_accum, len(train), len(evals_fixed), device, precision)

    step = state["step"]
    # The live curve restarts from the checkpoint's log: steps a killed process logged
    # after its last checkpoint are dropped, not repeated (see toolkit.progress).
    live: Any = ProgressWriter(progress_path(layout.member_dir(member)), member.id, total)
    if t.tensorboard:
        from toolkit.tensorboard_log import TensorBoardWriter

        live = CurveSinks([live, TensorBoardWriter(layout.member_dir(member))])
    live.start(step, state["log"], state["eval"])
    last_save = time.monotonic()
    proc_seconds, proc_steps, win_tokens, win_seconds = 0.0, 0, 0, 0.0
    with Preemption() as preempt, contextlib.closing(live):
        while step < total:
            t0 = time.perf_counter()
            batches = stream.step(step)
            n_masked = sum(b.labels.size for b in batches)
            lr = optimizer.param_groups[0]["lr"]
            step_loss = None
            for b in batches:
                if b.labels.size == 0:
                    continue
                ids, att, sel, labels = _to_device(b, device)
                with _autocast(device, precision):
                    logits = masked_logits(model, ids, att, sel)  # (M, V)
                # Token-weighted mean over the whole step, as one large batch would give.
                loss = F.cross_entropy(logits.float(), labels, reduction="sum") / n_masked
                loss.backward()
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            if t.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            tokens = sum(b.n_tokens for b in batches)
            loss_value = float(step_loss) if step_loss is not None else float("nan")
            dt = time.perf_counter() - t0
            state["tokens_seen"] += tokens
            state["train_seconds"] += dt
            state["window"][0] += loss_value
            state["window"][1] += 1
            proc_seconds, proc_steps = proc_seconds + dt, proc_steps + 1
            win_tokens, win_seconds = win_tokens + tokens, win_seconds + dt

            if step % t.log_every_steps == 0 or step == total:
                mean = state["window"][0] / state["window"][1]
                for key, value in (("step", step), ("loss", mean), ("lr", lr),
                                   ("tokens_seen", state["tokens_seen"])):
                    state["log"][key].append(value)
                state["window"] = [0.0, 0]
                eta = remaining_s(proc_steps, proc_steps + total - step, proc_seconds) or 0.0
                rate = win_tokens / max(win_seconds, 1e-9)
                log.info("%s step %d/%d loss %.4f lr %.3g %.0f tok/s ETA %s", member.id, step, total,
                         mean, lr, rate, format_duration(eta))
                live.log_point(step, mean, lr, state["tokens_seen"], rate, eta)
                win_tokens, win_seconds = 0, 0.0
            if evals_fixed and (step % t.eval_every_steps == 0 or step == total):
                eval_loss = evaluate_loss(model, evals_fixed, device, precision)
                state["eval"]["step"].append(step)
                state["eval"]["loss"].append(eval_loss)
                live.eval_point(step, eval_loss)
                best = state["best_eval_loss"]
                if best is None or eval_loss < best:
                    state["best_eval_loss"] = eval_loss
                    ckpt.save_hf(model, folder / "best", tokenizer)
                log.info("%s step %d/%d eval loss %.4f (best %.4f)", member.id, step, total,
                         eval_loss, state["best_eval_loss"])
            if step in flow_steps:
                ckpt.save_hf(model, folder / "flow" / ckpt.step_name(step), tokenizer)
            due = (time.monotonic() - last_save) >= 60 * t.checkpoint_every_minutes
            if step == total or step % t.checkpoint_every_steps == 0 or due or preempt.signum:
                epoch, index = divmod(step * per_step, len(train))
                state.update(step=step, samples_seen=step * per_step, epoch=epoch, index_in_epoch=index)
                ckpt.save_checkpoint(folder, step, model, optimizer, scheduler, state)
                last_save = time.monotonic()
            if preempt.signum:
                log.warning("%s: signal %d received; checkpoint saved at step %d/%d, exiting with "
                            "code %d (run again to resume)", member.id, preempt.signum, step, total,
                            EXIT_REQUEUE)
                live.end("preempted", step)
                raise SystemExit(EXIT_REQUEUE)

    if not evals_fixed:
        log.warning("%s: no evaluation records; 'best' is the final model", member.id)
        ckpt.save_hf(model, folder / "best", tokenizer)
    ckpt.save_hf(model, folder / "final", tokenizer)
    tps = state["tokens_seen"] / state["train_seconds"] if state["train_seconds"] > 0 else 0.0
    write_record(layout.member_store(member, "train"), _record_attrs(
        study.data_seed, member, model, tokenizer_hash, final_step=step, tokens_seen=state["tokens_seen"],
        tps=tps, device=str(device), best=state["best_eval_loss"]),
        {"log": state["log"], "eval": state["eval"]})
    flow = [{"step": s, "path": f"checkpoints/flow/{ckpt.step_name(s)}"} for s in flow_steps]
    write_json_atomic(layout.train_marker(member), marker_doc(
        member, flow, step, state["tokens_seen"], tokenizer_hash, vocab_size, tps,
        best_step=best_eval_step(state["eval"]["step"], state["eval"]["loss"], step)))
    live.end("done", step)
    log.info("%s: done, %d steps, %s tokens, %.0f tok/s", member.id, step,
             f"{state['tokens_seen']:,}", tps)


# --------------------------------------------------------------------------- outputs


def empty_log() -> dict[str, dict[str, list]]:
    return {"log": {"step": [], "loss": [], "lr": [], "tokens_seen": []},
            "eval": {"step": [], "loss": []}}


def _record_attrs(data_seed: int, member: Member, model: Any, tokenizer_hash: str, *,
                  final_step: int, tokens_seen: int, tps: float, device: str,
                  best: float | None, source: str | None = None) -> dict[str, Any]:
    attrs = {"member": member.id, "run": member.run, "seed": member.seed,
             "data_seed": data_seed, "tokenizer_hash": tokenizer_hash,
             "model_config": json.loads(model.config.to_json_string()),
             "n_parameters": n_parameters(model), "final_step": final_step,
             "tokens_seen": tokens_seen, "tokens_per_second": tps, "device": device,
             "best_eval_loss": best}
    if source:
        attrs["external_checkpoint"] = source
    return attrs


def write_record(path: Path, attrs: dict[str, Any], logs: dict[str, dict[str, list]]) -> None:
    """The member's ``train.zarr``: loss curve and evaluation losses."""
    lg, ev = logs["log"], logs["eval"]
    with store.writing(path, "train", attrs, overwrite=True) as g:
        store.create_array(g, "train", "step", data=np.asarray(lg["step"], dtype=np.int64))
        store.create_array(g, "train", "loss", data=np.asarray(lg["loss"], dtype=np.float32))
        store.create_array(g, "train", "lr", data=np.asarray(lg["lr"], dtype=np.float32))
        store.create_array(g, "train", "tokens_seen", data=np.asarray(lg["tokens_seen"], dtype=np.int64))
        store.create_array(g, "train", "eval_step", data=np.asarray(ev["step"], dtype=np.int64))
        store.create_array(g, "train", "eval_loss", data=np.asarray(ev["loss"], dtype=np.float32))


def marker_doc(member: Member, flow: list[dict[str, Any]], final_step: int, tokens_seen: int,
               tokenizer_hash: str, vocab_size: int, tps: float,
               best_step: int | None = None) -> dict[str, Any]:
    """The ``train.complete.json`` document (keys read by the evaluate stage).

    ``best_step``: the step whose weights ``checkpoints/best`` holds (default: the final step,
    as for an adopted checkpoint); evaluate labels the last Fisher-flow point with it.
    """
    return {"member": member.id, "final": "checkpoints/final", "best": "checkpoints/best",
            "flow": flow, "final_step": int(final_step),
            "best_step": int(final_step if best_step is None else best_step),
            "tokens_seen": int(tokens_seen), "tokenizer_hash": tokenizer_hash,
            "vocab_size": int(vocab_size), "tokens_per_second": float(tps)}


def best_eval_step(steps: list[int], losses: list[float], final_step: int) -> int:
    """The step whose weights ``checkpoints/best`` holds: the loop above saves on the first
    evaluation and then on every strictly lower loss (``final_step`` if none was evaluated)."""
    best, at = None, final_step
    for step, loss in zip(steps, losses, strict=True):
        if best is None or loss < best:
            best, at = loss, int(step)
    return at


def iter_flow_steps(fractions: tuple[float, ...], total: int) -> Iterator[int]:
    """Distinct steps (1..total) at the Fisher-flow fractions of training."""
    seen = set()
    for f in sorted(fractions):
        step = min(total, max(1, round(f * total)))
        if step not in seen:
            seen.add(step)
            yield step
