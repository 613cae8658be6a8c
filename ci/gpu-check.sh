#!/usr/bin/env bash
# Everything GPU-side in one go, for GPU runners and for a lent GPU machine:
#   1. what this machine can do (optimize doctor, or the raw facts when the package is not installed)
#   2. the `gpu`-marked tests: TensorRT builds and runs (skipped with the reason where TensorRT is missing),
#      the torch CUDA runner, CUDA-event timing, NVML memory
#   3. a short benchmark table of the GPU runners (benchmarks/gpu_runners.py)
#
#   bash ci/gpu-check.sh                       # from the repository root, with optimize installed
#   GPU_TESTS="tests/test_bench_gpu.py" bash ci/gpu-check.sh   # only these test files
#   BENCH_ITERATIONS=50 bash ci/gpu-check.sh   # a shorter benchmark
#
# Exit status: the tests' (a failure fails the script); the benchmark runs either way.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1

echo "== machine"
nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.total --format=csv,noheader 2>&1 || echo "nvidia-smi: not available"
if ! $PY -m optimize doctor 2>/dev/null; then
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'available', torch.cuda.is_available())"
  $PY -c "from optimize import gpu; print('NVML:', gpu.unavailable_reason() or [g.record() for g in gpu.gpus()])"
  $PY -c "from optimize.runtimes.tensorrt import unavailable_reason as r; print('TensorRT:', r() or 'available')"
fi

echo "== gpu tests"
# shellcheck disable=SC2086
$PY -m pytest -m gpu -rs -q -p no:cacheprovider ${GPU_TESTS:-tests}
tests_rc=$?

echo "== benchmark"
$PY benchmarks/gpu_runners.py --iterations "${BENCH_ITERATIONS:-200}" --warmup 20 ${BENCH_JSON:+--json "$BENCH_JSON"} \
  || echo "benchmark failed (exit $?)"
exit $tests_rc
