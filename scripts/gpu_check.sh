#!/usr/bin/env bash
# One command for a GPU machine without internet access (torch, Triton and pytest already there):
# build the extension for the visible GPU, run the whole test suite on it (Triton compiled, not
# interpreted), then the benchmarks. Exits non-zero on the first failure.
# Results go to $OUT (default ./gpu_results): test log, `info`, benchmark JSON and plot.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
# No TORCH_CUDA_ARCH_LIST: with a GPU visible, torch builds for its architecture.
"$PY" setup.py -q build_ext --inplace 2>&1 | tail -20
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -m swa_fast info | tee "$OUT/info.txt"
TRITON_INTERPRET=0 SWA_FAST_EXPECT_CUDA=1 "$PY" -m pytest tests -q -rs 2>&1 | tee "$OUT/tests.txt"
test "${PIPESTATUS[0]}" -eq 0
"$PY" benchmarks/run.py --full --out "$OUT" 2>&1 | tee "$OUT/bench.txt"
