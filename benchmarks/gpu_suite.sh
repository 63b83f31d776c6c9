#!/usr/bin/env bash
# One GPU session, under 8 minutes: the kernel tests compiled on the GPU (every test in
# tests/kernels, the @pytest.mark.gpu ones included; no interpreter), then the three GPU
# benchmarks with modest repetition. Logs go to $OUT (default ./gpu_out). Each step has its
# own time limit so a slow one cannot starve the rest; the script's status is the tests'.
#
# Run from the repository root:  bash benchmarks/gpu_suite.sh
set -uo pipefail
OUT="${OUT:-gpu_out}"
mkdir -p "$OUT"
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}."
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"

step() {  # step NAME SECONDS CMD...: run with a time limit, log to $OUT/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  echo "=== $name: exit $rc after $((SECONDS - t0))s"
  return "$rc"
}

{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda)"
  date -u +"%Y-%m-%d %H:%M UTC"
} 2>&1 | tee "$OUT/device.txt"

step tests 180 "$PY" -m pytest -q -p no:cacheprovider --durations=8 tests/kernels
tests_rc=$?
step moe_gpu 100 "$PY" benchmarks/moe_gpu.py --reps 10
step attention_gpu 60 "$PY" benchmarks/attention_gpu.py --reps 5
step model_gpu 80 "$PY" benchmarks/model_gpu.py --batch 4 --seq 1024 --reps 3
echo "=== suite done in ${SECONDS}s; tests exit $tests_rc"
exit "$tests_rc"
