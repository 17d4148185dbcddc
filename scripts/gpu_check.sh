#!/usr/bin/env bash
# One command for a GPU machine without internet access (torch, Triton and pytest already there):
# build the extension if the checkout has none with CUDA kernels, run the GPU tests (Triton
# compiled, not interpreted), compute-sanitizer's memcheck and racecheck over a few of them (when
# it is on the machine), the benchmarks (lerp_ against the copy bandwidth and _foreach_lerp_ on the
# GPT-2, ViT-B and ResNet-50 shapes, fp32 and bf16 into fp32, and the sweep up to 1e9 elements),
# and a profiler trace of SideStream; then a summary. About 9 minutes on an H200.
#
#   scripts/gpu_check.sh          everything
#   scripts/gpu_check.sh quick    the GPU tests and one shape set (a first look, ~2 minutes)
#
# Results go to $OUT (default ./gpu_results): logs, `info`, benchmark JSON and plots, the trace.
# Every step runs even when one before failed; the exit status says whether all passed.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE="${1:-full}"
OUT="${OUT:-gpu_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
declare -a SUMMARY
FAILED=0
step() {  # step NAME LOG COMMAND...: runs it, keeps its output, records pass or fail
  local name="$1" log="$OUT/$2"
  shift 2
  local start=$SECONDS
  "$@" >"$log" 2>&1
  local rc=$?
  SUMMARY+=("$(printf '%-34s %s (%ds)  %s' "$name" "$([ $rc -eq 0 ] && echo ok || echo "FAILED rc=$rc")" $((SECONDS - start)) "$(tail -1 "$log" | cut -c1-110)")")
  [ $rc -eq 0 ] || FAILED=1
  return $rc
}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
# A checkout that brings its extension built with CUDA kernels (the build takes minutes) keeps it.
if ! "$PY" -c "from swa_fast import ops; assert ops.BUILD_INFO['cuda']" 2>/dev/null; then
  # Two architectures, to build in minutes (the default, every one torch supports, takes longer);
  # tests/test_build.py and test_machine_code.py check the ones the build recorded.
  step "build" build.txt env MAX_JOBS="$(nproc)" TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX" "$PY" setup.py build_ext --inplace
fi
"$PY" -m swa_fast info | tee "$OUT/info.txt"

GPU_TESTS=(tests/test_cuda.py tests/test_cuda_vector_path.py tests/test_rounding.py tests/test_pass_stats.py)
if [ "$MODE" != quick ]; then
  GPU_TESTS+=(tests/test_machine_code.py tests/test_triton_launchers.py tests/test_opcheck.py tests/test_ops.py)
fi
step "tests (GPU, Triton compiled)" tests.txt env TRITON_INTERPRET=0 SWA_FAST_EXPECT_CUDA=1 \
  "$PY" -m pytest "${GPU_TESTS[@]}" -q -rs

SANITIZER="$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1 || true)"
if [ -n "$SANITIZER" ]; then
  # Without the caching allocator every tensor is its own allocation, so an access past its end is
  # caught. The subset covers the vector path, the scalar tail and misaligned tensors, many tensors.
  SUBSET=(tests/test_cuda_vector_path.py::test_vector_and_scalar_paths_agree_bit_for_bit
          tests/test_cuda.py -k "(many_tensors and not triton) or vector_and_scalar")
  for tool in memcheck racecheck; do
    step "compute-sanitizer $tool" "sanitizer_$tool.txt" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 TRITON_INTERPRET=0 \
      "$SANITIZER" --tool "$tool" --error-exitcode 1 --target-processes all \
      "$PY" -m pytest "${SUBSET[@]}" -q -x -p no:cacheprovider
  done
else
  SUMMARY+=("compute-sanitizer                  not on this machine (PATH, /usr/local/cuda*/bin)")
fi

if [ "$MODE" = quick ]; then
  step "benchmarks (gpt2-small)" bench.txt "$PY" -m swa_fast bench --sets gpt2-small --min-run-time 0.1 --allow-missed --out "$OUT"
else
  step "benchmarks" bench.txt timeout 330 "$PY" -m swa_fast bench --full --sets gpt2-small vit-b16 resnet50 \
    --min-run-time 0.2 --allow-missed --out "$OUT"
  step "side stream trace" side_stream.txt "$PY" scripts/side_stream_trace.py "$OUT"
fi

echo
echo "=== summary ($OUT) ==="
printf '%s\n' "${SUMMARY[@]}"
if [ -f "$OUT/results.json" ]; then
  "$PY" - "$OUT/results.json" <<'EOF'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{r['meta']['gpu']}: device copy bandwidth {r['meta']['copy_GBps']:.0f} GB/s")
for target, value, met in r["targets"]:
    print(f"  {'met ' if met else 'MISS'} {target}: {value}")
for row in r["rows"]:
    if row["method"] == "swa_fast:cuda" and row["params"] in ("float32", "bfloat16"):
        print(f"  lerp_ {row['workload']:>22s} {row['params']:>8s}: {row['of_copy_bw']:.2f} of copy bw")
EOF
fi
exit $FAILED
