"""Validation up front: every setting that would crash a later stage is refused by the CLI.

Each bad input goes through the real command line in-process (``toolkit.cli.main``)
and must end with exit status 2 and exactly one stderr line, ``toolkit: error: ...``,
naming the file and the key (or the offending corpus file), never a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from toolkit.cli import main
from toolkit.config import CorpusConfig, RunConfig, StudyConfig, load_study
from toolkit.corpora import open_corpus
from toolkit.errors import CorpusError

from .conftest import REPO

MINIMAL = """
[study]
name = "mini"
seeds = [1, 2]
[corpora.c]
source = "reads.fa"
[runs.r]
corpus = "c"
tokenizer = "kmer3"
"""


def write(tmp_path: Path, text: str = MINIMAL) -> Path:
    p = tmp_path / "study.toml"
    p.write_text(text)
    return p


def one_error_line(capsys: pytest.CaptureFixture[str], rc: int) -> str:
    """The single stderr line of a refused command (asserted), without its prefix."""
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("toolkit: error: "), err
    return err[len("toolkit: error: "):]


# (--set overrides, text the message must contain: the dotted key and the bad value)
BAD_OVERRIDES: list[tuple[list[str], str]] = [
    (["training.checkpoint_every_steps=0"], "training.checkpoint_every_steps = 0 is out of range; allowed: >= 1"),
    (["training.log_every_steps=0"], "training.log_every_steps = 0"),
    (["training.eval_every_steps=0"], "training.eval_every_steps = 0"),
    (["training.eval_batches=0"], "training.eval_batches = 0"),
    (["training.batch_size=0"], "training.batch_size = 0"),
    (["training.grad_accum=0"], "training.grad_accum = 0"),
    (["training.seq_len=4"], "training.seq_len = 4 is out of range; allowed: >= 8"),
    (["model.num_attention_heads=0"], "model.num_attention_heads = 0"),
    (["model.num_attention_heads=3"], "model: hidden_size 128 (shape 'tiny' with overrides) is not a multiple of num_attention_heads 3"),
    (["runs.r.model.hidden_size=129"], "runs.r.model: hidden_size 129"),
    (["model.shape='4M'", "model.hidden_size=250"], "model: hidden_size 250 (shape '4M'"),
    (["model.shape='bert-base'", "runs.r.model.num_attention_heads=7"], "runs.r.model: hidden_size 768"),
    (["model.hidden_size=0"], "model.hidden_size = 0"),
    (["model.num_hidden_layers=-1"], "model.num_hidden_layers = -1"),
    (["model.intermediate_size=0"], "model.intermediate_size = 0"),
    (["model.hidden_dropout_prob=1.5"], "model.hidden_dropout_prob = 1.5 is out of range; allowed: in [0, 1)"),
    (["model.attention_probs_dropout_prob=-0.1"], "model.attention_probs_dropout_prob = -0.1"),
    (["model.max_position_embeddings=100"], "model.max_position_embeddings = 100 is shorter than training.seq_len = 512"),
    (["analysis.seq_len=600"], "analysis.seq_len = 600 is longer than the 512 positions of model"),
    (["analysis.seq_len=2"], "analysis.seq_len = 2"),
    (["training.lr=0"], "training.lr = 0.0 is out of range; allowed: > 0"),
    (["training.lr=-1e-4"], "training.lr = -0.0001"),
    (["training.lr=nan"], "'training.lr' = nan is not valid; expected a finite number"),
    (["training.epochs=nan"], "'training.epochs' = nan"),
    (["training.epochs=inf"], "'training.epochs' = inf"),
    (["training.epochs=0"], "training.epochs = 0.0"),
    (["training.tokens=0"], "training.tokens = 0"),
    (["training.steps=-5"], "training.steps = -5"),
    (["training.warmup_ratio=inf"], "'training.warmup_ratio' = inf"),
    (["training.warmup_ratio=1"], "training.warmup_ratio = 1.0"),
    (["training.weight_decay=-0.1"], "training.weight_decay = -0.1"),
    (["training.grad_clip=-1"], "training.grad_clip = -1.0"),
    (["training.grad_clip=nan"], "'training.grad_clip' = nan"),
    (["training.mlm_probability=1"], "training.mlm_probability = 1.0"),
    (["training.checkpoint_every_minutes=0"], "training.checkpoint_every_minutes = 0.0"),
    (["training.checkpoint_every_minutes=-inf"], "'training.checkpoint_every_minutes' = -inf"),
    (["training.fisher_flow=[0.5, nan]"], "'training.fisher_flow[1]' = nan"),
    (["training.fisher_flow=[0.5, 1.0]"], "training.fisher_flow[1] = 1.0 is out of range; allowed: each value in (0, 1)"),
    (["analysis.distribution_mask_rate=0"], "analysis.distribution_mask_rate = 0.0"),
    (["analysis.fisher_mask_rate=nan"], "'analysis.fisher_mask_rate' = nan"),
    (["analysis.top_p=[0.5, 1.5]"], "analysis.top_p[1] = 1.5"),
    (["analysis.top_p=[inf]"], "'analysis.top_p[0]' = inf"),
    (["analysis.top_p=[]"], "analysis.top_p is empty"),
    (["analysis.topk=[5, 5]"], "analysis.topk = [5, 5] repeats 5"),
    (["analysis.topk=[0]"], "analysis.topk[0] = 0"),
    (["analysis.confidence=1"], "analysis.confidence = 1.0"),
    (["analysis.confidence=nan"], "'analysis.confidence' = nan"),
    (["analysis.rbf_sigma=-1"], "analysis.rbf_sigma = -1.0"),
    (["analysis.rbf_sigma=inf"], "'analysis.rbf_sigma' = inf"),
    (["analysis.batch_size=0"], "analysis.batch_size = 0"),
    (["analysis.eval_records=0"], "analysis.eval_records = 0 is out of range"),
    (["analysis.fisher_records=0"], "analysis.fisher_records = 0"),
    (["analysis.contextual_records=0"], "analysis.contextual_records = 0"),
    (["analysis.bootstrap=0"], "analysis.bootstrap = 0"),
    (["analysis.entropy_orders=0"], "analysis.entropy_orders = 0"),
    (["analysis.entropy_max_tokens=0"], "analysis.entropy_max_tokens = 0"),
    (["analysis.fisher_estimators=[]"], "analysis.fisher_estimators is empty"),
    (["study.seeds=[-1, 2]"], "study.seeds[0] = -1 is out of range; allowed: each value >= 0"),
    (["study.seeds=[3, 3]"], "study.seeds = [3, 3] repeats 3"),
    (["study.data_seed=-1"], "study.data_seed = -1"),
    (["analysis.mask_seed=-1"], "analysis.mask_seed = -1"),
    (["corpora.c.split_seed=-2"], "corpora.c.split_seed = -2"),
    (["corpora.c.synthetic.seed=-1"], "corpora.c.synthetic.seed = -1"),
    (["corpora.c.synthetic.entropy_rate=nan"], "'corpora.c.synthetic.entropy_rate' = nan"),
    (["corpora.c.synthetic.length=0"], "corpora.c.synthetic.length = 0"),
    (["corpora.c.source='synthetic:markov'", "corpora.c.synthetic.order=20"], "corpora.c.synthetic.order = 20"),
    (["corpora.c.max_records=0"], "corpora.c.max_records = 0"),
    (["corpora.c.train_records=0"], "corpora.c.train_records = 0"),
    (["corpora.c.eval_records=0"], "corpora.c.eval_records = 0"),
    (["corpora.c.dna.n_run_split=-1"], "corpora.c.dna.n_run_split = -1"),
    (["corpora.c.dna.piece_max=10"], "corpora.c.dna.piece_max = 10 is below piece_min = 1000"),
    (["corpora.c.text.field=''"], "corpora.c.text.field is empty"),
    (["runs=3"], "'runs' = 3 is not valid; expected a table"),
    (["model=3"], "'model' = 3 is not valid; expected a table"),
    (["runs.r.model=3"], "'runs.r.model' = 3 is not valid; expected a table"),
    (["runs.r=3"], "'runs.r' = 3 is not valid; expected a table"),
    (["training=3"], "'training' = 3 is not valid; expected a table"),
    (["dispatch.resources=3"], "'dispatch.resources' = 3 is not valid; expected a table of tables"),
    (["study.name.x=1"], "override 'study.name.x': 'study.name' is 'mini', not a table"),
    (["training..steps=1"], "override key 'training..steps' has an empty part"),
    (["runs.r.tokenizer='kmer11'"], "runs.r.tokenizer: 'kmer11': k = 11"),
    (["corpora.c.kind='text'"], "runs.r.tokenizer: 'kmer3' needs DNA but corpus 'c' is text"),
    (["dispatch.max_parallel=0"], "dispatch.max_parallel = 0"),
    (["dispatch.resources.train.time_minutes=0"], "dispatch.resources.train.time_minutes = 0"),
    (["dispatch.resources.train.cpus_per_task=0"], "dispatch.resources.train.cpus_per_task = 0"),
    (["dispatch.resources.evaluate.gpus_per_node=-1"], "dispatch.resources.evaluate.gpus_per_node = -1"),
    (["dispatch.resources.prepare.array_parallelism=0"], "dispatch.resources.prepare.array_parallelism = 0"),
    (["dispatch.resources.analyse.mem_gb=nan"], "'dispatch.resources.analyse.mem_gb' = nan"),
    (["dispatch.resources.analyse.mem_gb=0"], "dispatch.resources.analyse.mem_gb = 0.0"),
    # Values written into job scripts: a newline would start a new shell line or #SBATCH directive.
    (['study.output_dir="out\\nrm -rf ~"'], "study.output_dir = 'out\\nrm -rf ~' holds the control character '\\n'"),
    (['dispatch.resources.train.partition="gpu\\n#SBATCH --exclusive"'], "dispatch.resources.train.partition = "),
    (['dispatch.resources.train.account="acct\\r"'], "dispatch.resources.train.account = "),
    (['dispatch.resources.train.qos="q\\u001b"'], "dispatch.resources.train.qos = "),
    (['dispatch.resources.train.extra_sbatch={constraint="a100\\nhostname"}'], "dispatch.resources.train.extra_sbatch.constraint = "),
    (['dispatch.resources.train.extra_sbatch={"--constraint"="a100"}'], "dispatch.resources.train.extra_sbatch: '--constraint' is not an sbatch option name"),
    (['dispatch.resources.train.extra_sbatch={"a b"="1"}'], "dispatch.resources.train.extra_sbatch: 'a b' is not an sbatch option name"),
    (['dispatch.resources.train.setup=["module load cuda\\nrm -rf ~"]'], "dispatch.resources.train.setup[0] = "),
    (['dispatch.container.image="img.sif\\n"'], "dispatch.container.image = "),
    (['dispatch.container.binds=["/data", "/x\\ny"]'], "dispatch.container.binds[1] = "),
    (['dispatch.container.scratch="/scratch\\t"'], "dispatch.container.scratch = "),
    (['corpora.c.source="reads\\n.fa"'], "corpora.c.source = "),
    (['runs.r.checkpoints=["a\\nb", "c"]'], "runs.r.checkpoints[0] = "),
]


@pytest.mark.parametrize(("overrides", "expected"), BAD_OVERRIDES,
                         ids=[" ".join(o) for o, _ in BAD_OVERRIDES])
def test_bad_setting_is_one_line_naming_file_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], overrides: list[str], expected: str) -> None:
    path = write(tmp_path)
    argv = ["validate", str(path)]
    for item in overrides:
        argv += ["--set", item]
    msg = one_error_line(capsys, main(argv))
    assert msg.startswith(f"{path}: "), msg
    assert expected in msg, msg


@pytest.mark.parametrize(("table", "expected"), [
    ("[training]\nlog_every_steps = 0\n", "training.log_every_steps = 0"),
    ("[model]\nshape = '20M'\nnum_attention_heads = 5\n", "model: hidden_size 512 (shape '20M'"),
    ("[dispatch.resources.train]\npartition = \"\"\"gpu\n#SBATCH --exclusive\"\"\"\n", "dispatch.resources.train.partition"),
    ("[training]\nepochs = nan\n", "'training.epochs' = nan"),
])
def test_bad_study_file_is_one_line_naming_file_and_key(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], table: str, expected: str) -> None:
    """The same checks apply to what the study file itself says (not only to --set)."""
    path = write(tmp_path, MINIMAL + table)
    for command in (["validate", str(path)], ["train", str(path), "--member", "r/seed1"]):
        msg = one_error_line(capsys, main(command))
        assert msg.startswith(f"{path}: ") and expected in msg, msg


def test_out_with_a_newline_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path)
    msg = one_error_line(capsys, main(["validate", str(path), "--out", "studies/x\n#SBATCH --x"]))
    assert msg.startswith(f"{path}: --out = ") and "control character '\\n'" in msg


@pytest.mark.parametrize("command", [
    ["run"], ["prepare"], ["train", "--member", "r/seed1"], ["evaluate", "--member", "r/seed1"],
    ["analyse"], ["report"], ["submit"], ["unit", "prepare", "c--kmer3"],
])
@pytest.mark.parametrize("where", ["file", "below-file", "loop"])
def test_unwritable_output_folder_is_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], command: list[str], where: str) -> None:
    path = write(tmp_path)
    (tmp_path / "afile").write_text("not a folder\n")
    os.symlink("loop", tmp_path / "loop")
    out = {"file": tmp_path / "afile", "below-file": tmp_path / "afile" / "sub",
           "loop": tmp_path / "loop"}[where]
    msg = one_error_line(capsys, main([command[0], str(path), *command[1:], "--out", str(out)]))
    assert msg.startswith(f"{out}: cannot create the study folder ("), msg
    assert msg.endswith("choose a writable output_dir (--out)\n"), msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        msg = one_error_line(capsys, main(["run", str(path), "--out", str(ro / "study")]))
    finally:
        ro.chmod(0o755)
    assert "cannot create the study folder (Permission denied)" in msg


def _link_loop(d: Path) -> str:
    os.symlink("loop", d / "loop")
    return "loop"


def _folder_with_loop(d: Path) -> str:
    (d / "data").mkdir()
    (d / "data" / "a.fa").write_text(">r\nACGTACGT\n")
    os.symlink("loop", d / "data" / "loop")
    return "data"


def _glob_with_loop(d: Path) -> str:
    _folder_with_loop(d)
    return "data/*"


def _folder_with_link_to_ancestor(d: Path) -> str:
    (d / "data" / "sub").mkdir(parents=True)
    (d / "data" / "sub" / "a.fa").write_text(">r\nACGTACGT\n")
    os.symlink("..", d / "data" / "sub" / "up")
    return "data"


def _notes_beside_fasta(d: Path) -> str:
    (d / "data").mkdir()
    (d / "data" / "a.fa").write_text(">r\nACGTACGT\n")
    (d / "data" / "notes.txt").write_text("remember to re-download\n")
    return "data"


def _readme_beside_fasta(d: Path) -> str:
    (d / "data").mkdir()
    (d / "data" / "a.fa.gz").write_bytes(b"")
    (d / "data" / "README").write_text("downloaded 2024\n")
    return "data"


def _zarr_chunk_beside_fasta(d: Path) -> str:
    (d / "data" / "old.zarr" / "tokens" / "c" / "0").mkdir(parents=True)
    (d / "data" / "old.zarr" / "zarr.json").write_text("{}")
    (d / "data" / "old.zarr" / "tokens" / "c" / "0" / "0").write_bytes(b"\x00\x01")
    (d / "data" / "a.fa").write_text(">r\nACGTACGT\n")
    return "data"


def _glob_into_zarr(d: Path) -> str:
    _zarr_chunk_beside_fasta(d)
    return "data/**/*"


@pytest.mark.parametrize(("make", "expected"), [
    (_link_loop, "loop: symbolic link loop"),
    (_folder_with_loop, "data/loop: symbolic link loop"),
    (_glob_with_loop, "data/loop: symbolic link loop"),
    (_folder_with_link_to_ancestor, "symbolic link loop"),
    (_notes_beside_fasta, "data/notes.txt: folder"),
    (_readme_beside_fasta, "data/README: not a corpus file"),
    (_zarr_chunk_beside_fasta, "data/old.zarr: a Zarr store inside corpus folder"),
    (_glob_into_zarr, "matches a file inside a Zarr store"),
])
def test_bad_corpus_path_is_one_line_naming_the_file(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
        make, expected: str) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.chdir(tmp_path)
    source = make(tmp_path)
    msg = one_error_line(capsys, main(["corpus-stats", source, "--tokenizer", "kmer3"]))
    assert expected in msg and str(tmp_path) in msg, msg


def test_prepare_refuses_a_looping_corpus_link(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, MINIMAL.replace('"reads.fa"', '"loop"'))
    os.symlink("loop", tmp_path / "loop")
    msg = one_error_line(capsys, main(["prepare", str(path), "--out", str(tmp_path / "out")]))
    assert msg.startswith(f"{tmp_path / 'loop'}: symbolic link loop"), msg


def test_corpus_folder_never_reads_the_study_outputs(tmp_path: Path) -> None:
    """source = "." with the output folder inside it: the outputs are not data."""
    (tmp_path / "a.fa").write_text(">r\nACGTACGTACGT\n")
    out = tmp_path / "studies" / "mini"
    (out / "tokens").mkdir(parents=True)
    (out / "study.json").write_text("{}")
    (out / "tokens" / "leak.fa").write_text(">x\nAAAA\n")
    # The study file itself (study.toml, in the corpus folder) is not data either.
    path = write(tmp_path, MINIMAL.replace('"reads.fa"', '"."').replace(
        'seeds = [1, 2]', f'seeds = [1, 2]\noutput_dir = "{out}"'))
    files = [p for p, _ in open_corpus("c", load_study(path)).files]  # type: ignore[attr-defined]
    assert files == [tmp_path / "a.fa"]
    # The same folder with the outputs elsewhere: the walk meets study.json, so the
    # exclusion above is what kept it (and tokens/leak.fa) out.
    elsewhere = load_study(path, [f"study.output_dir='{tmp_path.parent / 'elsewhere'}'"])
    with pytest.raises(CorpusError, match=r"study.json: folder .* mixes FASTA files"):
        open_corpus("c", elsewhere)


def test_hidden_files_are_skipped_and_listed(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.fa").write_text(">r\nACGTACGTACGT\n")
    (tmp_path / "data" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    study = StudyConfig(name="s", corpora={"c": CorpusConfig(source=str(tmp_path / "data"))},
                        runs={"r": RunConfig(corpus="c", tokenizer="kmer3")},
                        output_dir=str(tmp_path / "out"))
    with caplog.at_level("INFO", logger="toolkit.corpora"):
        files = [p for p, _ in open_corpus("c", study).files]  # type: ignore[attr-defined]
    assert files == [tmp_path / "data" / "a.fa"]
    assert "skipping 1 hidden file(s) or folder(s): .DS_Store" in caplog.text


@pytest.mark.parametrize("name", ["demo.toml", "paper.toml", "entropy-sweep.toml"])
def test_shipped_studies_still_validate(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(REPO / "jobs" / name)]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out.startswith("study ")


def test_boundary_values_are_accepted(tmp_path: Path) -> None:
    """The edges of every range that are allowed stay allowed (the checks are not off by one)."""
    study = load_study(write(tmp_path), [
        "training.grad_clip=0", "training.warmup_ratio=0", "training.weight_decay=0",
        "model.hidden_dropout_prob=0", "model.num_hidden_layers=0", "study.seeds=[0]",
        "study.data_seed=0", "analysis.top_p=[1.0]", "analysis.bootstrap=1",
        "analysis.entropy_orders=1", "analysis.seq_len=3", "dispatch.resources.train.gpus_per_node=0",
        "model.shape='bert-base'", "runs.r.model.num_attention_heads=6",
        'dispatch.resources.train.extra_sbatch={"mail-type"="END"}',
        'dispatch.resources.train.setup=["module load cuda/12\\tx"]',
    ])
    assert study.training.grad_clip == 0 and study.runs["r"].model.num_attention_heads == 6
