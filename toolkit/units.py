"""The units of work of a study, their fingerprints, and whether each is done, stale or pending.

A unit is ``(stage, key)``: ``prepare`` with key ``<corpus>--<tokenizer>``, ``train``
and ``evaluate`` with a member id ``<run>/seed<N>``, ``analyse`` with key ``summary``
(aggregation and report). :func:`study_units` lists them in dependency order; it is
the one list that running, ``status``, ``submit`` and the CLI use.

Every unit's completion marker (a JSON file, written last) records what the unit
consumed, its *inputs*:

- ``settings``: the resolved study settings the stage reads, as dotted keys
  (``analysis.bootstrap``, ``corpora.m1.train_records``, ...);
- ``upstream``: for every unit it read from, the digests of the outputs it read
  (the tokens, tokenizer and evaluation masks of a prepare unit, the weights of a
  train unit, ...);
- ``sources``: for a prepare unit, the sha256 of every corpus file.

and the digests of its own outputs. A unit is

- ``done`` when its marker exists, its outputs are there and its recorded inputs
  equal the current ones;
- ``stale`` when its marker exists but something it consumed changed (the reason
  names it: "analysis.bootstrap changed", "members added: r/seed3", "source file
  ... changed", "waits for prepare m1--kmer3"), or its outputs are missing;
- ``pending`` when it has no marker.

Digests are of contents, so a unit that is rerun and writes the same outputs leaves
the units after it done; one that writes different outputs makes them stale. A prepare
unit writes the token store, the tokenizer and the evaluation masks (:mod:`toolkit.masks`;
their settings, :data:`MASK_FIELDS`, are prepare settings); one that is stale only for
its mask settings, or whose masks store is missing, is rerun as masks-only
(:func:`masks_only`): its token store and tokenizer are kept, so their digests and the
train units that read them stay done, while evaluate units (which read the masks) rerun.
Running a unit (:func:`run_unit`) takes a lock in the unit's folder, so two processes
never run the same unit at once, re-checks its state under the lock (a unit that is
done is skipped), then runs the stage and writes the marker with the inputs it saw
*before* it started.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from toolkit.checkpoint import sha256 as sha256_file
from toolkit.config import STAGES, StudyConfig
from toolkit.entropy import PROFILE_FORMAT
from toolkit.errors import ConfigError, StoreError, ToolkitError
from toolkit.study import (
    Layout,
    Member,
    checkpoint_run,
    members,
    prepare_keys,
    run_tokenizer,
    token_key,
    write_json_atomic,
)

log = logging.getLogger(__name__)

MARKER_FORMAT = 1
"""Version of the marker's unit fields; markers of another version read as stale."""

MASK_FIELDS = ("eval_records", "seq_len", "distribution_mask_rate", "fisher_mask_rate", "mask_seed",
               "fisher_records", "contextual_records")
"""The analysis settings of the evaluation masks (:mod:`toolkit.masks`), which the prepare unit
builds: a prepare unit stale for these alone builds only its masks (:func:`masks_only`)."""
# Which settings each stage reads. Every field of AnalysisConfig and TrainingConfig is
# named here exactly once (a test checks it), so that a new setting cannot be left out
# of every fingerprint by accident.
ANALYSIS_FIELDS: dict[str, tuple[str, ...]] = {
    "prepare": ("entropy_orders", "entropy_max_tokens", *MASK_FIELDS),
    "evaluate": ("checkpoint", "batch_size", "prediction_dtype", "fisher_estimators", "fisher_diagonal"),
    "analyse": ("top_p", "topk", "spearman_variant", "rbf_sigma", "bootstrap", "confidence",
                "definitions", "top_p_rule", "spread_ddof", "kl_headline"),
}
# ``fisher_estimators`` is read by evaluate (what is computed) and analyse (what is shown).
ANALYSIS_SHARED = {"fisher_estimators": ("evaluate", "analyse")}
TRAINING_IGNORED = ("checkpoint_every_steps", "checkpoint_every_minutes", "log_every_steps",
                    "device", "tensorboard")
"""Training settings that change how often things are saved or logged, or where the
computation runs, but not the model a member ends up with."""

State = Literal["done", "stale", "pending"]


@dataclass(frozen=True)
class Unit:
    """One unit of work: its key, marker, lock, outputs and the units it reads from."""

    stage: str
    key: str
    marker: Path
    """Written last; its existence alone does not make the unit done (see :func:`unit_states`)."""
    lock: Path
    outputs: tuple[Path, ...]
    upstream: tuple[tuple[str, str], ...]

    @property
    def id(self) -> str:
        return f"{self.stage}:{self.key}"

    @property
    def label(self) -> str:
        return f"{self.stage} {self.key}"


@dataclass(frozen=True)
class UnitState:
    unit: Unit
    state: State
    reason: str = ""
    marker: dict[str, Any] | None = None
    current: bool = False
    """The outputs reflect the upstream units that are done: true for a done unit, and for a
    ``measure`` unit that is stale only because members it would include are not done yet
    (later units may read it: the analyse unit checks the members itself)."""

    @property
    def usable(self) -> bool:
        return self.state == "done" or self.current


# --------------------------------------------------------------------------- the units


def study_units(study: StudyConfig) -> list[Unit]:
    """Every unit of the study, in dependency order (prepare, train, evaluate, analyse)."""
    layout = Layout(study)
    out: list[Unit] = []
    from toolkit.masks import masks_store

    for corpus, tok in prepare_keys(study):
        folder = layout.tokens_dir(corpus, tok)
        out.append(Unit("prepare", token_key(corpus, tok), layout.prepare_marker(corpus, tok),
                        folder.parent / f".{folder.name}.lock",
                        (layout.tokens_store(corpus, tok), layout.tokenizer_file(corpus, tok),
                         masks_store(study, corpus, tok)), ()))
    ms = members(study)
    for m in ms:
        run = study.runs[m.run]
        d = layout.member_dir(m)
        out.append(Unit("train", m.id, layout.train_marker(m), d / ".train.lock",
                        (layout.member_store(m, "train"), layout.checkpoints_dir(m) / "final",
                         layout.checkpoints_dir(m) / "best"),
                        (("prepare", token_key(run.corpus, run_tokenizer(study, m.run))),)))
    for m in ms:
        run = study.runs[m.run]
        d = layout.member_dir(m)
        out.append(Unit("evaluate", m.id, layout.evaluate_marker(m), d / ".evaluate.lock",
                        tuple(layout.member_store(m, k) for k in ("predictions", "embeddings", "fisher")),
                        (("prepare", token_key(run.corpus, run_tokenizer(study, m.run))), ("train", m.id))))
    from toolkit.analyse.shards import FAMILIES, shard_key

    shards: list[tuple[str, str]] = []
    for name, run in study.runs.items():
        up = [("prepare", token_key(run.corpus, run_tokenizer(study, name)))]
        up += [(stage, m.id) for m in ms if m.run == name for stage in ("train", "evaluate")]
        for family in FAMILIES:
            path = layout.shard(name, family)
            key = shard_key(name, family)
            out.append(Unit("measure", key, layout.measure_marker(name, family),
                            path.parent / f".{family}.lock", (path,), tuple(up)))
            shards.append(("measure", key))
    up = [("prepare", token_key(c, t)) for c, t in prepare_keys(study)] + shards
    out.append(Unit("analyse", "summary", layout.analyse_marker, layout.root / ".analyse.lock",
                    (layout.summary, layout.report_index), tuple(up)))
    return out


def get_unit(study: StudyConfig, stage: str, key: str) -> Unit:
    """The unit ``stage key`` of the study, or a :class:`ConfigError` listing the valid keys."""
    if stage not in STAGES:
        raise ConfigError(f"unknown stage '{stage}'; stages: {', '.join(STAGES)}")
    units = [u for u in study_units(study) if u.stage == stage]
    for u in units:
        if u.key == key:
            return u
    raise ConfigError(f"no unit {stage} '{key}' in study '{study.name}'; {stage} units: "
                      f"{', '.join(u.key for u in units)}")


def parse_force(study: StudyConfig, items: list[str] | tuple[str, ...] | None) -> set[tuple[str, str]]:
    """``--force STAGE`` / ``--force STAGE:KEY`` (repeatable) -> the units to redo."""
    chosen: set[tuple[str, str]] = set()
    units = study_units(study)
    for item in items or ():
        stage, _, key = item.partition(":")
        if stage not in STAGES:
            raise ConfigError(f"--force {item}: unknown stage '{stage}'; use one of "
                              f"{', '.join(STAGES)}, optionally with :KEY (e.g. train:r/seed1)")
        if key:
            chosen.add((stage, get_unit(study, stage, key).key))
        else:
            chosen.update((u.stage, u.key) for u in units if u.stage == stage)
    return chosen


# --------------------------------------------------------------------------- settings


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(value, tuple | list):
        out[prefix] = list(value)
    else:
        out[prefix] = value


def flat_settings(value: Any, prefix: str = "") -> dict[str, Any]:
    """A (nested) dataclass or dict as ``{dotted.key: value}``."""
    out: dict[str, Any] = {}
    _flatten(prefix, value, out)
    return out


def _analysis(study: StudyConfig, stage: str) -> dict[str, Any]:
    a = study.analysis
    out = {f"analysis.{f}": getattr(a, f) for f in ANALYSIS_FIELDS[stage]}
    out.update({f"analysis.{f}": getattr(a, f) for f, stages in ANALYSIS_SHARED.items()
                if stage in stages})
    if stage == "prepare" and a.seq_len is None:
        out["analysis.seq_len"] = f"training.seq_len = {study.training.seq_len}"
    return out


def _corpus_chain(study: StudyConfig, corpus: str) -> list[str]:
    """The corpus and, for ``shuffle:OTHER``, the corpora it is made from."""
    chain = [corpus]
    while study.corpora[chain[-1]].source.startswith("shuffle:"):
        nxt = study.corpora[chain[-1]].source.split(":", 1)[1]
        if nxt in chain or nxt not in study.corpora:
            break
        chain.append(nxt)
    return chain


def unit_settings(study: StudyConfig, unit: Unit) -> dict[str, Any]:
    """The resolved settings a unit reads, as dotted keys (JSON values)."""
    s: dict[str, Any] = {}
    if unit.stage == "prepare":
        corpus, _, tok = unit.key.partition("--")
        for c in _corpus_chain(study, corpus):
            s.update(flat_settings(study.corpora[c], f"corpora.{c}"))
        s["tokenizer"] = tok
        ckpt_run = checkpoint_run(tok)
        if ckpt_run in study.runs:  # the tokenizer comes from these folders
            s[f"runs.{ckpt_run}.checkpoints"] = list(study.runs[ckpt_run].checkpoints)
        s.update(_analysis(study, "prepare"))
        # The profile's keys (the entropy-rate interval of format 2): older stores re-prepare.
        s["toolkit.entropy_profile_format"] = PROFILE_FORMAT
    elif unit.stage == "train":
        m = Member.parse(unit.key)
        run = study.runs[m.run]
        s.update(flat_settings(run, f"runs.{m.run}"))
        s.update({k: v for k, v in flat_settings(study.training, "training").items()
                  if k.split(".", 1)[1] not in TRAINING_IGNORED})
        s["study.data_seed"] = study.data_seed
    elif unit.stage == "evaluate":
        s.update(_analysis(study, "evaluate"))
    elif unit.stage == "measure":
        from toolkit.analyse.shards import family_settings, parse_shard_key

        name, family = parse_shard_key(unit.key)
        s[f"runs.{name}"] = f"{study.runs[name].corpus} x {study.runs[name].tokenizer}"
        s.update(family_settings(study, family))
    elif unit.stage == "analyse":
        s.update(_analysis(study, "analyse"))
        s["study.runs"] = [f"{r}: {c.corpus} x {c.tokenizer}" for r, c in study.runs.items()]
        s["study.name"] = study.name
        s["study.description"] = study.description
    return json.loads(json.dumps(s, default=str))


# --------------------------------------------------------------------------- digests


def _tree_digest(path: Path, skip: tuple[str, ...] = ()) -> str:
    """sha256 over the relative names and contents of every file below ``path``."""
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        rel = p.relative_to(path).as_posix() if p != path else p.name
        # A store's inventory only restates the other files' sizes and checksums.
        if rel in skip or rel == "inventory.json" or rel.endswith(".lock"):
            continue
        h.update(rel.encode() + b"\0" + sha256_file(p).encode() + b"\n")
    return h.hexdigest()


def _root_attrs(store_path: Path) -> dict[str, Any]:
    try:
        doc = json.loads((store_path / "zarr.json").read_text(encoding="utf-8"))
        return dict(doc.get("attributes") or {})
    except (OSError, ValueError) as e:
        raise StoreError(f"{store_path}: unreadable store metadata ({e}); rerun the unit "
                         "that writes it") from e


def _json_digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def output_digests(study: StudyConfig, unit: Unit) -> dict[str, str]:
    """Content digests of a finished unit's outputs, by the name later units read them."""
    layout = Layout(study)
    if unit.stage == "prepare":
        folder = unit.marker.parent
        tokens = Layout.tokens_store_in(folder)
        attrs = _root_attrs(tokens)
        profile = attrs.pop("entropy_profile", None)
        # The entropy profile lives in the root metadata; training does not read it, so it
        # is a digest of its own and changing an entropy setting does not retrain members.
        # Likewise "tokens" covers only the arrays training and evaluation read: arrays added
        # for other readers (token text, record coordinates) do not retrain anything.
        read = [_tree_digest(tokens / name) for name in TOKEN_ARRAYS_READ if (tokens / name).exists()]
        # The evaluation masks (the store of the current mask settings, unit.outputs[2]).
        return {"tokenizer": sha256_file(Layout.tokenizer_file_in(folder)),
                "tokens": _json_digest([read, attrs]),
                "profile": _json_digest(profile),
                "masks": _tree_digest(unit.outputs[2])}
    if unit.stage == "train":
        m = Member.parse(unit.key)
        ckpts = layout.checkpoints_dir(m)
        weights = [_tree_digest(ckpts / name) for name in ("final", "best")]
        flow = ckpts / "flow"
        if flow.is_dir():
            weights.append(_tree_digest(flow))
        return {"weights": _json_digest(weights), "log": _tree_digest(unit.outputs[0])}
    if unit.stage == "evaluate":
        return {p.name.removesuffix(".zarr"): _tree_digest(p) for p in unit.outputs}
    if unit.stage == "measure":
        return {"shard": _tree_digest(unit.outputs[0])}
    return {"summary": _tree_digest(layout.summary)}


TOKEN_ARRAYS_READ = ("tokens", "offsets", "split", "softmasked")
"""The token-store arrays that training and evaluation read (toolkit/sequences.py, masks.py)."""

# Which output digests of an upstream unit a unit reads.
_READS: dict[tuple[str, str], tuple[str, ...]] = {
    ("train", "prepare"): ("tokenizer", "tokens"),
    ("evaluate", "prepare"): ("tokenizer", "tokens", "masks"),
    ("evaluate", "train"): ("weights",),
    ("measure", "prepare"): ("tokens", "masks"),  # the counting baseline reads the masks
    ("measure", "train"): ("weights", "log"),
    ("measure", "evaluate"): ("predictions", "embeddings", "fisher"),
    ("analyse", "prepare"): ("profile",),
    ("analyse", "measure"): ("shard",),
}
LENIENT = ("measure",)
"""Stages whose units run with the members that are done (and say which are left out)
instead of waiting for every upstream unit. The analyse unit reads the shards of those
units; it refuses shards computed from other members than the run's done members."""


# --------------------------------------------------------------------------- sources


def _source_files(study: StudyConfig, unit: Unit) -> list[Path]:
    """The files from outside the study a unit reads: a prepare unit's corpus files (none
    for synthetic sources), an adopted external checkpoint's files for a train unit."""
    from toolkit.corpora import open_corpus
    from toolkit.errors import CorpusError

    if unit.stage == "train":
        m = Member.parse(unit.key)
        folder = study.resolve_path(study.runs[m.run].checkpoints[study.seeds.index(m.seed)])
        if not folder.is_dir():
            raise CorpusError(f"runs.{m.run}.checkpoints: {folder} is not a folder")
        return sorted(p for p in folder.rglob("*") if p.is_file())
    corpus, _, tok = unit.key.partition("--")
    src: Any = open_corpus(corpus, study)
    while hasattr(src, "base"):
        src = src.base
    files = [p for p, _ in getattr(src, "files", [])]
    ckpt_run = checkpoint_run(tok)
    if ckpt_run in study.runs:
        # tokenizer = "checkpoint": the tokenizer files of every checkpoint (all are compared
        # when preparing) are sources, so replacing one re-prepares and re-checks them.
        from toolkit.tokenizers import tokenizer_files

        for given in study.runs[ckpt_run].checkpoints:
            files += tokenizer_files(study.resolve_path(given), f"runs.{ckpt_run}.checkpoints")
    return files


def _has_sources(study: StudyConfig, unit: Unit) -> bool:
    if unit.stage == "train":
        return bool(study.runs[Member.parse(unit.key).run].checkpoints)
    return unit.stage == "prepare"


def _sources(study: StudyConfig, unit: Unit, recorded: dict[str, Any] | None) -> dict[str, Any]:
    """``{path: {"size", "mtime_ns", "sha256"}}`` of the files a unit reads from outside
    the study (:func:`_source_files`).

    A file whose size and modification time equal the recorded ones keeps its recorded
    checksum (``status`` stays cheap on large genomes); any other file is read again.
    """
    from toolkit.errors import CorpusError

    old = (recorded or {}).get("sources") or {}
    try:
        files = _source_files(study, unit)
    except CorpusError as e:
        if not old:
            raise
        # Raw data removed after preparing (a purged scratch folder): the unit's outputs
        # are still what those checksums produced, so it stays done; it cannot be rebuilt.
        log.warning("%s: its source cannot be read now (%s); its outputs stay valid but could "
                    "not be rebuilt", unit.label, e)
        return old
    out: dict[str, Any] = {}
    for path in files:
        try:
            st = path.stat()
        except OSError as e:
            raise StoreError(f"{unit.label}: cannot read {path} ({e.strerror}); check the "
                             "source path") from e
        prev = old.get(str(path))
        if not stat.S_ISREG(st.st_mode):
            # A pipe or device can be read once, by the prepare itself: nothing to compare.
            sha = "not a regular file"
        elif prev and prev.get("size") == st.st_size and prev.get("mtime_ns") == st.st_mtime_ns:
            sha = prev["sha256"]
        else:
            sha = sha256_file(path)
        out[str(path)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": sha}
    return out


# --------------------------------------------------------------------------- inputs and states


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def unit_inputs(study: StudyConfig, unit: Unit, states: dict[tuple[str, str], UnitState],
                recorded: dict[str, Any] | None = None) -> dict[str, Any]:
    """What ``unit`` consumes now: settings, upstream output digests (done upstream units
    only) and, for prepare, source checksums."""
    upstream: dict[str, Any] = {}
    for up in unit.upstream:
        st = states.get(up)
        if st is None or not st.usable or st.marker is None:
            continue
        outputs = st.marker.get("outputs") or {}
        upstream[f"{up[0]}:{up[1]}"] = {k: outputs.get(k) for k in _READS[(unit.stage, up[0])]}
    inputs: dict[str, Any] = {"settings": unit_settings(study, unit), "upstream": upstream}
    if _has_sources(study, unit):
        inputs["sources"] = _sources(study, unit, recorded)
    return inputs


def fingerprint(inputs: dict[str, Any]) -> str:
    """sha256 of the inputs (file checksums only, not their times)."""
    canon = dict(inputs)
    if "sources" in canon:
        canon["sources"] = {p: v["sha256"] for p, v in canon["sources"].items()}
    return _json_digest(canon)


def _names(items: list[str], limit: int = 4) -> str:
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _member_of(unit_id: str) -> str:
    stage, _, key = unit_id.partition(":")
    return key if stage in ("train", "evaluate") else ""


def explain(old: dict[str, Any], new: dict[str, Any], stage: str) -> str:
    """Why recorded inputs ``old`` differ from current inputs ``new``, in a few words."""
    parts: list[str] = []
    a, b = old.get("settings") or {}, new.get("settings") or {}
    changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    if changed:
        parts.append(f"{_names(changed)} changed")
    # Keys recorded by an earlier toolkit that classified the settings differently.
    if added := sorted(set(b) - set(a)):
        parts.append(f"now also reads {_names(added)}")
    if gone := sorted(set(a) - set(b)):
        parts.append(f"no longer reads {_names(gone)}")
    ua, ub = old.get("upstream") or {}, new.get("upstream") or {}
    had = {_member_of(k) for k in ua} - {""}
    has = {_member_of(k) for k in ub} - {""}
    if stage in LENIENT:
        if has - had:
            parts.append(f"members added: {_names(sorted(has - had))}")
        if had - has:
            parts.append(f"members removed: {_names(sorted(had - has))}")
    skip = (has ^ had) if stage in LENIENT else set()
    diff = sorted(k for k in set(ua) | set(ub) if ua.get(k) != ub.get(k) and _member_of(k) not in skip)
    if diff:
        parts.append(f"new output of {_names([k.replace(':', ' ', 1) for k in diff])}")
    sa, sb = old.get("sources") or {}, new.get("sources") or {}
    files = sorted(p for p in set(sa) | set(sb)
                   if (sa.get(p) or {}).get("sha256") != (sb.get(p) or {}).get("sha256"))
    if files:
        parts.append(f"source file(s) {_names([Path(p).name for p in files], 3)} changed")
    return "; ".join(parts) or "inputs changed"


def unit_states(study: StudyConfig, units: list[Unit] | None = None) -> dict[tuple[str, str], UnitState]:
    """The state of every unit, in dependency order: done, stale (with the reason) or pending."""
    states: dict[tuple[str, str], UnitState] = {}
    for u in units or study_units(study):
        states[(u.stage, u.key)] = _state(study, u, states)
    return states


def _state(study: StudyConfig, u: Unit, states: dict[tuple[str, str], UnitState]) -> UnitState:
    doc = _read_marker(u.marker)
    if doc is None:
        return UnitState(u, "pending", "not run")
    if doc.get("marker_format") != MARKER_FORMAT or "inputs" not in doc:
        return UnitState(u, "stale", "marker written by another toolkit version or damaged", doc)
    missing = [p for p in u.outputs if not p.exists()]
    if missing:
        if u.stage == "prepare":
            # The masks store's name follows the mask settings: a changed one says so.
            why = explain({"settings": doc["inputs"].get("settings")}, {"settings": unit_settings(study, u)}, u.stage)
            if why != "inputs changed":
                return UnitState(u, "stale", why, doc)
        return UnitState(u, "stale", f"output {missing[0].name} is missing", doc)
    waits = [up for up in u.upstream if not states[up].usable]
    if waits and u.stage not in LENIENT:
        s, k = waits[0]
        why = states[waits[0]].reason if s in LENIENT else ""  # a shard's own reason says more
        return UnitState(u, "stale", f"waits for {s} {k} ({states[waits[0]].state}{': ' + why if why else ''})", doc)
    try:
        now = unit_inputs(study, u, states, recorded=doc["inputs"])
    except ToolkitError as e:
        return UnitState(u, "stale", str(e), doc)
    reasons = []
    if fingerprint(now) != doc.get("fingerprint"):
        # Upstream units that are not done now are reported as waited for, not as removed.
        wait_ids = {f"{s}:{k}" for s, k in waits}
        then = {**doc["inputs"], "upstream": {k: v for k, v in (doc["inputs"].get("upstream") or {}).items()
                                              if k not in wait_ids}}
        why = explain(then, now, u.stage)
        if why != "inputs changed" or not waits:
            reasons.append(why)
    if waits:  # measure: the shard lacks members that are not done
        recorded = {_member_of(k) for k in doc["inputs"].get("upstream") or {}}
        new = sorted({_member_of(f"{s}:{k}") for s, k in waits} - recorded - {""})
        old = [f"{s} {k} ({states[(s, k)].state})" for s, k in waits
               if _member_of(f"{s}:{k}") not in new]
        if new:
            reasons.append(f"members added: {_names(new)} (not evaluated yet)")
        if old:
            reasons.append(f"waits for {_names(old, 2)}")
    lagging = [up for up in u.upstream if states[up].state != "done"] if u.stage not in LENIENT else []
    if lagging:  # usable (e.g. a shard without members that are not evaluated yet), not done
        s, k = lagging[0]
        reasons.append(f"waits for {s} {k} (stale: {states[lagging[0]].reason})")
    if reasons:
        return UnitState(u, "stale", "; ".join(reasons), doc, current=fingerprint(now) == doc.get("fingerprint"))
    return UnitState(u, "done", "", doc, current=True)


def to_run(study: StudyConfig, force: set[tuple[str, str]] | None = None) -> dict[str, list[str]]:
    """Stage -> keys of the units a run must visit: those not done, the forced ones, and
    every unit after them (each is re-checked when its turn comes and skipped if done)."""
    units = study_units(study)
    states = unit_states(study, units)
    chosen = {k for k, st in states.items() if st.state != "done"} | set(force or ())
    for u in units:  # dependency order: one pass closes over dependents
        if any(up in chosen for up in u.upstream):
            chosen.add((u.stage, u.key))
    out: dict[str, list[str]] = {stage: [] for stage in STAGES}
    for u in units:
        if (u.stage, u.key) in chosen:
            out[u.stage].append(u.key)
    return out


# --------------------------------------------------------------------------- running


class UnitBusyError(ToolkitError):
    """Another process holds the unit's lock."""


@dataclass
class _Lock:
    path: Path
    fd: int = -1

    writable: bool = True

    def __enter__(self) -> _Lock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            except PermissionError:
                # A colleague's lock file in a shared folder: flock works on a read-only
                # descriptor too; only the holder note is not written.
                self.fd, self.writable = os.open(self.path, os.O_RDONLY), False
        except OSError as e:
            raise StoreError(f"{self.path}: cannot open the unit's lock file ({e.strerror}); "
                             "the study folder must be writable by whoever runs its units") from e
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(self.fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(self.fd)
            raise UnitBusyError(f"{self.path}: the unit is being run by {holder}; wait for it to "
                                "finish (or cancel it) instead of starting it twice") from e
        if self.writable:
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                               f"{time.strftime('%Y-%m-%d %H:%M:%S')}".encode(), 0)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.writable:
            os.ftruncate(self.fd, 0)
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def unit_lock(unit: Unit) -> _Lock:
    """An exclusive, non-blocking lock on a unit (``flock`` on a file in its folder)."""
    return _Lock(unit.lock)


def mark_complete(study: StudyConfig, unit: Unit, inputs: dict[str, Any],
                  extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write the unit's marker: the stage's own fields, the inputs, the output digests."""
    from toolkit import __version__

    doc = {k: v for k, v in (_read_marker(unit.marker) or {}).items()
           if k not in ("unit", "marker_format", "fingerprint", "inputs", "outputs")}
    doc.update(extra or {})
    doc.update({"unit": unit.id, "marker_format": MARKER_FORMAT, "fingerprint": fingerprint(inputs),
                "inputs": inputs, "outputs": output_digests(study, unit),
                "toolkit_version": __version__, "host": socket.gethostname(),
                "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    write_json_atomic(unit.marker, doc)
    return doc


def run_unit(study: StudyConfig, stage: str, key: str, *, force: bool = False) -> None:
    """Run one unit in this process, unless it is done.

    Under the unit's lock its state is computed afresh: a done unit is skipped (unless
    ``force``); a unit whose upstream units are not done is refused (analyse runs with
    the members that are done and says which are left out). ``force`` on a train unit
    discards the member's checkpoints and trains it from scratch.

    Raises
    ------
    UnitBusyError
        Another process runs the same unit.
    SubmissionError
        An upstream unit is not done.
    """
    from toolkit.errors import SubmissionError

    unit = get_unit(study, stage, key)
    if stage in ("train", "evaluate"):
        # A unit gets the CPUs its stage asked for; torch's default (every core) makes
        # units that share a node, or the two cores of a laptop, fight each other.
        import torch

        torch.set_num_threads(max(1, study.dispatch.resources_for(stage).cpus_per_task))
    with unit_lock(unit):
        states = unit_states(study)
        st = states[(stage, key)]
        if st.state == "done" and not force:
            log.info("%s: already complete, skipped", unit.label)
            return
        if stage not in LENIENT:
            waits = [up for up in unit.upstream if not states[up].usable]
            if waits:
                s, k = waits[0]
                raise SubmissionError(f"{unit.label}: needs {s} {k}, which is {states[waits[0]].state}"
                                      f"{' (' + states[waits[0]].reason + ')' if states[waits[0]].reason else ''}; "
                                      "run `toolkit run STUDY` to run every unit in order")
        if st.state == "stale":
            log.info("%s: rerunning (stale: %s)", unit.label, st.reason)
        inputs = unit_inputs(study, unit, states, recorded=(st.marker or {}).get("inputs"))
        partial = not force and masks_only(unit, st, inputs)
        if not partial:
            # Until it finishes, the unit must not read as done. A masks-only rerun keeps the
            # marker (stale for what it lacks): a failed one is retried as masks-only again.
            unit.marker.unlink(missing_ok=True)
        _run_stage(study, unit, states, inputs, fresh=force, masks_only=partial)
        mark_complete(study, unit, inputs)


def masks_only(unit: Unit, st: UnitState, inputs: dict[str, Any]) -> bool:
    """Whether a rerun of a stale prepare unit needs to build only its evaluation masks.

    True when the token store and tokenizer are in place and the recorded inputs differ
    from the current ``inputs`` in mask settings (:data:`MASK_FIELDS`) alone, or not at
    all (the masks store is missing): the token store and tokenizer are then current,
    and rebuilding them would only rewrite the same bytes. Any other difference (a
    corpus or tokenizer setting, an entropy setting, a source file) re-prepares everything.
    """
    doc = st.marker or {}
    if (unit.stage != "prepare" or st.state != "stale" or doc.get("marker_format") != MARKER_FORMAT
            or not isinstance(doc.get("inputs"), dict)):
        return False
    if not all(p.exists() for p in unit.outputs[:2]):  # tokens.zarr, tokenizer.json
        return False
    mask_keys = {f"analysis.{f}" for f in MASK_FIELDS}

    def without_masks(i: dict[str, Any]) -> dict[str, Any]:
        return {**i, "settings": {k: v for k, v in (i.get("settings") or {}).items() if k not in mask_keys}}

    return fingerprint(without_masks(doc["inputs"])) == fingerprint(without_masks(inputs))


def discard_checkpoints(study: StudyConfig, key: str) -> None:
    """A forced train unit starts over: remove the member's checkpoints (resume state included)."""
    import shutil

    folder = Layout(study).checkpoints_dir(Member.parse(key))
    if folder.exists():
        log.info("train %s: --force: discarding %s, training from scratch", key, folder)
        shutil.rmtree(folder)


def _run_stage(study: StudyConfig, unit: Unit, states: dict[tuple[str, str], UnitState],
               inputs: dict[str, Any], fresh: bool, masks_only: bool = False) -> None:
    if unit.stage == "prepare":
        from toolkit.prepare import prepare_unit

        corpus, _, tokenizer = unit.key.partition("--")
        prepare_unit(study, corpus, tokenizer, masks_only=masks_only)
    elif unit.stage == "train":
        from toolkit.train import train_member

        member = Member.parse(unit.key, study)
        if fresh:
            discard_checkpoints(study, member.id)
        run = study.runs[member.run]
        prep = inputs["upstream"].get(f"prepare:{token_key(run.corpus, run_tokenizer(study, member.run))}") or {}
        train_member(study, member, data_digest=_json_digest(prep))
    elif unit.stage == "evaluate":
        from toolkit.evaluate import evaluate_member

        evaluate_member(study, Member.parse(unit.key, study))
    elif unit.stage == "measure":
        import contextlib

        from toolkit.analyse.shards import DASK_FAMILIES, parse_shard_key, run_shard
        from toolkit.dispatch.dask_cluster import analysis_scheduler

        name, family = parse_shard_key(unit.key)
        done = [m for m in members(study) if m.run == name
                and states[("evaluate", m.id)].state == "done"]  # in seed order, as the summary lists them
        # dispatch.dask = "slurm": the shard's Dask graphs run on SLURM worker jobs.
        with analysis_scheduler(study) if family in DASK_FAMILIES else contextlib.nullcontext():
            run_shard(study, name, family, done)
    else:
        from toolkit.analyse import analyse_study
        from toolkit.report import write_report

        done = [Member.parse(k) for (s, k), st in states.items() if s == "evaluate" and st.state == "done"]
        analyse_study(study, done, from_shards=True)
        write_report(study)


def done_members(study: StudyConfig) -> list[Member]:
    """Members whose evaluate unit is done (marker present and current)."""
    return [Member.parse(k) for (s, k), st in unit_states(study).items()
            if s == "evaluate" and st.state == "done"]


def require_current_summary(study: StudyConfig) -> None:
    """Refuse to show a summary that no longer matches the study (the analyse unit is not done).

    Raises
    ------
    StoreError
        The analyse unit is pending or stale; the message says why.
    """
    st = unit_states(study)[("analyse", "summary")]
    if st.state != "done":
        raise StoreError(f"{Layout(study).summary}: the summary is {st.state} ({st.reason}); run "
                         "`toolkit run STUDY` to bring it up to date")


def prepare_study(study: StudyConfig, force: bool = False) -> None:
    """Build every token store of the study (one per distinct corpus x tokenizer).

    Each is a prepare unit (:func:`run_unit`): one that is done (its
    marker current) is skipped unless ``force``.
    """
    keys = prepare_keys(study)
    for i, (corpus, tok) in enumerate(keys, 1):
        log.info("prepare %d/%d %s", i, len(keys), token_key(corpus, tok))
        run_unit(study, "prepare", token_key(corpus, tok), force=force)
