"""Hugging Face-complete stores: CF attributes on every variable, token text as a coordinate,
tokens traced back to source records and coordinates, and string labels that plot.

One real tiny study (a Markov corpus, two runs of different vocabularies, two members each)
is run once for the module; the source-coordinate test prepares a synthetic genome whose
bases are known.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import zarr

from tests.conftest import study_toml
from toolkit import store
from toolkit.config import load_study
from toolkit.errors import StoreError
from toolkit.study import Layout


def _study_text(out: Path) -> str:
    """The tiny study plus a character-level run: the runs' vocabularies differ (74 and 10),
    so open_results gives one predictions sub-group per run, as in the docstring examples."""
    return study_toml("attrs", out, runs={"r": "kmer3", "c": "char"})


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished study folder (run once for the module)."""
    import torch

    from toolkit.dispatch import run_study

    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("attrs")
    path = base / "study.toml"
    path.write_text(_study_text(base / "out"))
    run_study(load_study(path))
    return base / "out"


def _stores(root: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.zarr")):
        kind = json.loads((path / "zarr.json").read_text())["attributes"]["schema"]
        found.setdefault(kind, []).append(path)
    return found


def _arrays(group: zarr.Group, prefix: str = "") -> list[tuple[str, zarr.Array]]:
    out = [(prefix + name, arr) for name, arr in group.arrays()]
    for name, sub in group.groups():
        out += _arrays(sub, f"{prefix}{name}/")
    return out


def test_every_array_of_every_store_has_units_and_long_name(finished: Path) -> None:
    stores = _stores(finished)
    assert set(stores) == {"tokens", "masks", "train", "predictions", "embeddings", "fisher", "shard", "summary"}
    n = 0
    for paths in stores.values():
        for path in paths:
            for name, arr in _arrays(zarr.open_group(str(path), mode="r")):
                for attr in store.CF_ATTRS:
                    value = arr.attrs.get(attr)
                    assert isinstance(value, str) and value.strip(), f"{path.name}:{name} has no {attr}"
                n += 1
    assert n > 150  # summary ~100, fisher diagonal ~40, the rest
    # the tokens store holds the new record and vocabulary arrays
    tokens = zarr.open_group(str(stores["tokens"][0]), mode="r")
    assert {"token_text", "record_name", "record_start", "record_end"} <= set(tokens.array_keys())


def test_every_variable_of_the_results_tree_has_units_and_long_name(finished: Path) -> None:
    import toolkit

    tree = toolkit.open_results(finished)
    n = 0
    for node in tree.subtree:
        for name, var in node.to_dataset().variables.items():
            for attr in store.CF_ATTRS:
                assert str(var.attrs.get(attr, "")).strip(), f"{node.path}:{name} has no {attr}"
            assert var.dtype.kind != "T", f"{node.path}:{name} is a StringDType"
            n += 1
    assert n > 150
    units = tree["summary"].to_dataset()
    assert units.entropy_bits.attrs["units"] == "bit"
    assert units.unigram_entropy_bits.attrs["units"] == "bit/token"
    assert tree["predictions/r"].to_dataset().log_probs.attrs["units"] == "nat"


def test_a_schema_array_without_units_or_long_name_fails_at_load(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    doc = json.loads((store.SCHEMA_DIR / "train.json").read_text())
    for attr in store.CF_ATTRS:
        bad = json.loads(json.dumps(doc))
        del bad["arrays"]["lr"][attr]
        (tmp_path / "train.json").write_text(json.dumps(bad))
        monkeypatch.setattr(store, "SCHEMA_DIR", tmp_path)
        store.schema.cache_clear()
        try:
            with pytest.raises(StoreError, match=f"array 'lr' has no '{attr}'"):
                store.schema("train")
        finally:
            store.schema.cache_clear()
    # the real schemas all load
    monkeypatch.undo()
    for path in store.SCHEMA_DIR.glob("*.json"):
        store.schema(path.stem)


def test_store_of_an_older_toolkit_gets_the_schema_attributes_when_opened(finished: Path,
                                                                          tmp_path: Path) -> None:
    import shutil

    path = tmp_path / "train.zarr"
    shutil.copytree(finished / "members" / "r" / "seed1" / "train.zarr", path)
    meta = path / "loss" / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"] = {"units": "nats"}  # as an older toolkit wrote it
    meta.write_text(json.dumps(doc))
    (path / store.INVENTORY).unlink()
    zarr.consolidate_metadata(str(path))
    store.write_inventory(path, "train")
    ds = store.open_dataset(path, "train")
    assert ds.loss.attrs["units"] == "nat" and ds.loss.attrs["long_name"] == "training masked-LM loss"


def test_token_text_is_a_coordinate_that_matches_the_tokenizer(finished: Path) -> None:
    import toolkit
    from toolkit.tokenizers import load_tokenizer

    study = load_study(finished / "study.json")
    tree = toolkit.open_results(finished)
    for run in ("r", "c"):
        want = load_tokenizer(Layout(study).run_tokens_dir(run) / "tokenizer.json").id_to_token()
        pred = tree[f"predictions/{run}"].to_dataset()
        assert pred.token_text.dims == ("vocab",) and pred.token_text.dtype.kind == "U"
        assert pred.token_text.values.tolist() == want
        emb = tree[f"embeddings/{run}"].to_dataset()
        assert emb.token_text.dims == ("token",) and emb.token_text.values.tolist() == want
        diag = tree[f"fisher_diagonal/{run}"].to_dataset()
        words = diag["bert.embeddings.word_embeddings.weight"]
        coord = words.dims[3] + ".token_text"
        assert words[coord].values.tolist() == want
        assert diag["cls.predictions.bias"][diag["cls.predictions.bias"].dims[3] + ".token_text"].values.tolist() == want
    assert want[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # selecting by text reads the same numbers as selecting by id
    lp = tree["predictions/r"].to_dataset().log_probs
    i = lp.token_text.values.tolist().index("ACG")
    by_text = lp.swap_dims(vocab="token_text").sel(token_text="ACG", member=1).values
    np.testing.assert_array_equal(by_text, lp.isel(vocab=i).sel(member=1).values)


def test_the_open_results_docstring_examples_run_and_plot(finished: Path, tmp_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import toolkit
    from toolkit.results import open_results

    lines = [line.strip()[4:] for line in open_results.__doc__.splitlines()
             if line.strip().startswith(">>> ")]
    assert any("plot.line(x=\"group\"" in line for line in lines)
    # The docstring's study and run names -> this study's (run r: 3-mers, seeds 1 and 2).
    swap = {"studies/demo": str(finished), "dna-6mer": "r", "ACGTAC": "ACG", "k=10": "k=3"}
    env: dict = {"toolkit": toolkit}
    for i, line in enumerate(lines):
        for old, new in swap.items():
            line = line.replace(old, new)
        exec(compile(line, f"<example {i}>", "exec"), env)
        if ".plot" in line:
            plt.gcf().savefig(tmp_path / f"example{i}.png")
            plt.close("all")
            assert (tmp_path / f"example{i}.png").stat().st_size > 1000
    # the summary's string labels are fixed-width numpy strings (xarray plots no StringDType)
    s = env["s"]
    assert s.group.dtype.kind == "U" and s.run.dtype.kind == "U" and s.corpus.dtype.kind == "U"


# --------------------------------------------------------------------------- source coordinates

GENOME_STUDY = """
[study]
name = "genome"
output_dir = {out}
[corpora.genome]
source = "genome.fa"
train_records = 1000
eval_records = 4
dna = {{ piece_min = 200, piece_max = 500, n_run_split = 20 }}
[runs.k3]
corpus = "genome"
tokenizer = "kmer3"
[runs.k3o]
corpus = "genome"
tokenizer = "kmer3-overlap"
[runs.ch]
corpus = "genome"
tokenizer = "char"
[runs.bpe]
corpus = "genome"
tokenizer = "bpe48"
"""


def _genome(rng: np.random.Generator) -> dict[str, str]:
    """Two chromosomes with lowercase, IUPAC codes, short N runs (kept) and long ones (split)."""
    out = {}
    for name, length in (("chrA", 4000), ("chrB.2", 2500)):
        seq = list("".join(rng.choice(list("ACGTacgt"), length)))
        for at in rng.integers(0, length - 100, 6):
            seq[at:at + 3] = "NNN"  # short run: stays inside a piece
        seq[1500:1560] = "N" * 60  # long run: the record is split into segments here
        seq[700] = "R"  # IUPAC: read as N
        out[name] = "".join(seq)
    return out


def test_tokens_map_back_to_genome_coordinates(tmp_path: Path) -> None:
    from toolkit.prepare import prepare_unit
    from toolkit.results import token_source

    rng = np.random.default_rng(7)
    genome = _genome(rng)
    with open(tmp_path / "genome.fa", "w") as f:
        for name, seq in genome.items():
            f.write(f">{name} some description\n")
            f.writelines(seq[i:i + 70] + "\n" for i in range(0, len(seq), 70))
    (tmp_path / "study.toml").write_text(GENOME_STUDY.format(out=json.dumps(str(tmp_path / "out"))))
    study = load_study(tmp_path / "study.toml")
    truth = {name: re.sub("[^ACGTN]", "N", seq.upper()) for name, seq in genome.items()}
    for run in study.runs.values():
        folder = prepare_unit(study, run.corpus, run.tokenizer)
        group = zarr.open_group(str(folder / "tokens.zarr"), mode="r")
        names = np.asarray(group["record_name"][...]).astype(object)
        first, last = np.asarray(group["record_start"][...]), np.asarray(group["record_end"][...])
        offsets = np.asarray(group["offsets"][...])
        text = store.fixed_strings(group["token_text"][...])
        tokens = np.asarray(group["tokens"][...])
        assert set(names) == set(genome) and len(names) > 8
        # records are pieces: each is the genome's bases between its start and end
        for r in range(len(names)):
            assert last[r] - first[r] == int(group["record_symbols"][r])
        # every token of every record: its span in the genome spells its text
        rec = np.repeat(np.arange(len(names)), np.diff(offsets))
        tok = np.arange(len(tokens)) - offsets[rec]
        span = token_source(folder, rec, tok)
        assert span.name.dtype.kind == "U" and span.start.shape == tokens.shape
        for r, t, name, a, b in zip(rec, tok, span.name, span.start, span.end, strict=True):
            want = text[tokens[offsets[r] + t]]
            if want == "[UNK]":  # a k-mer window holding an N
                assert "N" in truth[name][a:b]
            else:
                assert truth[name][a:b] == want, (run.tokenizer, r, t)
        if run.tokenizer == "kmer3-overlap":  # windows with an N are [UNK] but span 3 bases
            unk = np.flatnonzero(tokens == 1)
            assert len(unk) and all(span.end[unk] - span.start[unk] == 3)
        if run.tokenizer == "bpe48":
            assert "token_start" in group.array_keys()
        else:
            assert "token_start" not in group.array_keys()  # spans follow from the ids
    # a known token by hand: the first 3-mer of the first piece of chrA starts at base 0
    k3 = Layout(study).tokens_dir("genome", "kmer3")
    span = token_source(k3, 0, [0, 1])
    assert span.name.tolist() == ["chrA", "chrA"] and span.start.tolist() == [0, 3]
    with pytest.raises(IndexError, match="record 0 has"):
        token_source(k3, 0, 10**6)


def test_masked_positions_map_to_record_tokens_and_source(finished: Path) -> None:
    """The recipe of the token_source docstring: position -> (record, token) -> source."""
    from toolkit.results import position_source, token_source

    folder = Layout(load_study(finished / "study.json")).run_tokens_dir("r")
    masks = zarr.open_group(str(next(folder.glob("masks-*.zarr"))), mode="r")["distribution"]
    seq = np.asarray(masks["position_sequence"][...])
    offset = np.asarray(masks["position_offset"][...])
    record = np.asarray(masks["record"][...])[seq]
    tokens = zarr.open_group(str(folder / "tokens.zarr"), mode="r")
    ids = np.asarray(tokens["tokens"][...])
    at = np.asarray(tokens["offsets"][...])[record] + offset - 1
    labels = np.asarray(masks["labels"][...])[seq, offset]
    np.testing.assert_array_equal(ids[at], labels)
    target = zarr.open_group(str(finished / "members" / "r" / "seed1" / "predictions.zarr"), mode="r")
    np.testing.assert_array_equal(np.asarray(target["target"][...]), labels)
    span = token_source(folder, record, offset - 1)
    # Markov records are whole sources ("markov:<i>", from 0) of 3-mers laid end to end
    assert all(n.startswith("markov:") for n in span.name)
    np.testing.assert_array_equal(span.start, 3 * (offset - 1))
    np.testing.assert_array_equal(span.end - span.start, 3)
    # the same in one call, from the predictions' position index
    by_position = position_source(finished, "r", np.arange(len(seq)))
    for got, want in zip(by_position, span, strict=True):
        np.testing.assert_array_equal(got, want)
    with pytest.raises(IndexError, match="masked positions"):
        position_source(finished, "r", len(seq))
