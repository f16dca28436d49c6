#!/usr/bin/env bash
# The GPU checks in one call on a lent machine (its python3 has torch; .whl carries timm and the
# lite0 weights, .peer/timm_train.py is timm's train.py): the `cuda` tests, then benchmarks/gpu.py.
# Usage: bash benchmarks/device_check.sh TEST_SECONDS BENCH_SECONDS "BENCH ARGS" [PYTEST ARGS...]; logs under $OUT.
set -u
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1 CUBLAS_WORKSPACE_CONFIG=:4096:8 TRANSFERKIT_CACHE=/tmp/tk-cache
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
tests=$1 bench=$2 bench_args=$3; shift 3
if [ "$tests" -gt 0 ]; then
  [ $# -gt 0 ] || set -- -m cuda tests/test_cuda.py
  # into a file, not a pipe: a test's leftover child processes would hold a pipe open past the timeout
  TRANSFERKIT_TEST_FAILURES=$OUT/failures.log timeout -k 5 "$tests" python3 -m pytest -q -p no:cacheprovider "$@" \
    >"$OUT/tests.log" 2>&1
  tail -40 "$OUT/tests.log"
fi
if [ "$bench" -gt 0 ]; then
  timeout "$bench" python3 benchmarks/gpu.py --timm-train .peer/timm_train.py --out "$OUT" $bench_args 2>&1 \
    | tee "$OUT/bench.log" | grep -v "^\[gpu-bench\] ladder\|^\[gpu-bench\] memory"
fi
