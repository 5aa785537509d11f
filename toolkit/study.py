"""The study folder: where every unit of work writes, and how members are named.

Layout (all paths below the study root, ``StudyConfig.root``)::

    study.json                          the resolved study, written by the dispatcher for its jobs
    tokens/<corpus>--<tokenizer>/       one prepare unit: token store, tokenizer, evaluation masks
                                        (<tokenizer> is checkpoint-<run> for tokenizer = "checkpoint")
        tokens.zarr  tokenizer.json  masks-<digest>.zarr  complete.json
    members/<run>/seed<N>/              one ensemble member
        checkpoints/                    resumable training state (train unit)
        train.zarr                      loss curve and evaluation loss
        train.complete.json             marker: training finished
        predictions.zarr embeddings.zarr fisher.zarr
        evaluate.complete.json          marker: per-member outputs written
    analysis/<run>/<family>.zarr        one measure shard (measure unit), marker .<family>.complete.json
    summary.zarr                        aggregated analyses (analyse unit)
    report/index.html                   the report
    analyse.complete.json               marker: summary and report written
    manifest.json                       jobs submitted by the dispatcher
    logs/<stage>/  logs/driver.log  logs/dask/   job logs

The member id ``<run>/seed<N>`` is the one key for job names, folders and store
coordinates. Markers are written last, after every store of the unit was renamed
into place, and record what the unit consumed: a unit is done only when its marker
exists and what it consumed has not changed since (:mod:`toolkit.units`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from toolkit.config import StudyConfig
from toolkit.errors import ConfigError

# Imported from here by toolkit.units, toolkit.dispatch and the tests (the marker writer
# of the study folder); it lives in toolkit.plumbing.
from toolkit.plumbing import write_json_atomic as write_json_atomic
from toolkit.tokenizers.spec import CHECKPOINT_TOKENIZER


@dataclass(frozen=True, order=True)
class Member:
    run: str
    seed: int

    @property
    def id(self) -> str:
        return f"{self.run}/seed{self.seed}"

    @classmethod
    def parse(cls, text: str, study: StudyConfig | None = None) -> Member:
        run, _, seed = text.partition("/seed")
        if not run or not seed.isdigit():
            raise ConfigError(f"member '{text}' must look like RUN/seedN, e.g. dna-6mer/seed1")
        member = cls(run, int(seed))
        if study is not None:
            valid = [m.id for m in members(study)]
            if member.id not in valid:
                raise ConfigError(f"member '{text}' is not in study '{study.name}'; "
                                  f"members: {', '.join(valid)}")
        return member


def members(study: StudyConfig) -> list[Member]:
    """Every ensemble member, generated from the runs and the seeds (never listed by hand)."""
    return [Member(run, seed) for run in study.runs for seed in study.seeds]


def token_key(corpus: str, tokenizer: str) -> str:
    return f"{corpus}--{tokenizer}"


_CHECKPOINT_PREFIX = "checkpoint-"


def run_tokenizer(study: StudyConfig, run: str) -> str:
    """The tokenizer part of ``run``'s token store key.

    The run's spec (``kmer6``, ``bpe4096`` ...), except for ``tokenizer = "checkpoint"``:
    ``checkpoint-<run>``, because each such run brings its own tokenizer (that of its
    checkpoints), so two runs on one corpus must not share a token store.
    """
    cfg = study.runs[run]
    return f"{_CHECKPOINT_PREFIX}{run}" if cfg.tokenizer == CHECKPOINT_TOKENIZER else cfg.tokenizer


def checkpoint_run(tokenizer: str) -> str | None:
    """The run whose checkpoints' tokenizer a token-key tokenizer part names, or None."""
    return tokenizer[len(_CHECKPOINT_PREFIX):] if tokenizer.startswith(_CHECKPOINT_PREFIX) else None


def prepare_keys(study: StudyConfig) -> list[tuple[str, str]]:
    """Distinct (corpus, tokenizer) pairs, in run order: one prepare unit each."""
    seen: dict[tuple[str, str], None] = {}
    for name, run in study.runs.items():
        seen[(run.corpus, run_tokenizer(study, name))] = None
    return list(seen)


class Layout:
    """Paths of a study folder. Path arithmetic, and two listings of what is there
    (:meth:`member_folders`, :meth:`token_stores`): nothing is created here."""

    def __init__(self, study: StudyConfig) -> None:
        self.study = study
        self.root = study.root

    def tokens_dir(self, corpus: str, tokenizer: str) -> Path:
        return self.root / "tokens" / token_key(corpus, tokenizer)

    def run_tokens_dir(self, run: str) -> Path:
        return self.tokens_dir(self.study.runs[run].corpus, run_tokenizer(self.study, run))

    def member_dir(self, member: Member) -> Path:
        return self.root / "members" / member.run / f"seed{member.seed}"

    def checkpoints_dir(self, member: Member) -> Path:
        return self.member_dir(member) / "checkpoints"

    def member_store(self, member: Member, kind: str) -> Path:
        """A member's store of ``kind``: ``train``, ``predictions``, ``embeddings`` or ``fisher``."""
        return self.member_dir(member) / f"{kind}.zarr"

    def tokens_store(self, corpus: str, tokenizer: str) -> Path:
        return self.tokens_store_in(self.tokens_dir(corpus, tokenizer))

    def run_tokens_store(self, run: str) -> Path:
        """The token store a run reads (its corpus and resolved tokenizer)."""
        return self.tokens_store_in(self.run_tokens_dir(run))

    def tokenizer_file(self, corpus: str, tokenizer: str) -> Path:
        return self.tokenizer_file_in(self.tokens_dir(corpus, tokenizer))

    def masks_store(self, corpus: str, tokenizer: str, digest: str) -> Path:
        """The evaluation masks of a token store built under the mask settings whose digest is
        ``digest`` (:func:`toolkit.masks.masks_digest`): a prepare unit's output."""
        return self.masks_store_in(self.tokens_dir(corpus, tokenizer), digest)

    # The names inside a prepare folder, for a folder given as a path (prepare builds one
    # under a temporary name and renames it into place).

    @staticmethod
    def tokenizer_file_in(folder: Path) -> Path:
        return folder / "tokenizer.json"

    @staticmethod
    def prepare_marker_in(folder: Path) -> Path:
        return folder / "complete.json"

    @staticmethod
    def masks_store_in(folder: Path, digest: str) -> Path:
        return folder / f"masks-{digest}.zarr"

    def train_marker(self, member: Member) -> Path:
        return self.member_dir(member) / "train.complete.json"

    def evaluate_marker(self, member: Member) -> Path:
        return self.member_dir(member) / "evaluate.complete.json"

    def prepare_marker(self, corpus: str, tokenizer: str) -> Path:
        return self.prepare_marker_in(self.tokens_dir(corpus, tokenizer))

    def shard(self, run: str, family: str) -> Path:
        """The analysis shard of one run and measure family (a ``measure`` unit's store)."""
        return self.root / "analysis" / run / f"{family}.zarr"

    def measure_marker(self, run: str, family: str) -> Path:
        return self.shard(run, family).parent / f".{family}.complete.json"

    @property
    def analyse_marker(self) -> Path:
        return self.root / "analyse.complete.json"

    @property
    def summary(self) -> Path:
        return self.root / "summary.zarr"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.json"

    @property
    def logs_dir(self) -> Path:
        return self.root / "logs"

    # The paths below complete the layout, so that no other module spells a name of the
    # study folder (tests/test_layout.py keeps it so).

    @classmethod
    def of_folder(cls, root: str | Path) -> Layout:
        """The layout of a study folder known by its path alone (no study loaded).

        For readers of a folder whose study may be absent (``toolkit.open_results`` on
        stores written by the library, a study folder named on the command line): every
        path that needs no setting of the study. The run-based ones
        (:meth:`run_tokens_dir` and those built on it) need ``Layout(study)``; here they
        raise AttributeError (no ``study``).
        """
        layout = cls.__new__(cls)
        layout.root = Path(root)
        return layout

    @property
    def study_file(self) -> Path:
        """The resolved study the dispatcher writes for its jobs (``study.json``)."""
        return self.root / "study.json"

    @property
    def members_dir(self) -> Path:
        """The folder of every member folder (``members/<run>/seed<N>``)."""
        return self.root / "members"

    def member_folders(self) -> list[Member]:
        """The members that have a folder under :attr:`members_dir`, whatever the study says:
        runs in name order, then seeds in numeric order. Reads the folder (creates nothing)."""
        found: list[Member] = []
        if self.members_dir.is_dir():
            for run_dir in sorted(p for p in self.members_dir.iterdir() if p.is_dir()):
                seeds = sorted(int(p.name[4:]) for p in run_dir.glob("seed*") if p.name[4:].isdigit())
                found += [Member(run_dir.name, seed) for seed in seeds]
        return found

    @property
    def tokens_root(self) -> Path:
        """The folder of every prepare unit's folder (``tokens/<corpus>--<tokenizer>``)."""
        return self.root / "tokens"

    def token_stores(self) -> list[Path]:
        """The token store of every prepare folder present, in key order (reads the folder)."""
        return sorted(self.tokens_root.glob("*/tokens.zarr"))

    @staticmethod
    def tokens_store_in(folder: Path) -> Path:
        """The token store of a prepare folder (``tokens/<corpus>--<tokenizer>``) given as a path."""
        return folder / "tokens.zarr"

    def run_tokenizer_file(self, run: str) -> Path:
        """The tokenizer saved beside the token store that ``run`` reads."""
        return self.run_tokens_dir(run) / "tokenizer.json"

    @property
    def report_index(self) -> Path:
        """The report's page, written last by the analyse unit (one of its outputs)."""
        return self.report_dir / "index.html"

    def stage_logs(self, stage: str) -> Path:
        """The job logs of one stage (``logs/<stage>``: the executor's, and member-named links)."""
        return self.logs_dir / stage

    @property
    def driver_log(self) -> Path:
        """The log of a detached local driver (``toolkit run --executor local --no-wait``)."""
        return self.logs_dir / "driver.log"

    @property
    def dask_logs(self) -> Path:
        """The Dask workers' logs (the ``analyse`` stage on a SLURM Dask cluster)."""
        return self.logs_dir / "dask"


