#!/usr/bin/env bash
# The GPU checks in one call on a lent machine (its python3 has torch; .whl carries timm and the
# lite0 weights, .peer/timm_train.py is timm's train.py): the whole suite, then benchmarks/gpu.py.
# Usage: bash benchmarks/device_check.sh TEST_SECONDS BENCH_SECONDS "BENCH ARGS" [PYTEST ARGS...]; logs under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export TRANSFERKIT_TEST_SKIP_MISSING=1 PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 TRANSFERKIT_CACHE=/tmp/tk-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
tests=$1 bench=$2 bench_args=$3; shift 3
if [ "$tests" -gt 0 ]; then
  # The suite at once, in TEST_SECONDS: the CPU tests (GPU hidden; conftest) in xdist workers of 2 cores each on
  # all cores but 4, beside the `cuda` tests, one at a time, on those 4. PYTEST ARGS replace the CPU part's
  # selection. Logs go to files, not pipes: a test's leftover child processes would hold a pipe open.
  cores=$(nproc) && [ "$cores" -ge 8 ] || { echo "needs 8 cores or more"; exit 1; }
  [ $# -gt 0 ] || set -- -m "not slow and not cuda" tests
  pin() { if command -v taskset >/dev/null; then taskset -c "$@"; else shift; "$@"; fi; }
  TRANSFERKIT_TEST_FAILURES=$OUT/failures.log pin 0-$((cores - 5)) timeout -k 5 "$tests" \
    python3 -m pytest -q -p no:cacheprovider -n $(((cores - 4) / 2)) --timeout 240 -rs "$@" >"$OUT/tests.log" 2>&1 &
  TRANSFERKIT_TEST_FAILURES=$OUT/failures-cuda.log pin $((cores - 4))-$((cores - 1)) timeout -k 5 "$tests" \
    python3 -m pytest -q -p no:cacheprovider -m cuda -rs tests/test_cuda.py >"$OUT/cuda.log" 2>&1
  wait
  tail -15 "$OUT/cuda.log"; tail -30 "$OUT/tests.log"
fi
if [ "$bench" -gt 0 ]; then
  timeout "$bench" python3 benchmarks/gpu.py --timm-train .peer/timm_train.py --out "$OUT" $bench_args 2>&1 \
    | tee "$OUT/bench.log" | grep -v "^\[gpu-bench\] ladder\|^\[gpu-bench\] memory"
fi
