#!/usr/bin/env bash
# One-call GPU check (issue 16 item 6): the tests that take the `device` fixture with CUDA tensors,
# then benchmarks/bench_device.py (CUDA-event timing, peak memory); one summary table at the end.
# Sized for < 8 minutes on one H100. Run from the repository root:
#   bash benchmarks/gpu_check.sh                 # DEVICE=cuda
#   DEVICE=cpu bash benchmarks/gpu_check.sh      # dry run on CPU (smaller benchmark)
# Env: DEVICE (cuda), TEST_TIMEOUT (300 s), BENCH_TIMEOUT (150 s), BENCH_ARGS (overrides the sizes).
set -u
cd "$(dirname "$0")/.."
DEVICE="${DEVICE:-cuda}"
TEST_TIMEOUT="${TEST_TIMEOUT:-300}"
BENCH_TIMEOUT="${BENCH_TIMEOUT:-150}"
if [[ "$DEVICE" == cpu ]]; then
  BENCH_ARGS="${BENCH_ARGS:---quick}"
else
  BENCH_ARGS="${BENCH_ARGS:---n 1024 --repeats 5 --resnet --resnet-n 256}"
fi
LOG="${TMPDIR:-/tmp}/gpu_check.$$"
mkdir -p "$LOG"
start=$(date +%s)

python - <<PY
import torch
print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}", end="")
print(f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "")
PY

echo "== tests on $DEVICE (pytest -m device --device $DEVICE), log $LOG/tests.log"
t0=$(date +%s)
timeout "$TEST_TIMEOUT" python -m pytest -q -m device --device "$DEVICE" -p no:cacheprovider \
  -o addopts="" tests >"$LOG/tests.log" 2>&1
test_rc=$?
test_s=$(( $(date +%s) - t0 ))
test_line=$(grep -E '^[0-9]+ (passed|failed)|passed|failed|error' "$LOG/tests.log" | tail -1)
grep -E '^(FAILED|ERROR)' "$LOG/tests.log" | head -20

echo "== benchmarks on $DEVICE (bench_device.py $BENCH_ARGS), log $LOG/bench.log"
t0=$(date +%s)
# shellcheck disable=SC2086
timeout "$BENCH_TIMEOUT" python benchmarks/bench_device.py --device "$DEVICE" $BENCH_ARGS \
  >"$LOG/bench.out" 2>"$LOG/bench.log"
bench_rc=$?
bench_s=$(( $(date +%s) - t0 ))

echo
echo "== gpu_check summary ($DEVICE, $(( $(date +%s) - start )) s in all)"
echo "| step | exit | seconds | result |"
echo "|---|---:|---:|---|"
echo "| tests (-m device) | $test_rc | $test_s | ${test_line:-no summary: see $LOG/tests.log} |"
echo "| bench_device.py | $bench_rc | $bench_s | $( [[ $bench_rc == 0 ]] && echo table below || echo "see $LOG/bench.log (124: timed out)" ) |"
cat "$LOG/bench.out"
[[ $test_rc == 0 && $bench_rc == 0 ]]
