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
import math
import os
import re
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from toolkit.errors import ConfigError
from toolkit.tokenizers.spec import CHECKPOINT_TOKENIZER, TOKENIZER_PATTERN, vocabulary_problem

PAPER_TOP_P = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
PAPER_TOPK = (1, 3, 5, 10, 20, 50, 100, 1000, 4000)
STAGES = ("prepare", "train", "evaluate", "measure", "analyse")
"""The stages in order; ``measure`` units (one per run and measure family) are the analysis
shards that the ``analyse`` unit reduces into the summary."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\x85\u2028\u2029]")
"""Characters refused in values that end up in job scripts: a newline there starts a new
shell line or ``#SBATCH`` directive (C0 controls, DEL, NEL and the Unicode line breaks)."""
_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9-]*$")
"""An sbatch long option name without its ``--`` (``constraint``, ``mail-type``)."""
_FISHER_GROUP = re.compile(r"^(embeddings|head|layer\.(0|[1-9][0-9]*))$")  # toolkit.fisher's groups


@dataclass(frozen=True)
class Range:
    """Allowed values of a numeric field (each item, for a list field)."""

    ge: float | None = None
    """Inclusive lower bound (None: unbounded below)."""
    gt: float | None = None
    """Exclusive lower bound (None: unbounded below)."""
    le: float | None = None
    """Inclusive upper bound (None: unbounded above)."""
    lt: float | None = None
    """Exclusive upper bound (None: unbounded above)."""

    def __contains__(self, value: float) -> bool:
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        lo = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        hi = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if lo and hi:
            return f"in {lo}, {hi}"
        if lo:
            return f"{'>=' if lo[0] == '[' else '>'} {lo[1:]}"
        if hi:
            return f"{'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
        return "any value"


def _f(default: Any = dataclasses.MISSING, *, factory: Any = dataclasses.MISSING,
       ge: float | None = None, gt: float | None = None, le: float | None = None,
       lt: float | None = None, plain: bool | Literal["shell"] = False, nonempty: bool = False,
       distinct: bool = False) -> Any:
    """A dataclass field with the checks :func:`validate_study` applies to it.

    ``ge``/``gt``/``le``/``lt`` bound a number (each item of a list; None passes);
    ``plain`` refuses control characters (values that reach job scripts; ``"shell"``:
    tabs allowed);
    ``nonempty`` and ``distinct`` apply to lists.
    """
    meta: dict[str, Any] = {}
    if any(b is not None for b in (ge, gt, le, lt)):
        meta["range"] = Range(ge=ge, gt=gt, le=le, lt=lt)
    if plain:
        meta["plain"] = plain
    if nonempty:
        meta["nonempty"] = True
    if distinct:
        meta["distinct"] = True
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------- corpora


@dataclass(frozen=True, kw_only=True)
class DnaConfig:
    """How DNA records are cleaned and cut into pieces (``corpora.NAME.dna``; paper: 1-2,000 bp)."""

    piece_min: int = _f(1000, ge=1)
    """Shortest piece, in bases (>= 1); a segment's shorter remainder is dropped. Default 1,000
    (docs/methods.md: 1,000-2,000 bases); jobs/paper.toml sets 1."""
    piece_max: int = _f(2000, ge=1)
    """Longest piece, in bases (>= piece_min); lengths are drawn uniformly in [piece_min, piece_max],
    seeded by a hash of (record id, segment), see toolkit.corpora. Default: the paper's 2,000."""
    n_run_split: int = _f(10, ge=0)
    """Records are split at runs of N longer than this many bases (>= 0); shorter runs stay as N.
    Toolkit choice (jobs/paper.toml keeps it)."""
    keep_softmask: bool = False
    """Keep a per-base soft-mask flag (lowercase in the FASTA); sequences are upper-cased either way.
    Off by default (a toolkit option)."""


@dataclass(frozen=True, kw_only=True)
class TextConfig:
    """How text records are read and cleaned (``corpora.NAME.text``)."""

    clean: bool = True
    """The paper's cleaning (Unicode spaces to spaces, odd characters removed, whitespace runs
    collapsed; toolkit.corpora.text.clean_text). Documents empty after it are skipped."""
    field: str = "text"
    """JSONL / JSON objects: the (non-empty) field holding the document. Builtins that name their own
    field use theirs."""
    documents: Literal["line", "blank-line"] = "line"
    """Plain text: one document per line, or documents separated by blank lines."""


@dataclass(frozen=True, kw_only=True)
class SyntheticConfig:
    """An order-k Markov source whose transition matrices hit a target entropy rate
    (``corpora.NAME.synthetic``, read when ``source = "synthetic:markov"``; defaults are toolkit choices)."""

    alphabet: str = "ACGT"
    """Symbols of the source: at least 2 distinct characters, no control characters. Only ACGTN
    symbols make a DNA corpus, anything else a text corpus."""
    order: int = _f(2, ge=0)
    """Markov order k (>= 0): symbols of context; |alphabet|^(k+1) <= 20,000,000."""
    entropy_rate: float = 1.5
    """Target entropy rate in bits per symbol, in (0, log2 |alphabet|]; the transition rows are
    tempered until the exact rate matches it to 1e-9."""
    records: int = _f(2000, ge=1)
    """Records generated (>= 1)."""
    length: int = _f(1000, ge=1)
    """Symbols per record (>= 1)."""
    seed: int = _f(0, ge=0)
    """Seed of the transition matrices and of the generated records (>= 0)."""


@dataclass(frozen=True, kw_only=True)
class CorpusConfig:
    """One ``[corpora.NAME]`` table: where the records come from and how they are split."""

    source: str = _f(plain=True)
    """``builtin:NAME``, ``synthetic:markov``, ``shuffle:CORPUS`` or a file, folder or glob
    (no control characters). A folder holds only corpus files (FASTA, text, JSON(L), each
    optionally gzipped); the study's own output folder inside it is never read."""
    kind: Literal["auto", "dna", "text"] = "auto"
    """``dna`` or ``text`` records; ``auto`` decides from the files (FASTA means DNA; FASTA and text
    files mixed are an error)."""
    format: Literal["auto", "fasta", "text", "jsonl", "json"] = "auto"
    """File format; ``auto`` decides from each file name (``.gz`` ignored; FASTA suffixes, ``.jsonl``,
    ``.json``, anything else text)."""
    max_records: int | None = _f(None, ge=1)
    """Stop reading after this many records (>= 1; counted after cutting DNA into pieces; None: read
    everything)."""
    train_records: int = _f(2_000_000, ge=1)
    """Records in the training split (>= 1); default: the paper's 2,000,000. A smaller corpus keeps
    min(eval_records, n // 2) for evaluation and gives training the rest (a warning)."""
    eval_records: int = _f(10_000, ge=1)
    """Records in the evaluation split (>= 1); default: the paper's 10,000."""
    split: Literal["sequential", "random"] = "sequential"
    """``sequential``: first train_records train, next eval_records evaluation (paper, docs/methods.md);
    ``random``: the same counts on a permutation seeded by split_seed."""
    split_seed: int = _f(0, ge=0)
    """Seed of the ``random`` split and of ``shuffle:`` permutations (>= 0)."""
    tokenizer_train_records: int | None = _f(20_000, ge=1)
    """BPE tokenizers train on at most this many training records, evenly spaced over the
    split (>= 1; None: all). Training holds about 60 bytes per symbol (measured on DNA), so
    the default keeps it near 2-3 GB for 1-2 kb pieces or Wikipedia articles; the rest is
    only encoded, streaming. Fewer records change the rarer merges: a third of the demo's
    3,000 records keeps 80% (Wikipedia) and 83% (A. thaliana) of the vocabulary and costs
    0.9% / 0.7% in symbols per token; a tenth keeps 66% / 62% and costs 4.9% / 2.9%."""
    dna: DnaConfig = field(default_factory=DnaConfig)
    """``[corpora.NAME.dna]``: cleaning and cutting of DNA records (:class:`DnaConfig`)."""
    text: TextConfig = field(default_factory=TextConfig)
    """``[corpora.NAME.text]``: reading and cleaning of text records (:class:`TextConfig`)."""
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    """``[corpora.NAME.synthetic]``: the ``synthetic:markov`` source (:class:`SyntheticConfig`)."""


# --------------------------------------------------------------------------- model


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A named shape plus optional overrides of any of its fields (None: the shape's value).

    The effective shape (named shape plus overrides) must have hidden_size divisible by
    num_attention_heads; see :data:`SHAPES` for the named shapes.
    """

    shape: Literal["bert-base", "20M", "4M", "tiny", "no-transformer"] = "tiny"
    """Named BERT shape (:data:`SHAPES`). Default ``tiny`` (2 x 128, about 1 M parameters):
    a toolkit choice for quick runs; the paper's is ``bert-base`` (12 x 768, 89 M)."""
    num_hidden_layers: int | None = _f(None, ge=0)
    """Transformer blocks (>= 0; 0 = embeddings and MLM head only)."""
    hidden_size: int | None = _f(None, ge=1)
    """Width of the embeddings and blocks (>= 1, a multiple of num_attention_heads)."""
    num_attention_heads: int | None = _f(None, ge=1)
    """Attention heads per block (>= 1, dividing hidden_size)."""
    intermediate_size: int | None = _f(None, ge=1)
    """Width of the feed-forward layer (>= 1)."""
    max_position_embeddings: int | None = _f(None, ge=1)
    """Position table length, in tokens (>= training.seq_len and analysis.seq_len; shapes: 512;
    None: the shape's, enlarged to training.seq_len as needed)."""
    hidden_dropout_prob: float | None = _f(None, ge=0, lt=1)
    """Dropout probability of embeddings and blocks, in [0, 1) (shapes: 0.1, BERT's)."""
    attention_probs_dropout_prob: float | None = _f(None, ge=0, lt=1)
    """Dropout probability of attention weights, in [0, 1) (shapes: 0.1, BERT's)."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    """One ``[runs.NAME]`` table: a corpus, a tokenizer and a model shape, trained once per seed."""

    corpus: str
    """Name of one of the study's corpora."""
    tokenizer: str
    """``char``, ``kmer<k>``, ``kmer<k>-overlap`` or ``bpe<V>`` (e.g. ``kmer6``, ``bpe4096``), or
    ``checkpoint``: the tokenizer saved with the run's ``checkpoints`` (they must all share
    it; such a run only adopts, it cannot train)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """``[runs.NAME.model]``: overrides of the study-wide ``[model]``, key by key (:class:`ModelConfig`)."""
    checkpoints: tuple[str, ...] = _f((), plain=True)
    """Local folders of existing HuggingFace masked-LM checkpoints (any ``AutoModelForMaskedLM``:
    BERT, RoBERTa, ESM, ...; ``save_pretrained`` layout) used as members instead of training,
    one per seed. Non-BERT checkpoints need ``tokenizer = "checkpoint"``."""


# --------------------------------------------------------------------------- training


@dataclass(frozen=True, kw_only=True)
class TrainingConfig:
    """Optimisation and budget (``[training]``); the optimisation defaults are the paper's
    (docs/methods.md), the cadences of checkpoints, evaluations and logs are toolkit choices."""

    steps: int | None = _f(None, ge=1)
    """Budget in optimiser steps (>= 1)."""
    tokens: int | None = _f(None, ge=1)
    """Budget in non-padding training tokens, [CLS]/[SEP] included (>= 1); converted to steps with
    the mean tokens per training sequence."""
    epochs: float | None = _f(None, gt=0)
    """Budget: at most one of steps, tokens (non-padding), epochs (> 0); none given means 5 epochs,
    the paper's."""
    batch_size: int = _f(64, ge=1)
    """Sequences per micro-batch (>= 1); 64 as in jobs/paper.toml."""
    grad_accum: int = _f(1, ge=1)
    """Micro-batches per optimiser step (>= 1); the step's loss is token-weighted over all of them."""
    seq_len: int = _f(512, ge=8)
    """Training sequence length in tokens, specials included (>= 8); 512 as in jobs/paper.toml.
    Without packing a record is cut to seq_len - 2 tokens."""
    packing: bool = False
    """Pack several records into one sequence instead of one record per sequence (paper: no packing)."""
    lr: float = _f(1e-4, gt=0)
    """Peak learning rate of AdamW (> 0; betas 0.9/0.999, eps 1e-8); default: the paper's 1e-4."""
    weight_decay: float = _f(0.0, ge=0)
    """AdamW weight decay (>= 0) of weight matrices (not biases or LayerNorm); paper: 0."""
    warmup_ratio: float = _f(0.1, ge=0, lt=1)
    """Fraction of the steps spent warming the learning rate up linearly, in [0, 1); paper: 0.1."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after the warm-up (HuggingFace's formulas); paper: cosine."""
    grad_clip: float = _f(0.5, ge=0)
    """Gradient clipping threshold on the global L2 norm (>= 0; 0 turns clipping off); paper: 0.5."""
    mlm_probability: float = _f(0.15, gt=0, lt=1)
    """Fraction of non-special tokens selected for the MLM loss, in (0, 1), then 80/10/10
    mask/random/keep; paper: 0.15."""
    precision: Literal["fp32", "bf16"] = "fp32"
    """Autocast precision of the training forward pass (bf16 on CUDA only, else fp32); paper: fp32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Device of training and evaluation; ``auto`` takes a CUDA GPU when one is visible, ``cuda``
    without one is an error. Changing it makes no unit stale."""
    checkpoint_every_steps: int = _f(1000, ge=1)
    """Save a resumable checkpoint every this many steps (>= 1; toolkit choice)."""
    checkpoint_every_minutes: float = _f(30.0, gt=0)
    """... and at least every this many minutes of wall time (> 0; toolkit choice)."""
    eval_every_steps: int = _f(1000, ge=1)
    """Evaluation loss every this many steps (>= 1; toolkit choice); the ``best`` checkpoint is chosen
    among these evaluations."""
    eval_batches: int = _f(20, ge=1)
    """Batches (of batch_size sequences) of the evaluation split per evaluation, the same masked
    batches every time (>= 1; toolkit choice)."""
    log_every_steps: int = _f(50, ge=1)
    """A progress log line (and live-curve point) every this many steps (>= 1; toolkit choice)."""
    tensorboard: bool = False
    """Also write the curves as TensorBoard event files in ``members/<run>/seed<N>/tensorboard/``
    (needs ``pip install 'toolkit[tensorboard]'``; toolkit choice: off)."""
    fisher_flow: tuple[float, ...] = _f((0.25, 0.5, 0.75), gt=0, lt=1)
    """Fractions of training, each in (0, 1), at which weight snapshots are kept for the Fisher
    flow (a toolkit addition; steps rounded, repeats dropped)."""


# --------------------------------------------------------------------------- analysis


@dataclass(frozen=True, kw_only=True)
class AnalysisConfig:
    """``[analysis]``: evaluation masks, Fisher and metric settings (docs/methods.md)."""

    checkpoint: Literal["best", "final"] = "best"
    """Weights the per-member outputs are computed from (paper: best by evaluation loss)."""
    eval_records: int | None = _f(None, ge=1)
    """Held-out records the evaluation masks are built from, the first of the evaluation split
    (>= 1; None: the whole split)."""
    seq_len: int | None = _f(None, ge=3)
    """Evaluation sequence length in tokens (>= 3, at most the model's positions; None: training.seq_len)."""
    distribution_mask_rate: float = _f(0.10, gt=0, lt=1)
    """Fraction of each evaluation sequence's maskable tokens masked for the output distributions,
    in (0, 1) (at least one per sequence); paper: 0.10."""
    fisher_mask_rate: float = _f(0.15, gt=0, lt=1)
    """Fraction of tokens masked for the Fisher information, in (0, 1); paper: 0.15."""
    mask_seed: int = _f(0, ge=0)
    """Seed of the evaluation masks, shared by every member (>= 0)."""
    batch_size: int = _f(32, ge=1)
    """Sequences per evaluation batch (>= 1; toolkit choice). Also the batch of the ``batch`` Fisher
    estimator, so it changes that estimate."""
    prediction_dtype: Literal["float16", "float32"] = "float32"
    """Storage precision of the stored log-probabilities; float16 halves the disk but ties most
    neighbouring probabilities, which moves top-p JS distances (up to 10% at p = 0.2)."""
    fisher_estimators: tuple[Literal["batch", "per-example"], ...] = _f(
        ("batch", "per-example"), nonempty=True, distinct=True)
    """Empirical Fisher estimators computed (non-empty, no repeats): ``batch`` is the paper's,
    ``per-example`` a toolkit addition."""
    fisher_records: int = _f(512, ge=1)
    """Evaluation records (the first ones) the Fisher information is estimated on (>= 1; toolkit choice)."""
    fisher_diagonal: Literal["all", "none"] | tuple[str, ...] = _f("all", nonempty=True, distinct=True)
    """Full Fisher diagonals stored: "all", "none", or a list of groups ("embeddings", "layer.<i>", "head");
    a toolkit addition, about 0.36 GB per snapshot and estimator for bert-base (docs/methods.md)."""
    contextual_records: int = _f(256, ge=1)
    """Evaluation records (the first ones, unmasked) the contextual embeddings are taken from
    (>= 1; toolkit choice)."""
    top_p: tuple[float, ...] = _f(PAPER_TOP_P, gt=0, le=1, nonempty=True, distinct=True)
    """Top-p truncations of the JS distance, each in (0, 1] (non-empty, no repeats); default: the
    paper's 0.05, 0.1, 0.2, ..., 1.0."""
    topk: tuple[int, ...] = _f(PAPER_TOPK, ge=1, nonempty=True, distinct=True)
    """Neighbour counts k of the embedding metrics, each >= 1 (non-empty, no repeats; NaN where
    k >= V); default: the paper's 1, 3, 5, 10, 20, 50, 100, 1000, 4000."""
    spearman_variant: Literal["symmetric", "authors"] = "symmetric"
    """Local Spearman: symmetric in the two members, or the authors' one-sided variant (their code;
    ``definitions`` leaves it alone)."""
    definitions: Literal["toolkit", "authors"] = "toolkit"
    """Default of top_p_rule, spread_ddof and kl_headline: the toolkit's or the authors' exact code."""
    top_p_rule: Literal["reach", "authors"] | None = None
    """JS top-p truncation: smallest prefix reaching p, or the authors' float32 rule (None: definitions)."""
    spread_ddof: int | None = _f(None, ge=0, le=1)
    """Degrees of freedom of every reported std over members/pairs, 0 or 1 (None: definitions)."""
    kl_headline: Literal["model_to_uniform", "uniform_to_model"] | None = None
    """KL direction shown first in tables: KL(P || U) or KL(U || P) (None: definitions)."""
    rbf_sigma: float | None = _f(None, gt=0)
    """RBF CKA bandwidth as a multiple of the median distance between rows (> 0; None: the median itself)."""
    bootstrap: int = _f(200, ge=1)
    """Bootstrap resamples of every confidence interval (>= 1; toolkit choice)."""
    confidence: float = _f(0.95, gt=0, lt=1)
    """Level of the percentile bootstrap confidence intervals, in (0, 1)."""
    entropy_orders: int = _f(4, ge=1)
    """Data-side profile: conditional entropy given up to this many previous tokens (>= 1; toolkit
    choice, as ``toolkit corpus-stats --orders``)."""
    entropy_max_tokens: int = _f(20_000_000, ge=1)
    """Data-side profile: at most this many training tokens are counted, whole records first (>= 1;
    toolkit choice); the entropy rate uses at most 2 M of them."""


# --------------------------------------------------------------------------- dispatch


@dataclass(frozen=True, kw_only=True)
class ContainerConfig:
    """``[dispatch.container]``: the Apptainer/Singularity image every job runs in (or none)."""

    runtime: Literal["none", "apptainer", "singularity"] = "none"
    """Container runtime of every job (``none``: the host's Python)."""
    image: str | None = _f(None, plain=True)
    """Path of the SIF image (``make container`` builds ``containers/toolkit.sif``; no control characters)."""
    binds: tuple[str, ...] = _f((), plain=True)
    """Extra host paths to bind (no control characters); the study folder, corpus source folders,
    external checkpoint folders and scratch are added automatically."""
    scratch: str | None = _f(None, plain=True)
    """Host scratch folder for caches (HF_HOME, TORCH_HOME, MPLCONFIGDIR; no control characters;
    None: the job's private /tmp, lost with it)."""


@dataclass(frozen=True, kw_only=True)
class ResourceConfig:
    """``[dispatch.resources.STAGE]``: what one job (one unit) of a stage asks SLURM for; defaults
    are toolkit choices."""

    partition: str | None = _f(None, plain=True)
    """SLURM partition (None: the cluster default; no control characters)."""
    account: str | None = _f(None, plain=True)
    """SLURM account (None: none given; no control characters)."""
    qos: str | None = _f(None, plain=True)
    """SLURM quality of service (None: none given; no control characters)."""
    time_minutes: int = _f(60, ge=1)
    """Wall-time limit per job, in minutes (>= 1); also the local executor's timeout per unit."""
    mem_gb: float | None = _f(None, gt=0)
    """Memory per job in GB of 1024 MB (> 0; None: the cluster default, no ``--mem``)."""
    cpus_per_task: int = _f(1, ge=1)
    """CPU cores per job (>= 1); also the torch threads of a train or evaluate unit, any executor."""
    gpus_per_node: int = _f(0, ge=0)
    """GPUs per job (>= 0); > 0 also adds ``--nv`` to the container command."""
    gpu_style: Literal["gpus-per-node", "gres"] = "gpus-per-node"
    """How GPUs are requested: ``--gpus-per-node=N`` or ``--gres=gpu:N``."""
    array_parallelism: int = _f(64, ge=1)
    """Array tasks of this stage running at the same time (>= 1)."""
    extra_sbatch: dict[str, str] = _f(factory=dict, plain=True)
    """More ``#SBATCH --KEY=VALUE`` lines: keys are option names (letters, digits, '-'), no control characters."""
    setup: tuple[str, ...] = _f((), plain="shell")
    """Shell lines run before the job (``module load ...``), one line each: no newlines or
    control characters other than tabs."""


@dataclass(frozen=True, kw_only=True)
class DispatchConfig:
    """``[dispatch]``: where and how units run."""

    executor: Literal["local", "slurm", "debug"] = "local"
    """Where units run: this machine, SLURM, or in-process one by one (debug); ``toolkit run
    --executor`` overrides it."""
    container: ContainerConfig = field(default_factory=ContainerConfig)
    """``[dispatch.container]``: the image jobs run in (:class:`ContainerConfig`)."""
    resources: dict[str, ResourceConfig] = field(default_factory=dict)
    """Per stage (prepare, train, evaluate, measure, analyse; see STAGES); missing stages use the
    defaults of :class:`ResourceConfig`."""
    dask: Literal["local", "slurm"] = "local"
    """Where the analysis' Dask workers run: the analysing process' threads, or SLURM worker jobs
    with ``resources.analyse`` (needs the ``cluster`` extra)."""
    max_parallel: int = _f(1, ge=1)
    """Local executor: units run at the same time (>= 1)."""

    def resources_for(self, stage: str) -> ResourceConfig:
        return self.resources.get(stage, ResourceConfig())


# --------------------------------------------------------------------------- study


@dataclass(frozen=True, kw_only=True)
class StudyConfig:
    """A whole study file: the ``[study]`` keys and every other table."""

    name: str
    """Letters, digits, '.', '_' and '-'."""
    seeds: tuple[int, ...] = _f((1, 2, 3, 4, 5), ge=0, nonempty=True, distinct=True)
    """Initialisation seeds (>= 0, distinct, at least one); one ensemble member per seed and run.
    Default: five, the paper's ensemble size."""
    data_seed: int = _f(0, ge=0)
    """Fixes data order, training masks and the dropout stream: identical for every member (>= 0)."""
    output_dir: str | None = _f(None, plain=True)
    """Study folder (default: ``studies/<name>``, relative to the current directory; no control characters)."""
    description: str = ""
    """Free text shown in the report."""
    corpora: dict[str, CorpusConfig] = field(default_factory=dict)
    """``[corpora.NAME]`` tables, at least one (:class:`CorpusConfig`)."""
    runs: dict[str, RunConfig] = field(default_factory=dict)
    """``[runs.NAME]`` tables, at least one (:class:`RunConfig`); each run's model is merged from
    ``[model]`` and its own ``[runs.NAME.model]``."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """``[model]``: the default shape of every run (:class:`ModelConfig`)."""
    training: TrainingConfig = field(default_factory=TrainingConfig)
    """``[training]``: optimisation and budget of every trained member (:class:`TrainingConfig`)."""
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    """``[analysis]``: evaluation masks, Fisher and metrics (:class:`AnalysisConfig`)."""
    dispatch: DispatchConfig = field(default_factory=DispatchConfig)
    """``[dispatch]``: executor, container and per-stage resources (:class:`DispatchConfig`)."""
    source_file: str | None = None
    """The TOML file this study came from (set by :func:`load_study`)."""

    @property
    def base_dir(self) -> Path:
        """Folder that relative corpus paths are resolved against."""
        return _resolve(Path(self.source_file)).parent if self.source_file else Path.cwd()

    def resolve_path(self, path: str) -> Path:
        """A data path from the study file, resolved against :attr:`base_dir`."""
        return _resolve(self.base_dir / Path(path).expanduser())

    @property
    def eval_seq_len(self) -> int:
        """The evaluation sequence length: ``analysis.seq_len``, else ``training.seq_len``."""
        return self.analysis.seq_len or self.training.seq_len

    @property
    def root(self) -> Path:
        """The study folder, absolute."""
        return _resolve(Path(self.output_dir or f"studies/{self.name}"))


def _resolve(path: Path) -> Path:
    """``path.resolve()``, or the absolute path where symlinks loop.

    Python 3.11 raises RuntimeError on a symlink loop; the absolute path lets the
    caller's open or mkdir fail with ELOOP, which it reports as a user error.
    """
    try:
        return path.resolve()
    except (RuntimeError, OSError):
        return Path(os.path.abspath(path))


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
        item = typing.get_args(tp)[1]
        return "a table of tables" if dataclasses.is_dataclass(item) else f"a table of {_describe(item)}"
    if dataclasses.is_dataclass(tp):
        return "a table"
    return {int: "an integer", float: "a finite number", str: "a string", bool: "true or false",
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
        # NaN and infinity pass every "<" test and then break training or the report
        # much later: no field of a study means anything by them.
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
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


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, where: str = "--set") -> None:
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"{where}: override key '{dotted}' has an empty part; "
                          "write it as table.key=value, e.g. training.steps=10")
    node = data
    for i, part in enumerate(parts[:-1]):
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: override '{dotted}': '{'.'.join(parts[:i + 1])}' is "
                              f"{node!r}, not a table; override it whole or fix the study file")
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
    # A run's [runs.X.model] overrides the study-wide [model] field by field. The merge
    # needs tables; anything else is reported by key here (`--set model=3`), not by
    # a TypeError from the merge.
    default_model = raw.get("model", {})
    if not isinstance(default_model, dict):
        raise ConfigError(f"{where}: 'model' = {default_model!r} is not valid; expected a table "
                          "(e.g. [model] shape = \"tiny\")")
    raw_runs = raw.get("runs") or {}
    if not isinstance(raw_runs, dict):
        raise ConfigError(f"{where}: 'runs' = {raw_runs!r} is not valid; expected a table of tables "
                          "([runs.NAME] with corpus and tokenizer)")
    runs = {}
    for name, run in raw_runs.items():
        if isinstance(run, dict):
            run = dict(run)
            run_model = run.get("model", {})
            if not isinstance(run_model, dict):
                raise ConfigError(f"{where}: 'runs.{name}.model' = {run_model!r} is not valid; "
                                  "expected a table")
            run["model"] = {**default_model, **run_model}
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
    header = {k: flat.pop(k) for k in _HEADER}
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
        _set_dotted(raw, key, value, str(path))
    return study_from_dict(raw, where=str(path), source_file=str(path.resolve()))


_HEADER = ("name", "seeds", "data_seed", "output_dir", "description")


def check_plain(value: str, key: str, where: str, *, tabs: bool = False) -> None:
    """Refuse control characters (newlines above all) in a value that reaches job scripts.

    ``tabs`` lets tabs through (shell lines, where a tab is only a blank).

    Raises
    ------
    ConfigError
        Naming ``where``, the dotted ``key`` and the offending character.
    """
    m = _CONTROL.search(value.replace("\t", " ") if tabs else value)
    if m:
        raise ConfigError(f"{where}: {key} = {value!r} holds the control character "
                          f"{m.group()!r} at position {m.start() + 1}; this value is written into "
                          "job scripts: remove newlines and other control characters")


def _check_fields(obj: Any, prefix: str, where: str) -> None:
    """The per-field checks declared with :func:`_f`, recursively, in field order.

    The study-wide ``[model]`` is checked before ``[runs]``: every run's model is
    merged from it, and an error should name the key the user wrote.
    """
    fields = sorted(dataclasses.fields(obj), key=lambda f: f.name == "runs")
    for f in fields:
        if f.name == "source_file":
            continue
        value = getattr(obj, f.name)
        key = f"{prefix}.{f.name}" if prefix else f.name
        if isinstance(obj, StudyConfig) and f.name in _HEADER:
            key = f"study.{f.name}"  # a StudyConfig field the file writes in [study]
        meta = f.metadata
        is_list = isinstance(value, tuple)
        items = list(value) if is_list else [] if value is None else [value]
        if meta.get("nonempty") and not items:
            raise ConfigError(f"{where}: {key} is empty; give at least one value")
        if meta.get("distinct") and len(set(items)) != len(items):
            dup = next(v for i, v in enumerate(items) if v in items[:i])
            raise ConfigError(f"{where}: {key} = {list(items)!r} repeats {dup!r}; give each value once")
        rng = meta.get("range")
        if rng is not None:
            for i, v in enumerate(items):
                if v not in rng:
                    item_key = f"{key}[{i}]" if is_list else key
                    raise ConfigError(f"{where}: {item_key} = {v!r} is out of range; allowed: "
                                      f"{'each value ' if is_list else ''}{rng}; fix it in the study "
                                      f"file or with --set {key}=...")
        if meta.get("plain"):
            if isinstance(value, dict):
                for k, v in value.items():
                    if not _OPTION.match(k):
                        raise ConfigError(f"{where}: {key}: {k!r} is not an sbatch option name; use "
                                          "letters, digits and '-' only, without the leading '--' "
                                          "(e.g. constraint = \"a100\")")
                    check_plain(v, f"{key}.{k}", where)
            else:
                for i, v in enumerate(items):
                    check_plain(v, f"{key}[{i}]" if is_list else key, where,
                                tabs=meta["plain"] == "shell")
        if dataclasses.is_dataclass(value):
            _check_fields(value, key, where)
        elif isinstance(value, dict):
            for k, v in value.items():
                if dataclasses.is_dataclass(v):
                    _check_fields(v, f"{key}.{k}", where)


SHAPES: dict[str, dict[str, Any]] = {
    "bert-base": {"num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                  "intermediate_size": 3072, "max_position_embeddings": 512},
    "20M": {"num_hidden_layers": 6, "hidden_size": 512, "num_attention_heads": 8,
            "intermediate_size": 2048, "max_position_embeddings": 512},
    "4M": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
           "intermediate_size": 1024, "max_position_embeddings": 512},
    "tiny": {"num_hidden_layers": 2, "hidden_size": 128, "num_attention_heads": 2,
             "intermediate_size": 512, "max_position_embeddings": 512},
    "no-transformer": {"num_hidden_layers": 0, "hidden_size": 768, "num_attention_heads": 12,
                       "intermediate_size": 3072, "max_position_embeddings": 512},
}
"""BertConfig fields of every named shape; non-None ModelConfig fields override them."""

def effective_shape(model: ModelConfig) -> dict[str, Any]:
    """The named shape with the non-None overrides of ``model`` applied (no torch needed)."""
    out = dict(SHAPES[model.shape])
    for name in out:
        value = getattr(model, name, None)
        if value is not None:
            out[name] = value
    return out


def _check_model(model: ModelConfig, key: str, t_len: int, a_len: int, where: str) -> None:
    """Cross-field checks of a model's effective shape against the sequence lengths: the
    training one ``t_len`` and the evaluation one ``a_len``."""
    shape = effective_shape(model)
    heads, hidden = shape["num_attention_heads"], shape["hidden_size"]
    if hidden % heads:
        near = min((d for d in range(1, hidden + 1) if hidden % d == 0), key=lambda d: abs(d - heads))
        raise ConfigError(f"{where}: {key}: hidden_size {hidden} (shape '{model.shape}' with "
                          f"overrides) is not a multiple of num_attention_heads {heads}; set "
                          f"{key}.num_attention_heads to a divisor of {hidden} (e.g. {near})")
    if model.max_position_embeddings is not None:
        positions = model.max_position_embeddings
        if positions < t_len:
            raise ConfigError(f"{where}: {key}.max_position_embeddings = {positions} is shorter than "
                              f"training.seq_len = {t_len}; raise it to at least {t_len} or drop it")
    else:
        positions = max(shape["max_position_embeddings"], t_len)
    if a_len > positions:
        raise ConfigError(f"{where}: analysis.seq_len = {a_len} is longer than the "
                          f"{positions} positions of {key}; use at most {positions} "
                          "(or raise model.max_position_embeddings)")


def validate_study(study: StudyConfig, where: str) -> None:
    """Every check that a field's type cannot express: ranges, lists, cross-field rules.

    Anything that would make a later stage crash is refused here, before any work,
    with one line naming ``where`` (the study file), the dotted key, the bad value
    and the allowed values.
    """

    def err(msg: str) -> ConfigError:
        return ConfigError(f"{where}: {msg}")

    if not _NAME.match(study.name):
        raise err(f"study.name '{study.name}' may only use letters, digits, '.', '_' and '-'")
    if not study.seeds:
        raise err("study.seeds must be a non-empty list of distinct integers >= 0")
    if not study.corpora:
        raise err("no corpora: add a [corpora.NAME] table with source = \"...\"")
    if not study.runs:
        raise err("no runs: add a [runs.NAME] table with corpus and tokenizer")
    _check_fields(study, "", where)
    diag = study.analysis.fisher_diagonal
    if isinstance(diag, tuple):
        for i, group in enumerate(diag):
            if not _FISHER_GROUP.match(group):
                raise err(f"analysis.fisher_diagonal[{i}] = {group!r} is not a Fisher group; give "
                          "\"all\", \"none\" or a list of \"embeddings\", \"layer.<i>\", \"head\"")
    for name, corpus in study.corpora.items():
        if not _NAME.match(name):
            raise err(f"corpora.{name}: names may only use letters, digits, '.', '_' and '-'")
        if not corpus.source.strip():
            raise err(f"corpora.{name}.source is empty; give builtin:NAME, synthetic:markov, "
                      "shuffle:CORPUS or a file, folder or glob")
        if corpus.source.startswith("shuffle:"):
            target = corpus.source.split(":", 1)[1]
            if target not in study.corpora or target == name:
                raise err(f"corpora.{name}.source: '{corpus.source}' must name another corpus "
                          f"of this study ({', '.join(sorted(study.corpora))})")
        if corpus.dna.piece_max < corpus.dna.piece_min:
            raise err(f"corpora.{name}.dna.piece_max = {corpus.dna.piece_max} is below "
                      f"piece_min = {corpus.dna.piece_min}; need 1 <= piece_min <= piece_max")
        if not corpus.text.field:
            raise err(f"corpora.{name}.text.field is empty; name the JSON field holding the document")
        syn = corpus.synthetic
        if corpus.source == "synthetic:markov":
            if len(set(syn.alphabet)) != len(syn.alphabet) or len(syn.alphabet) < 2:
                raise err(f"corpora.{name}.synthetic.alphabet = {syn.alphabet!r} needs at least 2 "
                          "distinct symbols, each once")
            check_plain(syn.alphabet, f"corpora.{name}.synthetic.alphabet", where)
            if not 0 < syn.entropy_rate <= math.log2(len(syn.alphabet)) + 1e-9:
                raise err(f"corpora.{name}.synthetic.entropy_rate = {syn.entropy_rate} must be in (0, "
                          f"{math.log2(len(syn.alphabet)):.3f}] bits for this alphabet")
            if len(syn.alphabet) ** (syn.order + 1) > 20_000_000:
                raise err(f"corpora.{name}.synthetic.order = {syn.order} gives "
                          f"{len(syn.alphabet)}^{syn.order + 1} transition probabilities, more than "
                          "20,000,000; lower synthetic.order")
    _check_model(study.model, "model", study.training.seq_len, study.eval_seq_len, where)
    for name, run in study.runs.items():
        if "/" in name or not _NAME.match(name):
            raise err(f"runs.{name}: names may only use letters, digits, '.', '_' and '-'")
        if run.corpus not in study.corpora:
            raise err(f"runs.{name}.corpus: '{run.corpus}' is not one of the study's corpora "
                      f"({', '.join(sorted(study.corpora))})")
        if run.tokenizer == CHECKPOINT_TOKENIZER:
            if not run.checkpoints:
                raise err(f"runs.{name}.tokenizer = 'checkpoint' needs runs.{name}.checkpoints (one "
                          "folder per seed): a run with a checkpoint's tokenizer adopts those "
                          "models and cannot be trained; give checkpoints or a tokenizer such as kmer6")
            m = None
        else:
            m = TOKENIZER_PATTERN.match(run.tokenizer)
            if not m:
                raise err(f"runs.{name}.tokenizer: '{run.tokenizer}' is not valid; use char, kmer<k> "
                          "(e.g. kmer6), kmer<k>-overlap, bpe<V> (e.g. bpe4096) or checkpoint")
        problem = vocabulary_problem(run.tokenizer) if m is not None else None
        if problem:
            raise err(f"runs.{name}.tokenizer: '{run.tokenizer}': {problem}")
        if m is not None and m.group("k") and _corpus_kind(study.corpora, run.corpus) == "text":
            raise err(f"runs.{name}.tokenizer: '{run.tokenizer}' needs DNA but corpus "
                      f"'{run.corpus}' is text; use char or bpe<V>")
        if run.checkpoints and len(run.checkpoints) < len(study.seeds):
            raise err(f"runs.{name}.checkpoints: {len(run.checkpoints)} checkpoint folders for "
                      f"{len(study.seeds)} seeds; give one folder per seed or fewer seeds")
        _check_model(run.model, f"runs.{name}.model", study.training.seq_len, study.eval_seq_len, where)
    t = study.training
    given = [k for k in ("steps", "tokens", "epochs") if getattr(t, k) is not None]
    if len(given) > 1:
        raise err(f"training: give at most one of steps, tokens, epochs (got {', '.join(given)})")
    for stage in study.dispatch.resources:
        if stage not in STAGES:
            raise err(f"dispatch.resources.{stage}: unknown stage; allowed: {', '.join(STAGES)}")
    c = study.dispatch.container
    if c.runtime != "none" and not c.image:
        raise err("dispatch.container.image is required when runtime is "
                  f"'{c.runtime}' (build one with `make container`)")


def _corpus_kind(corpora: dict[str, CorpusConfig], name: str, depth: int = 0) -> str:
    """``dna``, ``text`` or ``auto`` (unknown before reading) for a corpus of the study."""
    cfg = corpora.get(name)
    if cfg is None or depth > len(corpora):
        return "auto"
    if cfg.kind != "auto":
        return cfg.kind
    scheme, _, rest = cfg.source.partition(":")
    if scheme == "shuffle":
        return _corpus_kind(corpora, rest, depth + 1)
    if scheme == "builtin":
        from toolkit.corpora.builtin import BUILTINS  # no heavy imports: names and kinds only

        return BUILTINS[rest].kind if rest in BUILTINS else "auto"
    if scheme == "synthetic":
        return "dna" if set(cfg.synthetic.alphabet) <= set("ACGTN") else "text"
    return "auto"
