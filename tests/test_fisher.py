"""Empirical Fisher: both estimators against naive float64 references on tiny random BERTs.

The references use only the HF forward (full MLM head, its own loss) and autograd: the
per-example one runs one backward per sequence, the batch one squares each batch's
gradient. Batches carry padding, a sequence without a masked token, repeated tokens and
(in one batch) token types, so every scatter and skip in the fast path is exercised.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch

from tests.conftest import (
    BERT_VOCAB,
    IGNORE,
    masked_batches,
    naive_batch,
    naive_per_example,
    per_example_grads,
    tiny_bert,
)
from toolkit.errors import ConfigError, InputError
from toolkit.fisher import (
    FisherTraces,
    empirical_fisher,
    fisher_diagonal,
    fisher_traces,
    parameter_group,
)


def assert_traces_match(got: FisherTraces, want: dict[str, torch.Tensor], rtol: float) -> None:
    """Per parameter and per group; structural zeros (e.g. attention key biases: softmax
    ignores them) are rounding noise in both, so they get an absolute bound instead."""
    traces = {n: float(w.sum()) for n, w in want.items()}
    scale = max(traces.values())
    assert list(got.parameters) == list(want)
    for name, value in traces.items():
        if value > 1e-12 * scale:
            assert got.parameters[name] == pytest.approx(value, rel=rtol), name
        else:
            assert abs(got.parameters[name]) <= 1e-10 * scale, name
    for group, value in got.groups.items():
        want_group = sum(v for n, v in traces.items() if parameter_group(n) == group)
        assert value == pytest.approx(want_group, rel=rtol), group


def assert_diagonals_match(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor],
                           rtol: float) -> None:
    scale = max(float(w.max()) for w in want.values())
    assert list(got) == list(want)
    for name, w in want.items():
        assert got[name].shape == w.shape and got[name].dtype == w.dtype, name
        torch.testing.assert_close(got[name], w, rtol=rtol, atol=1e-12 * scale, msg=name)


@pytest.fixture(scope="module")
def batches() -> list[dict[str, torch.Tensor]]:
    return masked_batches()


# With 16 tokens per sequence the encoder's Linear layers take the per-sequence bmm path
# at hidden 16 and the Gram trick at hidden 32 and 64; the head always uses the Gram trick.
MODELS: dict[str, dict[str, Any]] = {
    "tied-16": {"hidden": 16},
    "untied-32": {"hidden": 32, "tied": False},
    "tied-64": {"hidden": 64},
    "no-layers": {"layers": 0},
    "no-layers-untied": {"layers": 0, "tied": False},
}


@pytest.mark.parametrize("shape", list(MODELS))
def test_per_example_matches_naive_loop(shape: str, batches: list[dict[str, torch.Tensor]]) -> None:
    model = tiny_bert(**MODELS[shape])
    want = naive_per_example(model, batches)
    traces = fisher_traces(model, batches)
    assert_traces_match(traces, want, rtol=1e-4)
    assert_diagonals_match(fisher_diagonal(model, batches), want, rtol=1e-4)
    masked = [int((b["labels"] != IGNORE).sum()) for b in batches]
    with_mask = [int(((b["labels"] != IGNORE).sum(1) > 0).sum()) for b in batches]
    assert traces.n_masked_tokens == sum(masked)
    assert traces.n_examples == sum(with_mask) == sum(b["input_ids"].shape[0] for b in batches) - 2
    assert all(v > 0 for v in traces.groups.values())


@pytest.mark.parametrize("chunk", [1, 600])
def test_weight_gradient_chunks(chunk: int, batches: list[dict[str, torch.Tensor]],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The per-sequence bmm path in chunks of one sequence (accumulated with addcmul) and of
    a few (with a remainder): hidden 16 takes that path in the encoder."""
    import toolkit.fisher as fisher

    monkeypatch.setattr(fisher, "_CHUNK_ELEMENTS_CPU", chunk)
    model = tiny_bert(**MODELS["tied-16"])
    want = naive_per_example(model, batches)
    assert_traces_match(fisher_traces(model, batches), want, rtol=1e-4)
    assert_diagonals_match(fisher_diagonal(model, batches), want, rtol=1e-4)


@pytest.mark.parametrize("loop", [True, False])
def test_head_rows_per_sequence_and_padded_agree(loop: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both layouts of the head's (M, f) rows: one sequence at a time (the CPU's) and padded
    to (B, W, f) for bmm (the GPU's), here both on the CPU. Most tokens masked, so the
    per-sequence path meets row blocks above and below the Gram-trick threshold."""
    import toolkit.fisher as fisher

    monkeypatch.setattr(fisher, "_ROW_LOOP_DEVICES", ("cpu",) if loop else ())
    batch = masked_batches(seed=5)[0]
    gen = torch.Generator().manual_seed(9)
    dense = (torch.rand(batch["labels"].shape, generator=gen) < 0.8) & batch["attention_mask"].bool()
    dense[2] = False  # still one sequence without a masked token
    dense[0, 0] = True
    batch = {**batch, "labels": torch.where(dense, batch["input_ids"].clamp(min=5), IGNORE)}
    for shape in ("tied-16", "untied-32"):
        model = tiny_bert(**MODELS[shape])
        want = naive_per_example(model, [batch])
        assert_traces_match(fisher_traces(model, [batch]), want, rtol=1e-4)
        assert_diagonals_match(fisher_diagonal(model, [batch]), want, rtol=1e-4)


@pytest.mark.parametrize("shape", ["tied-16", "untied-32", "no-layers"])
def test_batch_estimator_is_the_papers(shape: str, batches: list[dict[str, torch.Tensor]]) -> None:
    model = tiny_bert(**MODELS[shape])
    want = naive_batch(model, batches)
    assert_traces_match(fisher_traces(model, batches, "batch"), want, rtol=1e-9)
    assert_diagonals_match(fisher_diagonal(model, batches, "batch"), want, rtol=1e-9)


def test_tied_word_embedding_squares_input_and_decoder_gradients_together(
        batches: list[dict[str, torch.Tensor]]) -> None:
    tied = tiny_bert(tied=True)
    untied = tiny_bert(tied=False, seed=7)
    with torch.no_grad():  # the same function, with the decoder weight as its own tensor
        for name, p in tied.named_parameters():
            untied.get_parameter(name).copy_(p)
        untied.cls.predictions.decoder.weight.copy_(tied.bert.embeddings.word_embeddings.weight)
        untied.cls.predictions.decoder.bias.copy_(tied.cls.predictions.bias)
    b = batches[0]
    torch.testing.assert_close(untied.eval()(**b).logits, tied.eval()(**b).logits)

    word, decoder = "bert.embeddings.word_embeddings.weight", "cls.predictions.decoder.weight"
    grads = per_example_grads(untied, batches)
    inside = torch.stack([(g[word] + g[decoder]) ** 2 for g in grads]).mean(0)
    outside = torch.stack([g[word] ** 2 + g[decoder] ** 2 for g in grads]).mean(0)
    got = fisher_diagonal(tied, batches)[word]
    torch.testing.assert_close(got, inside, rtol=1e-8, atol=1e-14)
    assert float((got - outside).abs().max()) > 1e-3 * float(outside.max())  # cross term matters
    untied_traces = fisher_traces(untied, batches).parameters
    assert fisher_traces(tied, batches).parameters[word] > 2 * untied_traces[word]
    assert parameter_group(decoder) == "head"


def test_groups_and_public_signatures(batches: list[dict[str, torch.Tensor]]) -> None:
    model = tiny_bert()
    traces = fisher_traces(model, batches)
    assert list(traces.groups) == ["embeddings", "layer.0", "layer.1", "head"]
    assert empirical_fisher(model, batches) == traces.groups
    assert sum(traces.fractions().values()) == pytest.approx(1.0)
    assert traces.parameter_groups["bert.embeddings.LayerNorm.weight"] == "embeddings"
    assert traces.parameter_groups["bert.encoder.layer.1.output.dense.bias"] == "layer.1"
    assert traces.parameter_groups["cls.predictions.bias"] == "head"
    assert traces.parameter_groups["cls.predictions.transform.LayerNorm.bias"] == "head"
    assert list(fisher_traces(tiny_bert(layers=0), batches).groups) == ["embeddings", "head"]
    sig = inspect.signature(empirical_fisher)
    assert list(sig.parameters) == ["model", "batches", "estimator"]
    assert sig.parameters["estimator"].default == "per-example"
    assert list(inspect.signature(fisher_traces).parameters) == ["model", "batches", "estimator", "device",
                                                                 "diagonal"]
    with pytest.raises(InputError, match="pooler.dense.weight"):
        parameter_group("bert.pooler.dense.weight")


def test_model_left_as_found(batches: list[dict[str, torch.Tensor]]) -> None:
    model = tiny_bert()
    model.train()
    model.bert.embeddings.position_embeddings.weight.requires_grad_(False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    first = fisher_traces(model, batches)
    fisher_diagonal(model, batches)
    fisher_traces(model, batches, "batch")
    assert model.training
    assert all(m.training for m in model.modules())
    for name, p in model.named_parameters():
        assert p.grad is None, name
        assert p.requires_grad == (name != "bert.embeddings.position_embeddings.weight"), name
        assert torch.equal(p, before[name]), name
    # dropout is off while estimating: the same numbers again, although the model trains
    assert fisher_traces(model, batches).parameters == first.parameters
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    model.eval()
    model.cls.train()  # mixed modes come back as they were
    with torch.inference_mode():  # a caller's inference mode, inference-mode batches
        frozen = [{k: v.clone() for k, v in b.items()} for b in batches]
        again = fisher_traces(model, frozen)
    assert again.parameters == first.parameters
    assert not model.training and not model.bert.training and model.cls.predictions.training


def test_float32_agrees_with_float64(batches: list[dict[str, torch.Tensor]]) -> None:
    model = tiny_bert(hidden=64)
    want = fisher_traces(model, batches)
    got = fisher_traces(model.float(), batches)
    for group, value in want.groups.items():
        assert got.groups[group] == pytest.approx(value, rel=1e-4), group


def test_bad_input_raises_one_line_errors(batches: list[dict[str, torch.Tensor]]) -> None:
    model = tiny_bert(layers=1)
    good = batches[1]
    cases: list[tuple[Any, str]] = [
        ([{k: v for k, v in good.items() if k != "labels"}], "batch 0: missing labels"),
        ([good, {**good, "attention_mask": good["attention_mask"][:, :-1]}], "batch 1: attention_mask"),
        ([{**good, "labels": torch.full_like(good["labels"], IGNORE)}], "no masked token"),
        ([{**good, "labels": good["labels"].masked_fill(good["labels"] != IGNORE, BERT_VOCAB)}], "labels"),
        ([{**good, "input_ids": good["input_ids"] + BERT_VOCAB}], "input_ids outside"),
        ([good["input_ids"]], "expected a dict"),
    ]
    for bad, message in cases:
        with pytest.raises(InputError, match=message):
            fisher_traces(model, bad)
        assert not any(m._forward_hooks for m in model.modules())
    with pytest.raises(ConfigError, match="estimators: per-example, batch"):
        fisher_traces(model, [good], "exact")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="needs a transformers masked LM.*got Linear"):
        fisher_traces(torch.nn.Linear(3, 3), [good])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu(batches: list[dict[str, torch.Tensor]]) -> None:
    model = tiny_bert(hidden=64)
    want = fisher_traces(model, batches)
    got = fisher_traces(model, batches, device="cuda")
    assert next(model.parameters()).device.type == "cpu"  # moved back
    for group, value in want.groups.items():
        assert got.groups[group] == pytest.approx(value, rel=1e-6), group
    diag = fisher_diagonal(model.cuda(), [{k: v.cuda() for k, v in b.items()} for b in batches])
    ref = fisher_diagonal(model.cpu(), batches)
    for name, tensor in ref.items():
        torch.testing.assert_close(diag[name].cpu(), tensor, rtol=1e-6, atol=1e-12)
