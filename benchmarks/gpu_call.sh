#!/usr/bin/env bash
# One lent-GPU call of the evidence program: many `gnmr-fx bench stability`
# commands side by side on the one GPU (CUDA MPS), optionally the GPU tests
# first-in-parallel, everything bundled into one file ($OUT/CALL.tgz) plus a
# readable log ($OUT/CALL.log), since a call brings back at most 8 files.
#   GNMR_COMMIT=<sha> bash benchmarks/gpu_call.sh CALL benchmarks/calls/CALL.spec
# SPEC: one bench per line, "NAME <bench stability arguments>"; '#' comments.
# Each bench is one arm group run seed after seed (--jobs 1 with a deadline),
# so a slow call loses whole later seeds, never half-finished ones.
# Every bench gets --deadline so that the call ends BUDGET seconds (default
# 540) after it started. GPU_TESTS=1 also runs tests/test_gpu.py alongside:
# its emulated-dispatch test first, and if that fails every bench runs with
# --dispatch select (both branches computed: the pre-issue-13 path).
set -o pipefail
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_COMPILE_THREADS=1 GNMR_INSTALLED=1 GNMR_MPS=1
OUT=${OUT:-/tmp/gnmr_out}
T0=${T0:-$(date +%s)}; BUDGET=${BUDGET:-540}  # T0: an outer command that ran something first passes its start
CALL=$1; SPEC=$2
stage=/tmp/gnmr_call/$CALL
mkdir -p "$OUT" "$stage"
log="$OUT/$CALL.log"
python3 -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | grep -v "Running pip as"
python3 -c "import gnmr_fx" || exit 1
if ! pgrep -f nvidia-cuda-mps-control >/dev/null; then
  nvidia-cuda-mps-control -d && echo "MPS: on" | tee -a "$log"
fi
dispatch=host
if [ -n "$GPU_TESTS" ]; then
  timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py -k emulated_dispatch \
    > "$stage/test_gpu_dispatch.log" 2>&1
  rc=$?
  tail -3 "$stage/test_gpu_dispatch.log" | tee -a "$log"
  # Only a failed test (rc 1) switches the benches to the both-branches path; a
  # timeout (rc 124: these tests compile a lot) says nothing about correctness.
  if [ $rc -eq 1 ]; then dispatch=select; fi
  echo "emulated-dispatch GPU test rc=$rc: benches use --dispatch $dispatch" | tee -a "$log"
  # The whole test file must end with the benches: its timeout counts from T0
  # (and `timeout 0` would mean none, so with no time left the tests do not start).
  tests_left=$((BUDGET - 30 - $(date +%s) + T0))
  if [ "$tests_left" -gt 0 ]; then
    timeout "$tests_left" python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py > "$stage/test_gpu.log" 2>&1 &
    tests_pid=$!
  else
    echo "no time left for tests/test_gpu.py" | tee -a "$log"
  fi
fi
deadline=$((BUDGET - $(date +%s) + T0))
if [ "$deadline" -lt 60 ]; then
  echo "only ${deadline}s of BUDGET=${BUDGET}s left after the set-up: no bench started" | tee -a "$log"
  exit 1
fi
pids=()
while read -r name args; do
  case "$name" in ''|'#'*) continue;; esac
  # shellcheck disable=SC2086  # args is a list of arguments
  OUT="$stage/$name" bash benchmarks/gpu_stability.sh "$name" $args --dispatch "$dispatch" --jobs 1 --deadline "$deadline" \
    > "$stage/$name.stdout" 2>&1 &
  pids+=($!)
done < "$SPEC"
for p in "${pids[@]}"; do wait "$p"; done
if [ -n "$tests_pid" ]; then wait "$tests_pid"; echo "GPU tests (rc=$?):" >> "$log"; tail -15 "$stage/test_gpu.log" >> "$log"; fi
for f in "$stage"/*/*.log; do
  echo "== $f"; grep -vE "^\S+ s[0-9]+ .* [0-9]+/[0-9]+ loss" "$f" | grep -vE '^\s*$' | tail -25
done >> "$log" 2>&1
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >> "$log" 2>&1
tar czf "$OUT/$CALL.tgz" -C "$stage" .
