"""Study definitions: a TOML file in ``jobs/`` parsed into frozen, validated dataclasses.

A study file has these tables (every key optional unless marked)::

    [study]            name (required), seeds, data_seed, output_dir, description
    [corpora.NAME]     one table per corpus: source (required), kind, format, ...
    [runs.NAME]        one table per run: corpus, tokenizer (required), model overrides
    [model]            default model shape for every run (a run's [runs.X.model] wins)
    [training]         optimisation and budget (paper values by default)
    [analysis]         evaluation masks, Fisher, metric grids
    [dispatch]         executor, container, per-stage cluster resources

Unknown keys, wrong types and out-of-range values raise :class:`ConfigError` naming
the file, the dotted key and the allowed values. Relative data paths are resolved
against the study file's folder; ``output_dir`` against the current directory.
"""

from __future__ import annotations

import dataclasses
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from toolkit.errors import ConfigError

TOKENIZER_PATTERN = re.compile(r"^(char|kmer(?P<k>[1-9]\d*)(?P<overlap>-overlap)?|bpe(?P<v>[1-9]\d*))$")
N_SPECIALS = 5  # UNK, PAD, CLS, SEP, MASK
PAPER_TOP_P = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PAPER_TOPK = (1, 3, 5, 10, 20, 50, 100, 1000, 4000)
STAGES = ("prepare", "train", "evaluate", "analyse")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# --------------------------------------------------------------------------- corpora


@dataclass(frozen=True, kw_only=True)
class DnaConfig:
    """How DNA records are cleaned and cut into pieces (paper: 1-2,000 bp)."""

    piece_min: int = 1000
    """Shortest piece kept, in bases; shorter remainders are dropped."""
    piece_max: int = 2000
    """Longest piece, in bases. Pieces are cut deterministically (see corpora)."""
    n_run_split: int = 10
    """Records are split at runs of N longer than this; shorter runs stay as N."""
    keep_softmask: bool = False
    """Keep a per-base soft-mask flag (lowercase in the FASTA). Sequences are upper-cased either way."""


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """How text records are read and cleaned."""

    clean: bool = True
    """The paper's cleaning (non-breaking spaces, whitespace, odd characters)."""
    field: str = "text"
    """JSONL: the field holding the document."""
    documents: Literal["line", "blank-line"] = "line"
    """Plain text: one document per line, or documents separated by blank lines."""


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """An order-k Markov source whose transition matrices hit a target entropy rate."""

    alphabet: str = "ACGT"
    order: int = 2
    entropy_rate: float = 1.5
    """Target entropy rate in bits per symbol, in (0, log2 |alphabet|]."""
    records: int = 2000
    length: int = 1000
    """Symbols per record."""
    seed: int = 0


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    source: str
    """``builtin:NAME``, ``synthetic:markov``, ``shuffle:CORPUS`` or a file, folder or glob."""
    kind: Literal["auto", "dna", "text"] = "auto"
    format: Literal["auto", "fasta", "text", "jsonl", "json"] = "auto"
    max_records: int | None = None
    """Stop reading after this many records (after cutting DNA into pieces)."""
    train_records: int = 2_000_000
    eval_records: int = 10_000
    split: Literal["sequential", "random"] = "sequential"
    """``sequential``: first train_records train, next eval_records evaluation (paper)."""
    split_seed: int = 0
    dna: DnaConfig = field(default_factory=DnaConfig)
    text: TextConfig = field(default_factory=TextConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A named shape plus optional overrides of any of its fields."""

    shape: Literal["bert-base", "20M", "4M", "tiny", "no-transformer"] = "tiny"
    num_hidden_layers: int | None = None
    hidden_size: int | None = None
    num_attention_heads: int | None = None
    intermediate_size: int | None = None
    max_position_embeddings: int | None = None
    hidden_dropout_prob: float | None = None
    attention_probs_dropout_prob: float | None = None


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    corpus: str
    tokenizer: str
    """``char``, ``kmer<k>``, ``kmer<k>-overlap`` or ``bpe<V>`` (e.g. ``kmer6``, ``bpe4096``)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoints: tuple[str, ...] = ()
    """Local folders of existing HF BertForMaskedLM checkpoints used as members instead of training."""


# --------------------------------------------------------------------------- training


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Optimisation and budget; defaults are the paper's (METHODS.md)."""

    steps: int | None = None
    tokens: int | None = None
    epochs: float | None = None
    """Budget: at most one of steps, tokens (non-padding), epochs; none given means 5 epochs."""
    batch_size: int = 64
    grad_accum: int = 1
    seq_len: int = 512
    packing: bool = False
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    grad_clip: float = 0.5
    mlm_probability: float = 0.15
    precision: Literal["fp32", "bf16"] = "fp32"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    checkpoint_every_steps: int = 1000
    checkpoint_every_minutes: float = 30.0
    eval_every_steps: int = 1000
    eval_batches: int = 20
    log_every_steps: int = 50
    fisher_flow: tuple[float, ...] = (0.25, 0.5, 0.75)
    """Fractions of training at which weight snapshots are kept for the Fisher flow."""


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True, kw_only=True)
class AnalysisConfig:
    checkpoint: Literal["best", "final"] = "best"
    """Weights the per-member outputs are computed from (paper: best by evaluation loss)."""
    eval_records: int | None = None
    """Held-out records used for predictions (None: the whole evaluation split)."""
    seq_len: int | None = None
    """Evaluation sequence length (None: training.seq_len)."""
    distribution_mask_rate: float = 0.10
    fisher_mask_rate: float = 0.15
    mask_seed: int = 0
    batch_size: int = 32
    prediction_dtype: Literal["float16", "float32"] = "float16"
    fisher_estimators: tuple[Literal["batch", "per-example"], ...] = ("batch", "per-example")
    fisher_records: int = 512
    contextual_records: int = 256
    top_p: tuple[float, ...] = PAPER_TOP_P
    topk: tuple[int, ...] = PAPER_TOPK
    spearman_variant: Literal["symmetric", "authors"] = "symmetric"
    rbf_sigma: float | None = None
    """RBF CKA bandwidth as a fraction of the median distance (None: the median itself)."""
    bootstrap: int = 200
    confidence: float = 0.95
    entropy_orders: int = 4
    """Data-side profile: conditional entropy given up to this many previous tokens."""
    entropy_max_tokens: int = 20_000_000
    """Data-side profile: at most this many training tokens are counted."""


# --------------------------------------------------------------------------- dispatch


@dataclass(frozen=True, kw_only=True)
class ContainerConfig:
    runtime: Literal["none", "apptainer", "singularity"] = "none"
    image: str | None = None
    """Path of the SIF image (``make container`` builds ``containers/toolkit.sif``)."""
    binds: tuple[str, ...] = ()
    """Extra host paths to bind; the study folder and data folders are added automatically."""
    scratch: str | None = None
    """Host scratch folder for caches (HF_HOME, TORCH_HOME, MPLCONFIGDIR)."""


@dataclass(frozen=True, kw_only=True)
class ResourceConfig:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time_minutes: int = 60
    mem_gb: float | None = None
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    gpu_style: Literal["gpus-per-node", "gres"] = "gpus-per-node"
    array_parallelism: int = 64
    extra_sbatch: dict[str, str] = field(default_factory=dict)
    setup: tuple[str, ...] = ()
    """Shell lines run before the job (``module load ...``)."""


@dataclass(frozen=True, kw_only=True)
class DispatchConfig:
    executor: Literal["local", "slurm", "debug"] = "local"
    container: ContainerConfig = field(default_factory=ContainerConfig)
    resources: dict[str, ResourceConfig] = field(default_factory=dict)
    """Per stage (prepare, train, evaluate, analyse); missing stages use the defaults."""
    dask: Literal["local", "slurm"] = "local"
    max_parallel: int = 1
    """Local executor: units run at the same time."""

    def resources_for(self, stage: str) -> ResourceConfig:
        return self.resources.get(stage, ResourceConfig())


# --------------------------------------------------------------------------- study


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    name: str
    seeds: tuple[int, ...] = (1, 2, 3, 4, 5)
    """Initialisation seeds; one ensemble member per seed and run."""
    data_seed: int = 0
    """Fixes data order and training masks: identical for every member."""
    output_dir: str | None = None
    """Study folder (default: ``studies/<name>``, relative to the current directory)."""
    description: str = ""
    corpora: dict[str, CorpusConfig] = field(default_factory=dict)
    runs: dict[str, RunConfig] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    source_file: str | None = None
    """The TOML file this study came from (set by :func:`load_study`)."""

    @property
    def base_dir(self) -> Path:
        """Folder that relative corpus paths are resolved against."""
        return Path(self.source_file).resolve().parent if self.source_file else Path.cwd()

    def resolve_path(self, path: str) -> Path:
        """A data path from the study file, resolved against :attr:`base_dir`."""
        return (self.base_dir / Path(path).expanduser()).resolve()

    @property
    def root(self) -> Path:
        return Path(self.output_dir or f"studies/{self.name}").resolve()


# --------------------------------------------------------------------------- building


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}"
    if origin is dict:
        return f"a table of {_describe(typing.get_args(tp)[1])}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false",
            type(None): "absent"}.get(tp, str(tp))


def _convert(tp: Any, value: Any, key: str, where: str) -> Any:
    def bad() -> ConfigError:
        return ConfigError(f"{where}: '{key}' = {value!r} is not valid; expected {_describe(tp)}")

    origin = typing.get_origin(tp)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise bad()
        return value
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key, where)
            except ConfigError:
                continue
        raise bad()
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad()
        (item,) = typing.get_args(tp)[:1]
        return tuple(_convert(item, v, f"{key}[{i}]", where) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad()
        _, item = typing.get_args(tp)
        return {str(k): _convert(item, v, f"{key}.{k}", where) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise bad()
        return _build(tp, value, key, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise bad()
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad()
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad()
        return value
    raise bad()


def _build(cls: Any, data: dict[str, Any], prefix: str, where: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source_file"}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if key not in fields:
            raise ConfigError(
                f"{where}: unknown key '{dotted}'; allowed keys here: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _convert(hints[key], value, dotted, where)
    missing = [
        name for name, f in fields.items()
        if name not in kwargs and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        dotted = ", ".join(f"{prefix}.{m}" if prefix else m for m in missing)
        raise ConfigError(f"{where}: missing required key(s) {dotted}")
    return cls(**kwargs)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{dotted}': '{part}' is not a table")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``dotted.key=VALUE`` where VALUE is TOML (bare words are taken as strings)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key.path=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip(), value


def study_from_dict(raw: dict[str, Any], *, where: str, source_file: str | None = None) -> StudyConfig:
    """Build and validate a :class:`StudyConfig` from a parsed TOML document."""
    raw = dict(raw)
    header = raw.pop("study", None)
    if not isinstance(header, dict):
        raise ConfigError(f"{where}: missing [study] table with at least name = \"...\"")
    allowed = {"corpora", "runs", "model", "training", "analysis", "dispatch"}
    for key in raw:
        if key not in allowed:
            raise ConfigError(
                f"{where}: unknown table [{key}]; allowed: study, {', '.join(sorted(allowed))}"
            )
    # A run's [runs.X.model] overrides the study-wide [model] field by field.
    default_model = raw.get("model", {})
    runs = {}
    for name, run in (raw.get("runs") or {}).items():
        if isinstance(run, dict):
            run = dict(run)
            run["model"] = {**default_model, **run.get("model", {})}
        runs[name] = run
    merged = {**header, **{k: v for k, v in raw.items() if k != "runs"}, "runs": runs}
    for key in header:
        if key in allowed:
            raise ConfigError(f"{where}: '{key}' belongs in its own [{key}] table, not in [study]")
    study = _build(StudyConfig, merged, "", where)
    study = dataclasses.replace(study, source_file=source_file)
    validate_study(study, where)
    return study


def study_to_dict(study: StudyConfig) -> dict[str, Any]:
    """The inverse of :func:`study_from_dict`: a document that rebuilds the same study.

    The dispatcher saves it as ``<study root>/study.json`` so that every job sees
    exactly the configuration (overrides included) that was submitted.
    """
    flat = dataclasses.asdict(study)
    flat.pop("source_file")
    base = study.base_dir

    def absolute(p: str) -> str:
        return p if ":" in p.split("/", 1)[0] else str(base / Path(p).expanduser())

    for corpus in flat["corpora"].values():
        corpus["source"] = absolute(corpus["source"])
    for run in flat["runs"].values():
        run["checkpoints"] = [absolute(c) for c in run["checkpoints"]]
    header = {k: flat.pop(k) for k in ("name", "seeds", "data_seed", "output_dir", "description")}
    header["output_dir"] = str(study.root)

    def clean(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items() if v is not None}
        if isinstance(value, list | tuple):
            return [clean(v) for v in value]
        return value

    return clean({"study": header, **flat})


def load_study(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> StudyConfig:
    """Read, override and validate a study file.

    Parameters
    ----------
    path
        The TOML file (``jobs/demo.toml``), or a ``study.json`` written by
        :func:`study_to_dict` (relative data paths in it are already absolute).
    overrides
        ``dotted.key=value`` strings applied before validation, e.g.
        ``training.steps=10`` or ``study.seeds=[1,2]``.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ConfigError(f"{path}: study file not found") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read study file ({e})") from e
    try:
        if path.suffix == ".json":
            import json

            raw = json.loads(text)
        else:
            raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, ValueError) as e:
        raise ConfigError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from e
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(raw, key, value)
    return study_from_dict(raw, where=str(path), source_file=str(path.resolve()))


def tokenizer_vocab_size(spec: str) -> int:
    """Vocabulary size (specials included) implied by a tokenizer name, before training."""
    m = TOKENIZER_PATTERN.match(spec)
    if not m:
        raise ConfigError(f"unknown tokenizer '{spec}'; use char, kmer<k>, kmer<k>-overlap or bpe<V>")
    if m.group("v"):
        return int(m.group("v"))
    if m.group("k"):
        return 4 ** int(m.group("k")) + 5 + N_SPECIALS
    return -1  # char: depends on the corpus


def validate_study(study: StudyConfig, where: str) -> None:
    """Cross-field checks that single fields cannot express."""

    def err(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    if not _NAME.match(study.name):
        raise err(f"study.name '{study.name}' may only use letters, digits, '.', '_' and '-'")
    if not study.seeds or len(set(study.seeds)) != len(study.seeds):
        raise err("study.seeds must be a non-empty list of distinct integers")
    if not study.corpora:
        raise err("no corpora: add a [corpora.NAME] table with source = \"...\"")
    if not study.runs:
        raise err("no runs: add a [runs.NAME] table with corpus and tokenizer")
    for name, corpus in study.corpora.items():
        if not _NAME.match(name):
            raise err(f"corpora.{name}: names may only use letters, digits, '.', '_' and '-'")
        if corpus.source.startswith("shuffle:"):
            target = corpus.source.split(":", 1)[1]
            if target not in study.corpora or target == name:
                raise err(f"corpora.{name}.source: '{corpus.source}' must name another corpus "
                          f"of this study ({', '.join(sorted(study.corpora))})")
        if corpus.dna.piece_min < 1 or corpus.dna.piece_max < corpus.dna.piece_min:
            raise err(f"corpora.{name}.dna: need 1 <= piece_min <= piece_max")
        if corpus.train_records < 1 or corpus.eval_records < 1:
            raise err(f"corpora.{name}: train_records and eval_records must be at least 1")
        syn = corpus.synthetic
        if corpus.source == "synthetic:markov":
            import math

            if len(set(syn.alphabet)) != len(syn.alphabet) or len(syn.alphabet) < 2:
                raise err(f"corpora.{name}.synthetic.alphabet needs at least 2 distinct symbols")
            if not 0 < syn.entropy_rate <= math.log2(len(syn.alphabet)) + 1e-9:
                raise err(f"corpora.{name}.synthetic.entropy_rate must be in (0, "
                          f"{math.log2(len(syn.alphabet)):.3f}] bits for this alphabet")
    for name, run in study.runs.items():
        if "/" in name or not _NAME.match(name):
            raise err(f"runs.{name}: names may only use letters, digits, '.', '_' and '-'")
        if run.corpus not in study.corpora:
            raise err(f"runs.{name}.corpus: '{run.corpus}' is not one of the study's corpora "
                      f"({', '.join(sorted(study.corpora))})")
        m = TOKENIZER_PATTERN.match(run.tokenizer)
        if not m:
            raise err(f"runs.{name}.tokenizer: '{run.tokenizer}' is not valid; "
                      "use char, kmer<k> (e.g. kmer6), kmer<k>-overlap or bpe<V> (e.g. bpe4096)")
        if m.group("v") and int(m.group("v")) <= N_SPECIALS:
            raise err(f"runs.{name}.tokenizer: vocabulary {m.group('v')} is not larger than the "
                      f"{N_SPECIALS} special tokens; use e.g. bpe4096")
        if run.checkpoints and len(run.checkpoints) < len(study.seeds):
            raise err(f"runs.{name}.checkpoints: {len(run.checkpoints)} checkpoint folders for "
                      f"{len(study.seeds)} seeds; give one folder per seed or fewer seeds")
    t = study.training
    budgets = [b for b in (t.steps, t.tokens, t.epochs) if b is not None]
    if len(budgets) > 1:
        raise err("training: give at most one of steps, tokens, epochs")
    if any(b <= 0 for b in budgets):
        raise err("training: the budget must be positive")
    if t.batch_size < 1 or t.grad_accum < 1 or t.seq_len < 8:
        raise err("training: batch_size and grad_accum must be >= 1 and seq_len >= 8")
    if not 0 < t.mlm_probability < 1 or not 0 <= t.warmup_ratio < 1:
        raise err("training: mlm_probability must be in (0, 1) and warmup_ratio in [0, 1)")
    if any(not 0 < f < 1 for f in t.fisher_flow):
        raise err("training.fisher_flow: fractions must be in (0, 1)")
    a = study.analysis
    for key in ("distribution_mask_rate", "fisher_mask_rate"):
        if not 0 < getattr(a, key) < 1:
            raise err(f"analysis.{key} must be in (0, 1)")
    if any(not 0 < p <= 1 for p in a.top_p):
        raise err("analysis.top_p values must be in (0, 1]")
    if any(k < 1 for k in a.topk):
        raise err("analysis.topk values must be >= 1")
    for stage in study.dispatch.resources:
        if stage not in STAGES:
            raise err(f"dispatch.resources.{stage}: unknown stage; allowed: {', '.join(STAGES)}")
    c = study.dispatch.container
    if c.runtime != "none" and not c.image:
        raise err("dispatch.container.image is required when runtime is "
                  f"'{c.runtime}' (build one with `make container`)")
