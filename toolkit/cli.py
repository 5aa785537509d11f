"""Command line: ``toolkit COMMAND ...`` (also ``python -m toolkit``).

Thin on purpose: parse arguments, load the study, call the library. A
:class:`~toolkit.errors.ToolkitError` becomes one line on stderr and exit code 2;
anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolkit import __version__
from toolkit.errors import ToolkitError


def _study(args: argparse.Namespace) -> Any:
    """The study named on the command line: a study file, or a study folder (its study.json)."""
    from toolkit.config import load_study
    from toolkit.errors import ConfigError
    from toolkit.study import Layout

    path = Path(args.study)
    if path.is_dir():
        path = Layout.of_folder(path).study_file
        if not path.exists():
            raise ConfigError(f"{args.study}: a folder without study.json (it is written when a "
                              "study is first run); give the study file instead")
        if getattr(args, "out", None):
            raise ConfigError(f"--out: {args.study} is a study folder already; drop --out")
    study = load_study(path, args.set or [])
    if getattr(args, "out", None):
        from toolkit.config import check_plain

        # --out bypasses validate_study (it replaces a validated study): same check here.
        check_plain(args.out, "--out", str(args.study))
        study = dataclasses.replace(study, output_dir=args.out)
    return study


def _submitted_study(args: argparse.Namespace) -> tuple[Any, str]:
    """For status and cancel: the study as last run (``<root>/study.json``), so that the
    run's ``--set`` overrides need not be repeated, and a note when the study file given
    now differs from it ('' otherwise). With ``--set``, the study file as given."""
    from toolkit.config import load_study, study_to_dict
    from toolkit.study import Layout
    from toolkit.units import flat_settings

    study = _study(args)
    saved = Layout(study).study_file
    if args.set or not saved.exists() or Path(args.study).resolve() in (saved, saved.parent):
        return study, ""
    submitted = load_study(saved)
    now, then = flat_settings(study_to_dict(study)), flat_settings(study_to_dict(submitted))
    changed = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    note = ""
    if changed:
        more = f" and {len(changed) - 4} more" if len(changed) > 4 else ""
        note = (f"note: showing the study as last run ({saved}); {args.study} differs in "
                f"{', '.join(changed[:4])}{more}: `toolkit run {args.study}` would apply that")
    return submitted, note


_WRITES = ("prepare", "train", "evaluate", "analyse", "report", "run", "submit", "unit")
"""Commands that write into the study folder: :func:`_check_output_dir` runs before them."""


def _check_output_dir(root: Path) -> None:
    """Create the study folder ``root`` and write a probe file in it, before any work.

    A file where the folder should be, a file among its parents or a read-only
    parent would otherwise surface as a traceback (or an error deep inside one
    stage) after minutes of work; here it is one line naming the folder.

    Raises
    ------
    ConfigError
        The folder cannot be created or written.
    """
    import os
    import tempfile

    from toolkit.errors import ConfigError

    what = "choose a writable output_dir (--out)"
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root}: cannot create the study folder (a file is in its place); {what}")
    if root.is_symlink() and not root.exists():
        raise ConfigError(f"{root}: cannot create the study folder (a dangling or looping symlink "
                          f"is in its place); {what}")
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=root)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"{root}: cannot create the study folder ({e.strerror or e}); {what}") from e


def _add_study(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study file (e.g. jobs/demo.toml) or a study folder (its study.json)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a study key, e.g. --set training.steps=10 (repeatable)")
    p.add_argument("--out", metavar="DIR", help="study output folder (default: studies/<name>)")


def cmd_validate(args: argparse.Namespace) -> int:
    from toolkit.study import members, prepare_keys

    study = _study(args)
    print(f"study {study.name}: {len(study.corpora)} corpora, {len(study.runs)} runs, "
          f"{len(members(study))} members, output {study.root}")
    for corpus, tok in prepare_keys(study):
        print(f"  tokens  {corpus} x {tok}  ({study.corpora[corpus].source})")
    for name, run in study.runs.items():
        print(f"  run     {name}: {run.corpus} x {run.tokenizer}, model {run.model.shape}, "
              f"seeds {list(study.seeds)}")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from toolkit.units import prepare_study

    prepare_study(_study(args), force=args.force)
    return 0


def cmd_corpus_stats(args: argparse.Namespace) -> int:
    import json

    from toolkit.prepare import corpus_stats, format_profile

    profile = corpus_stats(args.source, tokenizer=args.tokenizer, kind=args.kind,
                           max_records=args.max_records, orders=args.orders)
    print(json.dumps(profile, indent=2) if args.json else format_profile(profile))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json

    from toolkit.plan import DEVICES, format_plan, load_calibration, plan_study

    devices = load_calibration(Path(args.calibration)) if args.calibration else DEVICES
    plan = plan_study(_study(args), devices=devices, sample_seconds=args.sample_seconds)
    print(json.dumps(plan.to_json(), indent=2) if args.json else format_plan(plan))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from toolkit.study import Member
    from toolkit.units import run_unit

    study = _study(args)
    run_unit(study, "train", Member.parse(args.member, study).id, force=args.force)
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from toolkit.study import Member
    from toolkit.units import run_unit

    study = _study(args)
    run_unit(study, "evaluate", Member.parse(args.member, study).id, force=args.force)
    return 0


def _print_results(study: Any) -> None:
    """The entropy-versus-learnability table and where the report is."""
    from toolkit.report import summary_table
    from toolkit.study import Layout

    print(summary_table(study))
    report = Layout(study).report_index
    if report.exists():
        print(f"report: {report}")


def cmd_analyse(args: argparse.Namespace) -> int:
    from toolkit.units import run_unit, study_units

    study = _study(args)
    # The measure units (one shard per run and family), then the summary that reduces them.
    for unit in study_units(study):
        if unit.stage == "measure":
            run_unit(study, "measure", unit.key, force=args.force)
    run_unit(study, "analyse", "summary", force=args.force)
    _print_results(study)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from toolkit.report import write_report
    from toolkit.units import require_current_summary

    study = _study(args)
    require_current_summary(study)
    write_report(study)
    _print_results(study)
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from toolkit.dispatch import run_study

    study = _study(args)
    run_study(study, executor=args.executor, wait=not args.no_wait, force=args.force or ())
    if not args.no_wait and (args.executor or study.dispatch.executor) != "slurm":
        _print_results(study)
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from toolkit.dispatch import run_study

    run_study(_study(args), executor="slurm", wait=False, force=args.force or ())
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from toolkit.dispatch import status_table

    study, note = _submitted_study(args)
    print(status_table(study))
    if note:
        print(note)
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from toolkit.dispatch import cancel_study

    cancel_study(_submitted_study(args)[0])
    return 0


def cmd_unit(args: argparse.Namespace) -> int:
    from toolkit.units import run_unit

    run_unit(_study(args), args.stage, args.key, force=args.force)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolkit",
        description="Entropy versus learnability: train seed ensembles of masked LMs on a corpus "
                    "and measure entropy, disagreement, embedding stability and Fisher information.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--version", action="version", version=f"toolkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func: Any, help: str, study: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help)
        if study:
            _add_study(p)
        p.set_defaults(func=func)
        return p

    add("validate", cmd_validate, "check a study file and list its runs and members")
    p = add("prepare", cmd_prepare, "build the token stores (corpus x tokenizer) of a study")
    p.add_argument("--force", action="store_true", help="rebuild stores that are already done")
    p = add("corpus-stats", cmd_corpus_stats, "print the data-side entropy profile of a corpus",
            study=False)
    p.add_argument("source", help="a file, folder, glob or builtin:NAME (e.g. builtin:arabidopsis-thaliana-chr1)")
    p.add_argument("--tokenizer", default="char", help="char, kmer<k>, kmer<k>-overlap or bpe<V> (default char)")
    p.add_argument("--kind", choices=["auto", "dna", "text"], default="auto")
    p.add_argument("--max-records", type=int, default=None, help="read at most this many records")
    p.add_argument("--orders", type=int, default=4, help="conditional entropy up to this context length J")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = add("plan", cmd_plan, "estimate a study's units, CPU/GPU-hours, memory and disk before running it")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--calibration", metavar="FILE",
                   help="measured device throughputs (JSON, e.g. written by benchmarks/gpu_check.sh)")
    p.add_argument("--sample-seconds", type=float, default=3.0,
                   help="read each corpus for at most this long to measure record lengths (default 3)")
    p = add("train", cmd_train, "train one ensemble member (resumes from its last checkpoint)")
    p.add_argument("--member", required=True, help="member id RUN/seedN, e.g. dna-6mer/seed1")
    p.add_argument("--force", action="store_true",
                   help="retrain although done: discard the member's checkpoints, start over")
    p = add("evaluate", cmd_evaluate, "write a member's predictions, embeddings and Fisher")
    p.add_argument("--member", required=True, help="member id RUN/seedN")
    p.add_argument("--force", action="store_true", help="evaluate again although done")
    p = add("analyse", cmd_analyse, "aggregate every analysis into summary.zarr, write the report")
    p.add_argument("--force", action="store_true", help="analyse again although done")
    add("report", cmd_report, "write the HTML report and figures again from summary.zarr")
    force_help = ("redo units although they are done: STAGE (every unit of it) or STAGE:KEY, "
                  "e.g. --force analyse or --force train:r/seed1 (repeatable); a forced train "
                  "unit starts over from scratch")
    p = add("run", cmd_run, "run every unit that is not done (pending, stale, or after a stale one)")
    p.add_argument("--executor", choices=["local", "slurm", "debug"], default=None)
    p.add_argument("--no-wait", action="store_true", help="return after submitting")
    p.add_argument("--force", action="append", metavar="STAGE[:KEY]", help=force_help)
    p = add("submit", cmd_submit, "queue every unit that is not done on SLURM and return at once")
    p.add_argument("--force", action="append", metavar="STAGE[:KEY]", help=force_help)
    add("status", cmd_status, "show every unit: done / stale (and why) / running / pending / failed")
    add("cancel", cmd_cancel, "cancel the study's queued and running jobs")
    p = add("unit", cmd_unit, "run one unit of work (used by the dispatcher)")
    from toolkit.config import STAGES

    p.add_argument("stage", choices=list(STAGES))
    p.add_argument("key", help="corpus--tokenizer, RUN/seedN or summary")
    p.add_argument("--force", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        if args.command in _WRITES:
            _check_output_dir(_study(args).root)
        return int(args.func(args) or 0)
    except ToolkitError as e:
        print(f"toolkit: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("toolkit: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `toolkit validate ... | head`: the reader left; say nothing more.
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
