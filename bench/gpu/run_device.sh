#!/usr/bin/env bash
# Issue 13's GPU checks in one call of the device tool (under 8 minutes on an H100/H200):
#   1. build the CUDA extension as a user would;
#   2. the CUDA launchers' argument checks alone (a crash there must not hide the other tests);
#   3. `pytest -m gpu`;
#   4. the GPU benchmark (bench/gpu/linear_vs_floor.py): JSON into $OUT and bench/results/linear_gpu_cuda.json,
#      its table printed last.
# Usage: bench/gpu/run_device.sh [--dry-run]   (--dry-run: no build, CPU, tiny shapes; writes only to $OUT)
# Logs of every step go to $OUT (a temporary folder when OUT is unset); exit status: the first failed step.
set -u -o pipefail
cd "$(dirname "$0")/../.."
DRY_RUN=0
[[ "${1:-}" == "--dry-run" ]] && DRY_RUN=1
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
PYTHON=${PYTHON:-python}
[[ -x .venv/bin/python && $DRY_RUN == 1 ]] && PYTHON=.venv/bin/python
STATUS=0
step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, report
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "== $name: exit $rc, $((SECONDS - start)) s (log: $OUT/$name.log)"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   /'
  [[ $rc != 0 && $STATUS == 0 ]] && STATUS=$rc
  return $rc
}

if [[ $DRY_RUN == 0 ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
  MAX_JOBS=16 TORCH_CUDA_ARCH_LIST=9.0 HERON_BUILD_CUDA=1 \
    step build 240 "$PYTHON" -m pip install --no-build-isolation --no-deps -e . || { echo "build failed"; exit 1; }
  ARGCHECK="tests/kernels/test_launchers.py::test_cuda_invalid_arguments_are_rejected_with_their_names"
  if step cuda_argument_checks 60 "$PYTHON" -X faulthandler -m pytest -q -p no:cacheprovider "$ARGCHECK"; then
    DESELECT=()
  else
    DESELECT=(--deselect "$ARGCHECK")  # already run alone above; its crash (if any) is in its log
  fi
  step pytest_gpu 300 "$PYTHON" -X faulthandler -m pytest -m gpu -q -p no:cacheprovider "${DESELECT[@]}" \
    --junitxml="$OUT/pytest_gpu.xml"
  step bench 240 "$PYTHON" bench/gpu/linear_vs_floor.py --out "$OUT/linear_gpu_cuda.json" \
    && cp "$OUT/linear_gpu_cuda.json" bench/results/linear_gpu_cuda.json
else
  step pytest_gpu 300 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider tests/kernels/test_chunked_linear.py
  step bench 240 "$PYTHON" bench/gpu/linear_vs_floor.py --dry-run --out "$OUT/linear_gpu_dryrun.json"
fi
echo
[[ -f "$OUT/bench.log" ]] && cat "$OUT/bench.log"
exit $STATUS
