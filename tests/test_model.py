"""The member model: shapes, seeded construction, masked-only logits, loading."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from toolkit.config import ModelConfig
from toolkit.errors import CheckpointError, ConfigError
from toolkit.model import (
    SHAPES,
    bert_config,
    build_model,
    load_model,
    masked_logits,
    n_parameters,
    pick_device,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SMALL = ModelConfig(shape="tiny", hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)


def bert_parameter_count(V: int, d: int, L: int, f: int, P: int, types: int) -> int:
    """Parameters of a tied BertForMaskedLM, counted by hand from the architecture."""
    embeddings = V * d + P * d + types * d + 2 * d  # word, position, type, LayerNorm
    layer = (4 * (d * d + d)      # Q, K, V, attention output
             + 2 * d               # attention LayerNorm
             + d * f + f + f * d + d  # FFN
             + 2 * d)              # output LayerNorm
    head = d * d + d + 2 * d + V  # transform dense + LayerNorm, decoder bias (weight tied)
    return embeddings + L * layer + head


@pytest.mark.parametrize("shape", list(SHAPES))
def test_shapes_parameter_counts(shape: str) -> None:
    cfg = bert_config(ModelConfig(shape=shape), 4096)
    s = SHAPES[shape]
    expected = bert_parameter_count(4096, s["hidden_size"], s["num_hidden_layers"],
                                    s["intermediate_size"], s["max_position_embeddings"], 1)
    from transformers import BertForMaskedLM

    with torch.device("meta"):  # count without allocating bert-base
        model = BertForMaskedLM(cfg)
    assert n_parameters(model) == expected
    if shape == "bert-base":
        assert 88e6 < expected < 90e6  # the paper's "about 89M parameters at V=4096"
    assert cfg.num_hidden_layers == s["num_hidden_layers"]
    assert cfg.tie_word_embeddings and cfg.pad_token_id == 0 and cfg.type_vocab_size == 1
    assert cfg.hidden_dropout_prob == 0.1 and cfg.attention_probs_dropout_prob == 0.1
    assert cfg._attn_implementation == "sdpa"


def test_overrides_and_positions() -> None:
    cfg = bert_config(ModelConfig(shape="4M", hidden_size=64, hidden_dropout_prob=0.0), 100,
                      max_positions=1024)
    assert cfg.hidden_size == 64 and cfg.num_hidden_layers == 4 and cfg.hidden_dropout_prob == 0.0
    assert cfg.max_position_embeddings == 1024  # enlarged to the sequence length
    assert bert_config(ModelConfig(shape="tiny"), 100, 128).max_position_embeddings == 512
    with pytest.raises(ConfigError, match="max_position_embeddings"):
        bert_config(ModelConfig(shape="tiny", max_position_embeddings=64), 100, 128)
    with pytest.raises(ConfigError, match="num_attention_heads"):
        bert_config(ModelConfig(shape="tiny", num_attention_heads=3), 100)


def test_build_model_depends_on_seed_only() -> None:
    before = torch.get_rng_state()
    a = build_model(SMALL, 100, seed=1).state_dict()
    torch.manual_seed(12345)  # the caller's RNG state must not matter
    b = build_model(SMALL, 100, seed=1).state_dict()
    c = build_model(SMALL, 100, seed=2).state_dict()
    torch.manual_seed(0)
    torch.set_rng_state(before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["bert.embeddings.word_embeddings.weight"],
                           c["bert.embeddings.word_embeddings.weight"])
    # the caller's generator is untouched by building
    state = torch.get_rng_state()
    build_model(SMALL, 100, seed=3)
    assert torch.equal(state, torch.get_rng_state())


def test_tied_embeddings_and_padding_row() -> None:
    model = build_model(SMALL, 100, seed=4)
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    assert torch.count_nonzero(model.bert.embeddings.word_embeddings.weight[0]) == 0


@pytest.mark.parametrize("cfg", [SMALL, ModelConfig(shape="no-transformer", hidden_size=48,
                                                      num_attention_heads=4, intermediate_size=96)],
                         ids=["tiny", "no-transformer"])
def test_masked_logits_match_full_forward(cfg: ModelConfig) -> None:
    model = build_model(cfg, 100, seed=5).eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (4, 24), generator=gen)
    att = torch.ones_like(ids)
    att[1, 15:] = 0
    att[3, 7:] = 0
    ids[att == 0] = 0
    positions = (torch.rand(ids.shape, generator=gen) < 0.3) & att.bool()
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=att).logits  # (B, T, V)
        ours = masked_logits(model, ids, att, positions)         # (M, V)
    assert ours.shape == (int(positions.sum()), 100)
    torch.testing.assert_close(ours, full[positions], rtol=1e-5, atol=1e-5)
    # gradients flow through the masked-only head to the tied embeddings
    model.train()
    masked_logits(model, ids, att, positions).logsumexp(-1).sum().backward()
    assert model.bert.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_load_model_roundtrip(tmp_path: Path) -> None:
    model = build_model(SMALL, 100, seed=6)
    folder = tmp_path / "a model"
    model.save_pretrained(folder)
    loaded = load_model(folder)
    assert not loaded.training
    ref = model.state_dict()
    assert all(torch.equal(ref[k], v) for k, v in loaded.state_dict().items())
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    with pytest.raises(CheckpointError, match="config.json missing"):
        load_model(tmp_path / "nowhere")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="broken"):
        load_model(broken)
    # a BERT trunk without the MLM head would load with a random head: refused
    from transformers import BertModel

    BertModel(bert_config(SMALL, 100)).save_pretrained(tmp_path / "trunk")
    with pytest.raises(CheckpointError, match="trunk.*cls.predictions"):
        load_model(tmp_path / "trunk")
    other = tmp_path / "gpt"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "gpt2"}')
    with pytest.raises(CheckpointError, match="'gpt2' checkpoint as a masked LM"):
        load_model(other)


def test_pick_device() -> None:
    assert pick_device("cpu").type == "cpu"
    assert pick_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="training.device"):
            pick_device("cuda")
    with pytest.raises(ConfigError, match="unknown"):
        pick_device("tpu")
