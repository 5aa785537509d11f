"""Per-example empirical Fisher versus one plain forward+backward of the same batch.

``python -m benchmarks fisher``. For the ``tiny`` and ``4M`` model shapes (V = 4096,
sequences of 128 tokens, 15% masked, batches of 32 and 128) it times, interleaved and
as medians over repetitions:

- ``plain``: ``model(**batch).loss.backward()`` (the baseline, ratio 1);
- ``traces``: :func:`toolkit.fisher.fisher_traces` with the per-example estimator;
- ``diagonal``: :func:`toolkit.fisher.fisher_diagonal`, per-example (full diagonal);
- ``batch``: :func:`toolkit.fisher.fisher_traces` with the paper's estimator;
- ``naive``: one backward per sequence (timed once, against the plain pass just before),

and prints each as a ratio to ``plain`` (targets: traces about 1.0x, diagonal <= 1.3x),
with the relative difference of each group's per-example trace from the
naive loop. Never asserts on time.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2,
             "intermediate_size": 512},
    "4M": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
           "intermediate_size": 1024},
}
VOCAB = 4096
LENGTH = 128
BATCHES = (32, 128)
MASK_RATE = 0.15
MASK_ID = 4


def make_model(shape: str, device: Any) -> Any:
    """A randomly initialised BertForMaskedLM of a named shape (tied embeddings, fp32)."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    config = BertConfig(vocab_size=VOCAB, max_position_embeddings=LENGTH, **SHAPES[shape])
    return BertForMaskedLM(config).to(device)


def make_batch(n_seq: int, device: Any, seed: int = 1) -> dict[str, Any]:
    """Random sequences, 15% of positions masked (MASK in the input, true token in labels)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, VOCAB, (n_seq, LENGTH), generator=gen)  # (B, T)
    chosen = torch.rand(n_seq, LENGTH, generator=gen) < MASK_RATE
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    inputs = torch.where(chosen, torch.full_like(ids, MASK_ID), ids)
    batch = {"input_ids": inputs, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


def naive_traces(model: Any, batch: dict[str, Any]) -> dict[str, float]:
    """Per-example Fisher traces per group, one backward pass per sequence (the reference)."""
    import torch

    from toolkit.fisher import parameter_group

    model.eval()
    named = list(model.named_parameters())
    sums = dict.fromkeys((n for n, _ in named), 0.0)
    count = 0
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i:i + 1] for k, v in batch.items()}
        if not bool((row["labels"] != -100).any()):
            continue
        grads = torch.autograd.grad(model(**row).loss, [p for _, p in named], allow_unused=True)
        for (name, _), g in zip(named, grads, strict=True):
            if g is not None:
                sums[name] += float(torch.sum(g.double() ** 2))
        count += 1
    groups: dict[str, float] = {}
    for name, value in sums.items():
        group = parameter_group(name)
        groups[group] = groups.get(group, 0.0) + value / count
    return groups


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def main(reps: int = 5) -> None:
    import torch

    from toolkit.fisher import fisher_diagonal, fisher_traces

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    print(f"device {device}, {torch.get_num_threads()} threads, V={VOCAB}, T={LENGTH}, "
          f"{MASK_RATE:.0%} masked; time / plain forward+backward, as 'median/min': the median "
          f"over {reps} interleaved repetitions of the ratio to the same repetition's plain pass, "
          "and the ratio of the fastest runs (least disturbed by other jobs); naive timed once, against the plain pass just before it")
    print(f"{'shape':>5} {'B':>4} {'plain s':>8} {'traces':>11} {'diag':>11} {'batch':>11} "
          f"{'naive':>11}  relative difference to naive per group")
    for shape in SHAPES:
        model = make_model(shape, device)
        for n_seq in BATCHES:
            batch = make_batch(n_seq, device)

            def plain(model: Any = model, batch: dict[str, Any] = batch) -> None:
                model.zero_grad(set_to_none=True)
                model(**batch).loss.backward()
                model.zero_grad(set_to_none=True)

            cases: dict[str, Callable[[], Any]] = {
                "plain": plain,
                "traces": functools.partial(fisher_traces, model, [batch]),
                "diag": functools.partial(fisher_diagonal, model, [batch]),
                "batch": functools.partial(fisher_traces, model, [batch], "batch"),
            }
            model.eval()
            for fn in cases.values():  # warm-up (allocator, kernels)
                fn()
            # Paired: each repetition's times are divided by that repetition's plain pass, so a
            # load swing on this shared machine moves numerator and denominator together.
            times: dict[str, list[float]] = {k: [] for k in cases}
            for _ in range(reps):
                for key, fn in cases.items():
                    times[key].append(_timed(fn, sync))
            base = statistics.median(times["plain"])
            cols = {k: f"{statistics.median(t / p for t, p in zip(v, times['plain'], strict=True)):.2f}"
                       f"/{min(v) / min(times['plain']):.2f}" for k, v in times.items()}
            beside = _timed(plain, sync)  # the plain pass right before the one naive run
            t0 = time.perf_counter()
            reference = naive_traces(model, batch)
            sync()
            naive = time.perf_counter() - t0
            cols["naive"] = f"{naive / beside:.2f}/{naive / min(times['plain']):.2f}"
            fast = fisher_traces(model, [batch]).groups
            diffs = "  ".join(f"{g} {abs(fast[g] - r) / abs(r):.1e}" for g, r in reference.items())
            print(f"{shape:>5} {n_seq:>4} {base:8.3f} {cols['traces']:>11} {cols['diag']:>11} "
                  f"{cols['batch']:>11} {cols['naive']:>11}  {diffs}", flush=True)


if __name__ == "__main__":
    main()
