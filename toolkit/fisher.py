"""Empirical Fisher information of a BERT masked LM, summed per parameter group.

Two estimators (docs/methods.md, "Empirical Fisher information"), both over the masked
tokens of evaluation batches (``labels`` = -100 where a token is not masked):

- ``"batch"`` (the paper's): g_b = gradient of the mean cross-entropy over batch b's
  masked tokens; F = sum_b g_b**2 / (masked tokens of all batches).
- ``"per-example"`` (the true empirical Fisher): g_i = gradient of the mean
  cross-entropy over sequence i's masked tokens; F = mean over the sequences with at
  least one masked token of g_i**2.

The per-example estimator costs about one forward and backward pass, not one per
sequence: hooks keep every Linear / LayerNorm input, ``torch.autograd.grad`` is asked
only for the gradient of the embedding sum (so autograd skips the weight gradients),
and tensor hooks turn each module's output gradient into per-sequence squared
gradients as backward reaches it. A Linear's per-sequence gradient is B_i^T A_i
(A_i inputs, B_i output gradients, one row per token): its squared norm comes from
the Gram trick <A_i A_i^T, B_i B_i^T> where that is cheaper, else (and for the full
diagonal) from B_i^T A_i built by bmm for a chunk of sequences at a time (chunks sized
to the L2 cache on the CPU). The MLM head runs on masked positions only; on the CPU its
rows are taken one sequence's contiguous block at a time, on a GPU padded for bmm.
LayerNorm gradients are per-sequence sums of grad_out * normalised input; embedding
tables get the embedding-sum gradient summed per distinct (sequence, row) pair. With
tied input/output embeddings the decoder's per-sequence gradient is added to the input
embedding's *inside* the square.

Cost (``python -m benchmarks fisher``, 1 CPU thread, V 4096, T 128, 15% masked): traces
1.0-1.1x and the full diagonal 1.13-1.24x one plain forward+backward that also runs the
head on masked positions only (the toolkit's training step).

Groups: ``embeddings`` (word, position, token-type tables, embedding LayerNorm),
``layer.<i>`` (transformer block i), ``head`` (MLM transform, decoder bias, and the
decoder weight when it is not tied to the word embeddings).

Other architectures (adopted RoBERTa, ESM, ... checkpoints) get the same groups from
their parameter names (:func:`parameter_group` with the model's ``base_model_prefix``:
``*.embeddings.*``, ``*.layer.<i>.*``, everything outside the base model is ``head``,
as is a base-model parameter after the blocks such as ESM's final LayerNorm). Their
per-example estimator runs one backward per sequence (exact, slower); the batch
estimator is the same code for every architecture.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from toolkit.errors import ConfigError, InputError
from toolkit.plumbing import IGNORE, network_order
from toolkit.progress import LogProgress

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

Estimator = Literal["per-example", "batch"]
ESTIMATORS: tuple[str, ...] = ("per-example", "batch")
_REQUIRED = ("input_ids", "attention_mask", "labels")
_OPTIONAL = ("token_type_ids", "position_ids")
_LAYER = re.compile(r"(?:^|\.)(?:encoder\.)?layers?\.(\d+)\.")
_EMBEDDINGS = re.compile(r"(?:^|\.)embeddings\.")
_LOG_EVERY_S = 30.0
# Per-sequence weight gradients materialised at once: on a GPU 16 MiB (fp32) per bmm; on a
# CPU 1 MiB, so that a chunk is squared and summed while it is still in the L2 cache (with
# 16 MiB chunks the bmm path took twice the time of the plain weight-gradient matmul).
_CHUNK_ELEMENTS = 1 << 22
_CHUNK_ELEMENTS_CPU = 1 << 18
_ROW_LOOP_DEVICES = ("cpu",)  # devices where the head's rows go one sequence at a time, unpadded


@dataclass(frozen=True)
class FisherTraces:
    """Traces (sums of the diagonal) of one model's empirical Fisher information.

    Attributes
    ----------
    groups
        Group -> trace, ordered ``embeddings``, ``layer.0`` ... ``layer.{L-1}``, ``head``.
    parameters
        Parameter name (as in ``model.named_parameters()``) -> trace.
    parameter_groups
        Parameter name -> group.
    n_examples
        Sequences with at least one masked token (the per-example mean's denominator).
    n_masked_tokens
        Masked tokens in all batches (the batch estimator's denominator).
    diagonal
        Parameter name -> the full diagonal (float32 array of the parameter's shape) when
        asked for (``fisher_traces(..., diagonal=True)``), else None. The traces are then
        the float64 sums of exactly these arrays.
    """

    groups: dict[str, float]
    parameters: dict[str, float]
    parameter_groups: dict[str, str]
    n_examples: int
    n_masked_tokens: int
    diagonal: dict[str, np.ndarray] | None = None

    def fractions(self) -> dict[str, float]:
        """Group traces normalised to sum to 1 (the paper's figure)."""
        total = sum(self.groups.values())
        return {g: v / total for g, v in self.groups.items()}


def parameter_group(name: str, base_prefix: str | None = None) -> str:
    """The Fisher group of a masked-LM parameter name.

    ``*.embeddings.*`` -> ``embeddings``, ``*.layer.<i>.*`` / ``*.layers.<i>.*`` (transformer
    block i: ``bert.encoder.layer.<i>``, ``roberta.encoder.layer.<i>``,
    ``esm.encoder.layer.<i>``) -> ``layer.<i>``, the MLM head (``cls.*``, ``lm_head.*``) ->
    ``head``. A tied decoder weight is named (and grouped) as the word embedding.

    Parameters
    ----------
    name
        As in ``model.named_parameters()``.
    base_prefix
        The model's ``base_model_prefix`` (``bert``, ``roberta``, ``esm``); given, the rule is
        generic: every parameter outside the base model is ``head``, and a base-model
        parameter that is neither an embedding nor in a block (ESM's
        ``encoder.emb_layer_norm_after``, a pooler, ESM's unused contact head) is ``head``
        too: it acts on the last block's output, as the head does. Without it, names
        other than BERT's, RoBERTa's and ESM's are an :class:`InputError`.
    """
    inside = base_prefix is None or name.startswith(f"{base_prefix}.")
    if inside and (m := _LAYER.search(name)):
        return f"layer.{m.group(1)}"
    if name.startswith(("cls.", "lm_head.")) or (base_prefix is not None and not inside):
        return "head"
    if inside and _EMBEDDINGS.search(name):
        return "embeddings"
    if base_prefix is not None:
        return "head"
    raise InputError(f"parameter '{name}' belongs to no Fisher group; groups are embeddings "
                      "(bert.embeddings.*), layer.<i> (bert.encoder.layer.<i>.*) and head (cls.*)")


def empirical_fisher(model: Any, batches: Iterable[Mapping[str, Any]],
                     estimator: Estimator = "per-example") -> dict[str, float]:
    """Group -> trace of the empirical Fisher information (see :func:`fisher_traces`)."""
    return fisher_traces(model, batches, estimator).groups


def fisher_traces(model: Any, batches: Iterable[Mapping[str, Any]],
                  estimator: Estimator = "per-example", device: Any = None, *,
                  diagonal: bool = False) -> FisherTraces:
    """Traces of the empirical Fisher information, per parameter and per group.

    Parameters
    ----------
    model
        A ``transformers`` ``BertForMaskedLM``. It runs in eval mode (no dropout); its
        mode, device and ``requires_grad`` flags are restored and no ``.grad`` is left.
    batches
        Dicts of (B, T) tensors ``input_ids``, ``attention_mask``, ``labels`` (-100 where a
        position is not masked); optional ``token_type_ids``, ``position_ids``.
    estimator
        ``"per-example"`` (mean squared per-sequence gradient) or ``"batch"`` (the paper's:
        squared batch-mean gradients over the number of masked tokens).
    device
        Where to compute; None: the model's device. The model is moved back afterwards.
    diagonal
        Also return the full diagonal (``FisherTraces.diagonal``), from the same single
        pass: the per-element squares that the traces sum are kept instead of summed
        (1.13-1.24x the cost of traces alone, see the module docstring).

    Returns
    -------
    FisherTraces
        Raw (not normalised) traces; float64 accumulation (with ``diagonal``: float32
        accumulation per element, traces summed from the diagonal in float64).
    """
    acc, names, n_examples, n_tokens = _run(model, batches, estimator, device, diagonal=diagonal)
    denom = n_examples if estimator == "per-example" else n_tokens
    diag: dict[str, np.ndarray] | None = None
    if diagonal:
        # float32 on the host, then the traces from exactly what a caller stores
        diag = {name: acc[name].div_(denom).float().cpu().numpy() for name in names}
        parameters = {name: float(np.sum(diag[name], dtype=np.float64)) for name in names}
    else:
        parameters = {name: float(acc[name]) / denom for name in names}
    prefix = getattr(model, "base_model_prefix", None) or None
    parameter_groups = {name: parameter_group(name, prefix) for name in names}
    groups: dict[str, float] = {}
    for group in sorted(set(parameter_groups.values()), key=network_order):
        groups[group] = sum(v for n, v in parameters.items() if parameter_groups[n] == group)
    return FisherTraces(groups=groups, parameters=parameters, parameter_groups=parameter_groups,
                        n_examples=n_examples, n_masked_tokens=n_tokens, diagonal=diag)


def fisher_diagonal(model: Any, batches: Iterable[Mapping[str, Any]],
                    estimator: Estimator = "per-example") -> dict[str, torch.Tensor]:
    """The full diagonal of the empirical Fisher, per parameter.

    Same model, batches and estimators as :func:`fisher_traces`; computed on the model's
    device. Returns parameter name -> tensor of the parameter's shape and dtype.
    """
    acc, names, n_examples, n_tokens = _run(model, batches, estimator, None, diagonal=True)
    denom = n_examples if estimator == "per-example" else n_tokens
    return {name: acc[name].div_(denom) for name in names}


def diagonal_bytes(shape: str | Mapping[str, Any], vocab: int, *, estimators: int = 1,
                   snapshots: int = 1) -> int:
    """Bytes of the stored Fisher diagonal (float32) of a toolkit BERT, before compression.

    Parameters
    ----------
    shape
        A named shape (``"bert-base"``, ``"4M"``, ... of ``toolkit.config.SHAPES``) or a dict
        of its BertConfig fields (``toolkit.config.effective_shape(model)``); the toolkit's
        tied embeddings and ``type_vocab_size`` 1 unless the dict says otherwise.
    vocab
        Vocabulary size, special tokens included.
    estimators, snapshots
        Estimators times weight snapshots stored (one diagonal each).

    Examples
    --------
    >>> diagonal_bytes("bert-base", 4096)  # 89,191,936 parameters: about 0.36 GB
    356767744
    """
    from toolkit.config import SHAPES

    f = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    h, n_layers, inner = int(f["hidden_size"]), int(f["num_hidden_layers"]), int(f["intermediate_size"])
    positions, types = int(f["max_position_embeddings"]), int(f.get("type_vocab_size", 1))
    embeddings = (vocab + positions + types) * h + 2 * h  # three tables + LayerNorm
    # Q, K, V, attention output (h x h + bias), FFN in and out, two LayerNorms
    layer = 4 * (h * h + h) + (h * inner + inner) + (inner * h + h) + 2 * 2 * h
    head = (h * h + h) + 2 * h + vocab  # transform, its LayerNorm, decoder bias
    if not f.get("tie_word_embeddings", True):
        head += vocab * h
    return 4 * (embeddings + n_layers * layer + head) * estimators * snapshots


# --------------------------------------------------------------------------- driver


def _run(model: Any, batches: Iterable[Mapping[str, Any]], estimator: str, device: Any,
         *, diagonal: bool) -> tuple[dict[str, Any], list[str], int, int]:
    """Accumulate squared gradients over all batches: (name -> sum, names, sequences, tokens)."""
    import torch

    if estimator not in ESTIMATORS:
        raise ConfigError(f"Fisher estimator '{estimator}' is unknown; estimators: {', '.join(ESTIMATORS)}")
    bert = _is_bert(model)
    named = list(model.named_parameters())  # tied parameters appear once, under their first name
    names = [n for n, _ in named]
    n_examples = n_tokens = 0
    total = len(batches) if hasattr(batches, "__len__") else None  # type: ignore[arg-type]
    progress = LogProgress(desc=f"Fisher ({estimator})", total=total, unit="batch", every_s=_LOG_EVERY_S,
                           logger=log)
    with _fisher_mode(model, device) as dev:
        if diagonal:
            sums: dict[int, Any] = {id(p): torch.zeros_like(p) for _, p in named}
        else:
            sums = {id(p): torch.zeros((), dtype=torch.float64, device=dev) for _, p in named}
        engine: Any = None
        if estimator == "per-example":
            # The one-pass engine knows BERT's modules; other architectures (RoBERTa, ESM ...)
            # take one backward per sequence: the same g_i, slower.
            engine = _PerExample(model, sums, diagonal) if bert else _PerSequence(model, named, sums, diagonal)
        try:
            for k, batch in enumerate(_batches(batches, dev, model.config.vocab_size)):
                counts = (batch["labels"] != IGNORE).sum(1)  # (B,) masked tokens per sequence
                n_masked = int(counts.sum())
                if n_masked == 0:
                    continue
                if engine is not None:
                    engine.run(batch, counts)
                else:
                    _batch_step(model, named, batch, sums, diagonal)
                n_examples += int((counts > 0).sum())
                n_tokens += n_masked
                progress.moveto(k + 1, counts={"sequences": n_examples, "masked tokens": n_tokens})
        finally:
            if engine is not None:
                engine.close()
    if n_tokens == 0:
        raise InputError("Fisher batches hold no masked token (every label is -100); "
                          "give batches whose labels mark the masked positions")
    progress.close()
    return {n: sums[id(p)] for n, p in named}, names, n_examples, n_tokens


def _is_bert(model: Any) -> bool:
    """A BertForMaskedLM layout (bert.embeddings with its tables, cls.predictions)."""
    emb = getattr(getattr(model, "bert", None), "embeddings", None)
    needed = ("word_embeddings", "position_embeddings", "token_type_embeddings", "LayerNorm")
    head = getattr(getattr(model, "cls", None), "predictions", None)
    if emb is not None and head is not None and all(hasattr(emb, n) for n in needed):
        return True
    if not hasattr(model, "base_model") or not hasattr(model, "config"):
        raise InputError(f"the Fisher needs a transformers masked LM (a PreTrainedModel with a base "
                          f"model and an MLM head); got {type(model).__name__}")
    return False


@contextmanager
def _fisher_mode(model: Any, device: Any) -> Iterator[torch.device]:
    """Eval mode, gradients enabled for every parameter, on ``device``; all restored after."""
    import torch

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    home = params[0].device
    dev = torch.device(device) if device is not None else home
    if dev != home:
        model.to(dev)
    model.eval()
    try:
        for p in params:
            p.requires_grad_(True)
        # a caller's no_grad() or inference_mode() would leave nothing to differentiate
        with torch.inference_mode(False), torch.enable_grad():
            yield dev
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
        if dev != home:
            model.to(home)


def _batches(batches: Iterable[Mapping[str, Any]], device: torch.device,
             vocab_size: int) -> Iterator[dict[str, torch.Tensor]]:
    """Validated batches on ``device``; a bad batch raises InputError naming it."""
    import torch

    for k, raw in enumerate(batches):
        where = f"Fisher batch {k}"
        if not isinstance(raw, Mapping):
            raise InputError(f"{where}: expected a dict of tensors (input_ids, attention_mask, "
                              f"labels), got {type(raw).__name__}")
        missing = [key for key in _REQUIRED if key not in raw]
        if missing:
            raise InputError(f"{where}: missing {', '.join(missing)}; every batch needs input_ids, "
                              "attention_mask and labels (-100 where a position is not masked)")
        batch = {key: torch.as_tensor(raw[key]).to(device, non_blocking=True)
                 for key in (*_REQUIRED, *_OPTIONAL) if raw.get(key) is not None}
        batch = {key: t.clone() if t.is_inference() else t for key, t in batch.items()}
        shape = batch["input_ids"].shape
        for key, t in batch.items():
            if t.dim() != 2 or (t.shape != shape and not (key == "position_ids" and t.shape[0] == 1)):
                raise InputError(f"{where}: {key} has shape {tuple(t.shape)}, expected "
                                  f"(batch, length) = {tuple(shape)} like input_ids")
            if t.is_floating_point():
                raise InputError(f"{where}: {key} must hold integers, not {t.dtype}")
        ids, labels = batch["input_ids"], batch["labels"]
        if bool(((ids < 0) | (ids >= vocab_size)).any()):
            raise InputError(f"{where}: input_ids outside the vocabulary [0, {vocab_size})")
        if bool((((labels < 0) | (labels >= vocab_size)) & (labels != IGNORE)).any()):
            raise InputError(f"{where}: labels must be token ids in [0, {vocab_size}) or -100 "
                              "(not masked)")
        if "position_ids" in batch:
            batch["position_ids"] = batch["position_ids"].expand(shape)
        yield batch


def _masked_logits(model: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """MLM logits at the masked positions only, row-major: (M, V)."""
    if not hasattr(model, "bert"):  # any other architecture: its base model and MLM head
        from toolkit.model import masked_logits

        return masked_logits(model, batch["input_ids"], batch["attention_mask"],
                             batch["labels"] != IGNORE)  # (M, V)
    hidden = model.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        token_type_ids=batch.get("token_type_ids"),
                        position_ids=batch.get("position_ids"))[0]  # (B, T, d)
    return model.cls(hidden[batch["labels"] != IGNORE])  # (M, V)


def _batch_step(model: Any, named: list[tuple[str, torch.nn.Parameter]],
                batch: Mapping[str, torch.Tensor], sums: dict[int, Any], diagonal: bool) -> None:
    """The paper's estimator: square the gradient of the batch's mean masked-token loss."""
    import torch
    import torch.nn.functional as F

    labels = batch["labels"][batch["labels"] != IGNORE]  # (M,)
    loss = F.cross_entropy(_masked_logits(model, batch), labels)
    params = [p for _, p in named]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        if g is None:  # a parameter the forward does not use (untied head's spare bias)
            continue
        if diagonal:
            sums[id(p)].addcmul_(g, g)
        else:
            sums[id(p)] += torch.sum(g * g, dtype=torch.float64)


# --------------------------------------------------------------------------- per-example engine


class _PerSequence:
    """The per-example estimator for any architecture: one backward per sequence.

    Sequence i's gradient g_i is that of the mean cross-entropy over its own masked
    tokens (the batch estimator's step on a batch of one), so the result is exactly the
    definition; it costs a forward and a backward per sequence instead of per batch.
    """

    def __init__(self, model: Any, named: list[tuple[str, Any]], sums: dict[int, Any],
                 diagonal: bool) -> None:
        self.model, self.named, self.sums, self.diagonal = model, named, sums, diagonal

    def run(self, batch: Mapping[str, torch.Tensor], counts: torch.Tensor) -> None:
        """Add the squared per-sequence gradients of one batch to ``sums``."""
        for i in counts.nonzero()[:, 0].tolist():
            one = {key: t[i:i + 1] for key, t in batch.items()}  # (1, T) each
            _batch_step(self.model, self.named, one, self.sums, self.diagonal)

    def close(self) -> None:
        """Nothing to release (no hooks)."""



class _PerExample:
    """Per-sequence squared gradients from one forward and one input-gradient backward.

    Forward hooks keep each Linear / LayerNorm input and put a tensor hook on its output;
    backward then delivers each output gradient once, for the whole batch, and the hook
    reduces (input, output gradient) to the sequences' squared parameter gradients. The
    backward is asked only for the gradient of the embedding sum (a detached leaf), so
    autograd computes no weight gradient of its own. Activations come in two layouts:
    (B, T, f) in the encoder and (M, f) rows (masked positions, row-major) in the head.
    """

    def __init__(self, model: Any, sums: dict[int, Any], diagonal: bool) -> None:
        import torch.nn as nn

        self.model, self.sums, self.diagonal = model, sums, diagonal
        emb = model.bert.embeddings
        self.tables = (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings)
        self.decoder = model.cls.predictions.decoder
        self.tied = self.decoder.weight is emb.word_embeddings.weight
        owned = [id(t.weight) for t in self.tables]
        self.handles = [emb.LayerNorm.register_forward_pre_hook(self._leaf)]
        for module in model.modules():
            if isinstance(module, nn.Linear):
                hook = self._fwd_linear
            elif isinstance(module, nn.LayerNorm):
                hook = self._fwd_norm
            else:
                continue
            own = [p for p in (module.weight, module.bias) if p is not None]
            if own:
                owned += [id(p) for p in own]
                self.handles.append(module.register_forward_hook(hook))
        if len(owned) - len(set(owned)) != int(self.tied):
            self.close()
            raise InputError(f"{type(model).__name__} shares parameters between modules beyond the "
                              "tied word embedding; use the 'batch' Fisher estimator")
        # Parameters outside Linear/LayerNorm/the embedding tables (the untied head's spare
        # bias): checked on the first batch to receive no gradient at all.
        handled = set(owned)
        self.spare = [(n, p) for n, p in model.named_parameters() if id(p) not in handled]
        for p in model.parameters():
            # Gradients flow from the leaf only: autograd then neither saves inputs for weight
            # gradients nor computes them (the flags are restored by _fisher_mode).
            p.requires_grad_(id(p) not in handled)
        self.leaf: Any = None
        self.dd: Any = None
        self.grams: dict[tuple[int, tuple[int, ...]], tuple[Any, Any]] = {}
        self.called: set[int] = set()

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    # ---- one batch

    def run(self, batch: Mapping[str, torch.Tensor], counts: torch.Tensor) -> None:
        """Add the squared per-sequence gradients of one batch to ``sums``."""
        import torch
        import torch.nn.functional as F

        labels = batch["labels"]
        where = labels != IGNORE  # (B, T)
        self.n_seq = labels.shape[0]
        self.ids = batch["input_ids"]
        self.row_seq = where.nonzero()[:, 0]  # (M,) sequence of each masked row
        offsets = counts.cumsum(0) - counts  # (B,) first row of each sequence
        self.row_slot = torch.arange(self.row_seq.numel(), device=labels.device) - offsets[self.row_seq]
        self.width = int(counts.max())
        # On the CPU the head's rows are handled one sequence at a time, in place (each
        # sequence's rows are contiguous): padding (M, V) rows to (B, W, V) cost more than the
        # products it enables. GPUs keep the padded bmm (one kernel, not one per sequence).
        self.loop = labels.device.type in _ROW_LOOP_DEVICES
        self.chunk = _CHUNK_ELEMENTS_CPU if labels.device.type == "cpu" else _CHUNK_ELEMENTS
        self.spans: list[tuple[int, int]] = []  # (first row, end) of each sequence's rows
        if self.loop:
            ends = counts.cumsum(0).tolist()
            self.spans = [(end - n, end) for end, n in zip(ends, counts.tolist(), strict=True) if n]
        try:
            logits = _masked_logits(self.model, batch)  # (M, V)
            ce = F.cross_entropy(logits, labels[where], reduction="none")  # (M,)
            # Sum over sequences of each one's mean: sequence i's rows get exactly g_i.
            loss = (ce / counts[self.row_seq].to(ce.dtype)).sum()
            if self.leaf is None:
                raise InputError("the embedding LayerNorm never ran; the Fisher needs a "
                                  "BertForMaskedLM whose embeddings end in bert.embeddings.LayerNorm")
            spare = [p for _, p in self.spare]
            grads = torch.autograd.grad(loss, [self.leaf, *spare], allow_unused=True)
            for (name, _), g in zip(self.spare, grads[1:], strict=True):
                if g is not None:
                    raise InputError(f"parameter '{name}' sits in a module the per-example Fisher "
                                      "does not handle; use the 'batch' estimator")
            self.spare = []
            self._embeddings(batch, grads[0])
        finally:
            self.leaf = self.dd = None
            self.grams.clear()
            self.called.clear()

    def _once(self, module: Any) -> None:
        if id(module) in self.called:
            raise InputError(f"{type(module).__name__} module runs twice in one forward; the "
                              "per-example Fisher needs each module once; use the 'batch' estimator")
        self.called.add(id(module))

    def _leaf(self, module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        # Cut the graph at the embedding sum: its gradient b gives every table's per-sequence
        # gradient by scatter, and autograd skips the embedding-weight backward.
        self.leaf = args[0].detach().requires_grad_(True)  # (B, T, d)
        return (self.leaf, *args[1:])

    # ---- layouts

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, f) as is; (M, f) rows -> (B, W, f), zero rows after each sequence's last."""
        if x.dim() == 3:
            return x
        out = x.new_zeros(self.n_seq, self.width, x.shape[-1])
        out[self.row_seq, self.row_slot] = x
        return out

    def _token_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence sum over tokens: (B, f)."""
        if x.dim() == 3:
            return x.sum(1)
        return x.new_zeros(self.n_seq, x.shape[-1]).index_add_(0, self.row_seq, x)

    def _add(self, param: Any, per_seq: torch.Tensor) -> None:
        """Add the squares of per-sequence gradients (B, *param.shape)."""
        import torch

        if self.diagonal:
            self.sums[id(param)] += (per_seq * per_seq).sum(0)
        else:
            self.sums[id(param)] += torch.sum(per_seq * per_seq, dtype=torch.float64)

    # ---- modules

    def _fwd_linear(self, module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        self._once(module)
        output.register_hook(functools.partial(self._grad_linear, module, inputs[0].detach()))

    def _fwd_norm(self, module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        self._once(module)
        output.register_hook(functools.partial(self._grad_norm, module, inputs[0].detach()))

    def _grad_linear(self, module: Any, a: torch.Tensor, g: torch.Tensor) -> None:
        import torch

        weight = module.weight
        if self.diagonal:
            acc = self.sums[id(weight)]
            for w in self._weight_grads(a, g):  # (c, out, in) or one sequence's (out, in)
                if w.dim() == 3 and w.shape[0] == 1:
                    w = w[0]
                if w.dim() == 2:  # one pass, in cache
                    acc.addcmul_(w, w)
                else:
                    acc += w.square_().sum(0)
        else:
            self.sums[id(weight)] += self._weight_sq(a, g)
        if module.bias is not None:
            self._add(module.bias, self._token_sum(g))
        if module is self.decoder and self.tied:
            # D_i[ids_t] for every input position t: what the decoder adds to the word rows
            # sequence i also reads, kept for the cross term of |E_i + D_i|^2.
            picked = g.gather(1, self.ids[self.row_seq])  # (M, T): g_r[ids_t] of r's sequence
            self.dd = torch.bmm(self._pad(picked).mT, self._pad(a))  # (B, T, d)

    def _weight_sq(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Sum over sequences of a Linear's squared per-sequence weight-gradient norm (float64)."""
        import torch

        if a.dim() == 2 and self.loop:
            return self._rows_sq(a, g)
        n_tok, n_in, n_out = (a.shape[1] if a.dim() == 3 else self.width), a.shape[-1], g.shape[-1]
        key = (a.data_ptr(), tuple(a.shape))  # query/key/value share their input's Gram
        cached = key in self.grams
        # |B^T A|^2 = <A A^T, B B^T> costs T^2 (in + out) instead of T in out
        if n_tok * (n_out + (0 if cached else n_in)) <= n_in * n_out:
            a3, g3 = self._pad(a), self._pad(g)  # (B, T, in), (B, T, out)
            if not cached:
                self.grams[key] = (a, torch.bmm(a3, a3.mT))  # keeps a alive: the key stays unique
            per_seq = (self.grams[key][1] * torch.bmm(g3, g3.mT)).sum((1, 2))  # (B,)
            return torch.sum(per_seq, dtype=torch.float64)
        norms = [w.square_().sum((1, 2)) for w in self._weight_grads(a, g)]  # (c,) each
        return torch.sum(torch.cat(norms), dtype=torch.float64)

    def _rows_sq(self, a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """:meth:`_weight_sq` for (M, f) rows, one sequence's block of rows at a time (float64)."""
        import torch

        n_in, n_out = a.shape[-1], g.shape[-1]
        norms = []
        for lo, hi in self.spans:
            ai, gi = a[lo:hi], g[lo:hi]  # (n, in), (n, out)
            if (hi - lo) * (n_in + n_out) <= n_in * n_out:  # Gram trick, as in _weight_sq
                norms.append(torch.sum((ai @ ai.T) * (gi @ gi.T)))
            else:
                w = (gi.T @ ai).view(-1)  # (out * in,)
                norms.append(torch.dot(w, w))
        return torch.sum(torch.stack(norms), dtype=torch.float64)

    def _weight_grads(self, a: torch.Tensor, g: torch.Tensor) -> Iterator[torch.Tensor]:
        """Per-sequence weight gradients B_i^T A_i, a chunk of sequences at a time: (c, out, in).

        A few bmm calls rather than one mm per sequence: on a CPU shared with other jobs
        every small multithreaded op waits for its slowest thread, which made the
        per-sequence loop up to 50x slower than the same work batched. Chunks hold
        ``self.chunk`` elements (L2-sized on the CPU). The head's (M, f) rows on the CPU are
        the exception: one (out, in) per sequence straight from its rows, no padding.
        """
        import torch

        if a.dim() == 2 and self.loop:  # (out, in) of one sequence, from its own rows
            for lo, hi in self.spans:
                yield g[lo:hi].T @ a[lo:hi]
            return
        a3, g3 = self._pad(a), self._pad(g)  # (B, T, in), (B, T, out)
        step = max(1, self.chunk // (a3.shape[-1] * g3.shape[-1]))
        for lo in range(0, self.n_seq, step):
            yield torch.bmm(g3[lo:lo + step].mT, a3[lo:lo + step])

    def _grad_norm(self, module: Any, x: torch.Tensor, g: torch.Tensor) -> None:
        import torch.nn.functional as F

        if module.weight is not None:
            xhat = F.layer_norm(x, module.normalized_shape, eps=module.eps)  # normalised input
            self._add(module.weight, self._token_sum(g * xhat))
        if module.bias is not None:
            self._add(module.bias, self._token_sum(g))

    def _embeddings(self, batch: Mapping[str, torch.Tensor], b: torch.Tensor) -> None:
        """Embedding tables from b (B, T, d), the gradient of the embedding sum.

        Sequence i's gradient of a table is E_i[v] = sum of b_t over its positions t reading
        row v: one index_add over the distinct (sequence, row) pairs, found by
        ``torch.unique`` (B T log(B T)), rather than a (B, T, T) "same row" matrix and its
        bmm (B T^2 d). With tied embeddings D_i[v] (the decoder's share, ``self.dd`` holds it
        at every position reading v) enters the square: |E_i + D_i|^2 - |D_i|^2, since the
        decoder already added |D_i|^2.
        """
        import torch

        ids = batch["input_ids"]
        n_seq, n_tok, dim = b.shape
        flat = b.reshape(-1, dim)  # (B T, d)
        positions = batch.get("position_ids")
        if positions is None:
            positions = torch.arange(n_tok, device=ids.device).expand(n_seq, n_tok)
        types = batch.get("token_type_ids")
        if types is None:
            types = torch.zeros_like(ids)
        seq = torch.arange(n_seq, device=ids.device).repeat_interleave(n_tok)  # (B T,)
        for table, rows in zip(self.tables, (ids, positions, types), strict=True):
            rows = rows.reshape(-1)  # (B T,)
            bt = flat
            if table.padding_idx is not None:  # nn.Embedding gives its padding row no gradient
                bt = flat * (rows != table.padding_idx).unsqueeze(-1).to(flat.dtype)
            dd = self.dd.reshape(-1, dim) if table is self.tables[0] and self.tied else None
            if rows is positions and "position_ids" not in batch:
                e, where = bt, rows  # default positions 0..T-1: every (sequence, row) once
            else:
                key = seq * table.num_embeddings + rows  # (B T,) one per (sequence, row)
                uniq, inverse = torch.unique(key, return_inverse=True)  # (U,), (B T,)
                e = bt.new_zeros(uniq.numel(), dim).index_add_(0, inverse, bt)  # (U, d): E_i[v]
                where = uniq % table.num_embeddings  # (U,) table row of each pair
                if dd is not None:  # equal at every position of a pair: any one will do
                    dd = dd.new_empty(uniq.numel(), dim).index_copy_(0, inverse, dd)  # (U, d)
            acc = self.sums[id(table.weight)]
            if self.diagonal:
                acc.index_add_(0, where, e * e if dd is None else e * (e + 2 * dd))
            else:
                acc += torch.sum(e * e, dtype=torch.float64)
                if dd is not None:
                    acc += 2 * torch.sum(e * dd, dtype=torch.float64)
