"""The BERT masked language model every ensemble member is: shapes, seeded construction, loading.

Every member is a HuggingFace ``BertForMaskedLM`` with SDPA attention, tied input and
output embeddings, ``pad_token_id = 0`` and dropout 0.1. ``type_vocab_size`` is 1: the
toolkit never feeds sentence pairs, so a single (always-zero) token type keeps the
"embeddings" Fisher group free of an unused second row.

Parameter counts at vocabulary 4096 (tied embeddings counted once; measured with
``sum(p.numel() for p in model.parameters())``)::

    bert-base        89,191,936  (12 x 768, FFN 3072; the paper's "about 89M")
    20M              21,542,912  (6 x 512, FFN 2048)
    4M                4,409,856  (4 x 256, FFN 1024)
    tiny              1,007,616  (2 x 128, FFN 512)
    no-transformer    4,137,472  (0 layers at 768: embeddings + MLM head only)

``num_hidden_layers = 0`` is accepted by HuggingFace as is: the encoder is an empty
``ModuleList`` and the embeddings feed the MLM head directly.

Adopted external checkpoints (``runs.X.checkpoints``) may be any ``AutoModelForMaskedLM``
(RoBERTa, ESM / Nucleotide Transformer, ...): :func:`load_model` loads them from local
files, and :func:`masked_logits`, :func:`last_hidden` (and :func:`toolkit.checkpoint.model_positions`) work on
the generic base model and MLM head instead of BERT's ``.bert`` / ``.cls``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from toolkit.checkpoint import verify_export
from toolkit.config import SHAPES, ModelConfig
from toolkit.errors import CheckpointError, ConfigError
from toolkit.sequences import PAD

if TYPE_CHECKING:
    import torch
    from transformers import BertConfig, BertForMaskedLM

log = logging.getLogger(__name__)

_COMMON: dict[str, Any] = {
    "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1,
    "type_vocab_size": 1,
    "pad_token_id": PAD,
    "tie_word_embeddings": True,
    "hidden_act": "gelu",
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-12,
}


def bert_config(model_cfg: ModelConfig, vocab_size: int, max_positions: int | None = None) -> BertConfig:
    """The ``BertConfig`` of a model shape.

    Parameters
    ----------
    model_cfg
        Named shape plus overrides; every field that is not None wins over the shape.
    vocab_size
        Vocabulary size including the special tokens (the token store's ``vocab_size``).
    max_positions
        Longest sequence the model must accept (``training.seq_len``). The shape's
        position table is enlarged to it when shorter; an explicit
        ``max_position_embeddings`` override below it is a :class:`ConfigError`.
    """
    from transformers import BertConfig

    if model_cfg.shape not in SHAPES:
        raise ConfigError(f"model.shape '{model_cfg.shape}' is unknown; shapes: {', '.join(SHAPES)}")
    if vocab_size <= PAD + 5:
        raise ConfigError(f"vocabulary size {vocab_size} leaves no room beside the 5 special tokens")
    fields = {**_COMMON, **SHAPES[model_cfg.shape]}
    for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "intermediate_size",
                 "max_position_embeddings", "hidden_dropout_prob", "attention_probs_dropout_prob"):
        value = getattr(model_cfg, name)
        if value is not None:
            fields[name] = value
    if max_positions is not None and fields["max_position_embeddings"] < max_positions:
        if model_cfg.max_position_embeddings is not None:
            raise ConfigError(f"model.max_position_embeddings = {model_cfg.max_position_embeddings} is "
                              f"shorter than training.seq_len = {max_positions}; raise it or drop it")
        fields["max_position_embeddings"] = max_positions
    if fields["hidden_size"] % fields["num_attention_heads"]:
        raise ConfigError(f"model: hidden_size {fields['hidden_size']} is not a multiple of "
                          f"num_attention_heads {fields['num_attention_heads']}")
    if fields["num_hidden_layers"] < 0 or fields["hidden_size"] < 1 or fields["intermediate_size"] < 1:
        raise ConfigError("model: num_hidden_layers must be >= 0, hidden_size and intermediate_size >= 1")
    fields["attn_implementation"] = "sdpa"
    return BertConfig(vocab_size=vocab_size, **fields)


def build_model(model_cfg: ModelConfig, vocab_size: int, seed: int,
                max_positions: int | None = None) -> BertForMaskedLM:
    """A freshly initialised model whose weights depend on ``seed`` alone.

    The initialisation draws from a forked torch RNG seeded with ``seed``, so the
    caller's global RNG state is untouched and two members differ only in ``seed``.
    """
    import torch
    from transformers import BertForMaskedLM

    cfg = bert_config(model_cfg, vocab_size, max_positions)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForMaskedLM(cfg)
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> Any:
    """Load a HuggingFace ``save_pretrained`` folder in eval mode.

    BERT (the toolkit's members) loads as ``BertForMaskedLM`` with SDPA from safetensors;
    any other ``model_type`` (an adopted external checkpoint: RoBERTa, ESM, ...) through
    ``AutoModelForMaskedLM``, local files only.

    Raises
    ------
    CheckpointError
        The folder is missing or does not hold a masked-LM checkpoint.
    """
    from transformers import BertForMaskedLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one bar per checkpoint load drowns the progress lines

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no model checkpoint here (config.json missing); "
                              "give a folder written by save_pretrained")
    try:
        model_type = json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise CheckpointError(f"{path}: config.json is not readable JSON ({e})") from e
    if model_type != "bert":
        return _load_other(path, model_type, device)
    from safetensors import SafetensorError

    from toolkit.store import study_ref

    verified = verify_export(path)  # the toolkit's own exports: a damaged file is named, not parsed
    try:
        loaded: Any = BertForMaskedLM.from_pretrained(str(path), attn_implementation="sdpa",
                                                      use_safetensors=True, output_loading_info=True)
        model, info = loaded
    except SafetensorError as e:
        # Collapsed to one line: the CLI prints one line per error.
        why = " ".join(str(e).split())[:300]
        what = (f"rerun training for this member: toolkit run {study_ref(path)} --force train"
                if verified
                else "copy the checkpoint again or give another one")
        raise CheckpointError(f"{path / 'model.safetensors'}: truncated or corrupt safetensors "
                              f"file ({why}); {what}") from e
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: cannot load as BertForMaskedLM ({e})") from e
    # The tied decoder weight may be listed as missing; any other gap means random weights.
    missing = [k for k in info.get("missing_keys", ()) if k != "cls.predictions.decoder.weight"]
    if missing or info.get("mismatched_keys"):
        raise CheckpointError(f"{path}: weights missing or of the wrong shape for BertForMaskedLM "
                              f"({(missing or info['mismatched_keys'])[:3]}); is it a masked-LM checkpoint?")
    return model.to(device).eval()


def _load_other(path: Path, model_type: Any, device: str | torch.device) -> Any:
    """Any other ``AutoModelForMaskedLM`` checkpoint (RoBERTa, ESM, ...), local files only."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never the model hub
    from transformers import AutoModelForMaskedLM

    try:
        loaded: Any = AutoModelForMaskedLM.from_pretrained(str(path), local_files_only=True,
                                                           output_loading_info=True)
        model, info = loaded
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as e:
        why = " ".join(str(e).split())[:300]
        raise CheckpointError(f"{path}: cannot load this '{model_type}' checkpoint as a masked LM "
                              f"(AutoModelForMaskedLM: {why}); give a save_pretrained folder of a "
                              "masked-LM model") from e
    missing = list(info.get("missing_keys", ()))
    if missing or info.get("mismatched_keys"):
        raise CheckpointError(f"{path}: weights missing or of the wrong shape for "
                              f"{type(model).__name__} ({(missing or list(info['mismatched_keys']))[:3]}); "
                              "is it a masked-LM checkpoint?")
    return model.to(device).eval()


# Architectures whose MLM forward is exactly ``head(base_model(...)[0])``, the head being the
# model's one child beside its base model (BertForMaskedLM .bert/.cls, RobertaForMaskedLM
# and EsmForMaskedLM .roberta|.esm/.lm_head). Others run their whole forward.
_BASE_THEN_HEAD = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "esm"})


def mlm_head(model: Any) -> Any:
    """The module that maps the base model's hidden states to MLM logits, or None.

    None when the architecture is not known to apply exactly ``head(hidden)`` (then
    :func:`masked_logits` runs the model's own forward).
    """
    if getattr(model.config, "model_type", None) not in _BASE_THEN_HEAD:
        return None
    base = model.base_model
    others = [m for _, m in model.named_children() if m is not base]
    return others[0] if len(others) == 1 else None


def last_hidden(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T, d) last-layer states of the base model (the input of its MLM head)."""
    return model.base_model(input_ids=input_ids, attention_mask=attention_mask)[0]


def masked_logits(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """MLM logits at the masked positions only, for any HuggingFace masked LM.

    The trunk runs once over the whole batch; the MLM head (transform + V-wide
    decoder, a large share of the matmul work at small hidden sizes) runs only on the
    selected rows, instead of allocating an (B, T, V) tensor of which ~15% is used.
    Architectures without a known base + head split (:func:`mlm_head`) run their whole
    forward and the masked rows are selected from its (B, T, V) logits.

    Parameters
    ----------
    input_ids, attention_mask
        (B, T) integer tensors.
    positions
        (B, T) boolean tensor, True where a prediction is wanted.

    Returns
    -------
    torch.Tensor
        (M, V) logits, rows in row-major order of ``positions`` (M = positions.sum()).
    """
    head = mlm_head(model)
    if head is None:
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[positions]  # (M, V)
    hidden = last_hidden(model, input_ids, attention_mask)  # (B, T, d)
    picked = hidden[positions]  # (M, d)
    return head(picked)  # (M, V)


def pick_device(preference: str = "auto") -> torch.device:
    """The device to run on: ``auto`` takes CUDA when available, else the CPU.

    ``cuda`` without a usable GPU is a :class:`ConfigError` (asking for a GPU and
    silently training for days on the CPU is worse than stopping).
    """
    import torch

    if preference == "cpu":
        return torch.device("cpu")
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if preference == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("training.device = 'cuda' but no CUDA GPU is visible; "
                              "use device = 'auto' or 'cpu', or run on a GPU node")
        return torch.device("cuda")
    raise ConfigError(f"device '{preference}' is unknown; use auto, cpu or cuda")


def n_parameters(model: Any) -> int:
    """Trainable parameters, tied weights counted once."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
