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
#   PYTHON=python3 bash ci/gpu-check.sh        # another interpreter (default: .venv's, else python3)
# JUnit results of the tests: $CI_OUT/junit/pytest-gpu.xml (CI_OUT defaults to ci-out).
#
# Exit status: the tests' (a failure fails the script); the benchmark runs either way.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
if [[ -z ${PYTHON:-} && -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; fi
PY=${PYTHON:-python3}
CI_OUT=${CI_OUT:-ci-out}
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
$PY -m pytest -m gpu -n 0 -rs -q -p no:cacheprovider --junitxml="$CI_OUT/junit/pytest-gpu.xml" ${GPU_TESTS:-tests}
tests_rc=$?

echo "== benchmark"
$PY benchmarks/gpu_runners.py --iterations "${BENCH_ITERATIONS:-200}" --warmup 20 ${BENCH_JSON:+--json "$BENCH_JSON"} \
  || echo "benchmark failed (exit $?)"
exit $tests_rc
