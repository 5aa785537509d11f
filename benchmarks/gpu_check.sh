#!/usr/bin/env bash
# GPU readiness check (issue 11): training tokens/s and MFU of the toolkit's loop against HF
# Trainer (bert-base, 20M, tiny; fp32 and bf16), per-example Fisher cost on bert-base, and a tiny
# study end to end on the GPU, in under 8 minutes; numbers printed and written to one JSON file.
# What is measured and how: benchmarks/gpu_check.py's docstring. Options: --help.
#
#   bash benchmarks/gpu_check.sh                  # full run on the GPU that torch sees (~6-7 min)
#   bash benchmarks/gpu_check.sh --smoke --device cpu   # seconds-long CPU run (CI: tests/test_gpu_check.py)
#   make gpu-check                                # the full run, through the Makefile
#   srun --gres=gpu:1 --time=00:15:00 bash benchmarks/gpu_check.sh --out gpu_check.json   # cluster node
#
# JSON: --out FILE, else $OUT/gpu_check.json when OUT is set, else studies/gpu_check.json. When
# OUT is set the whole output is also kept in $OUT/gpu_check.log.
#
# Python: $PYTHON if set, else the project venv (.venv/bin/python, as `make install` makes it;
# it needs a CUDA build of torch on a GPU node), else python3.
#
# The project's device machine (the `run` tool; /work/.library/device/README.md, KINDS.md), as
# read on 2026-12-01, never yet tried with this script:
# - python3 there is /opt/torch/.venv (Python 3.12, torch 2.11+cu130, transformers 5.x,
#   accelerate, tokenizers, safetensors, numpy, scipy, xarray, matplotlib, psutil, tqdm); it has
#   no network, so no pip from an index. The project venv (CPU torch, far over the 64 MiB that
#   `carry` takes) is NOT carried.
# - The toolkit's dependencies missing from that image (zarr, numcodecs, donfig, google-crc32c,
#   crc32c, dask, partd, locket, submitit: ~11 MB) travel as cp312 wheels in .whl/ (ignored by
#   git). Fetch them here first, where pip reaches an index:
#       bash benchmarks/gpu_check.sh --download-wheels .whl
#   This script installs them with pip --no-index into a temporary --target folder when the
#   imports fail and .whl/ holds wheels, and puts it and the repo on PYTHONPATH (the study's
#   local-executor units are new python processes that must import both).
# - Then one call (it needs ~7 of the session's 15 device minutes plus the machine's start):
#       run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=540)
#   Results: $OUT/gpu_check.json and $OUT/gpu_check.log come back with the reply.
# A hard `timeout` (GPU_CHECK_TIMEOUT, default 470 s) backs up the script's own 420 s deadline.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$(pwd)

if [[ -n "${PYTHON:-}" ]]; then py=$PYTHON
elif [[ -x .venv/bin/python ]]; then py=.venv/bin/python
else py=python3
fi

if [[ -n "${OUT:-}" && -d "${OUT}" ]]; then
  exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi

for arg in "$@"; do
  if [[ "$arg" == --download-wheels || "$arg" == -h || "$arg" == --help ]]; then
    exec "$py" -m benchmarks.gpu_check "$@"
  fi
done

export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
need='import zarr, numcodecs, crc32c, dask, submitit'
if ! "$py" -c "$need" 2>/dev/null; then
  shopt -s nullglob
  wheels=(.whl/*.whl)
  if (( ${#wheels[@]} == 0 )); then
    echo "gpu_check: $py lacks the toolkit's dependencies ($need failed) and .whl/ holds no wheels;" \
         "run 'bash benchmarks/gpu_check.sh --download-wheels .whl' where pip reaches an index" >&2
    exit 2
  fi
  site="${TMPDIR:-/tmp}/gpu_check_site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "${wheels[@]}"
  export PYTHONPATH="$repo:$site${PYTHONPATH#"$repo"}"
  "$py" -c "$need"
fi

# Nothing may reach a model hub; plots without a display.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 MPLBACKEND=Agg \
       TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
exec timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT:-470}" "$py" -m benchmarks.gpu_check "$@"
