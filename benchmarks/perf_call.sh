#!/usr/bin/env bash
# One lent-GPU call of several performance measurements, one after another
# (each needs the GPU to itself), each under its own timeout cut to what is
# left of BUDGET, with everything bundled into $OUT/perf.tgz after *every*
# part, so a call cut short still brings back what finished.
#   T0=$(date +%s) BUDGET=570 bash benchmarks/perf_call.sh benchmarks/calls/CALL.perf
# CALL.perf: one part per line, "NAME SECONDS COMMAND...", run from the repo
# root with OUT=<its own folder>; '#' comments; SECONDS "max" gives the part all
# that is left of BUDGET (a fixed number caps it, to leave time for later parts). Example line:
#   tw 240 env SKIP_TESTS=1 bash benchmarks/gpu_suite.sh --sizes 8b --arms lowp,gnmr --steps 10
# PERF_CALL_DRY=1 prints the plan (names, seconds, commands) and runs nothing.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gnmr_out}
T0=${T0:-$(date +%s)}; BUDGET=${BUDGET:-570}
SPEC=$1
[ -f "$SPEC" ] || { echo "perf_call.sh: no such call file: $SPEC" >&2; exit 2; }
R=/tmp/gnmr_perf_call
rm -rf "$R"; mkdir -p "$R" "$OUT"
while read -r name secs cmd; do
  case "$name" in ''|'#'*) continue;; esac
  left=$((BUDGET - 15 - $(date +%s) + T0))
  [ "$secs" = max ] && secs=$left
  [ "$secs" -gt "$left" ] && secs=$left
  if [ "$left" -lt 30 ]; then
    echo "$name: skipped, ${left}s left" | tee -a "$R/call.log"
    continue
  fi
  echo "== $name (timeout ${secs}s): $cmd" | tee -a "$R/call.log"
  if [ -n "$PERF_CALL_DRY" ]; then continue; fi
  mkdir -p "$R/$name"
  # shellcheck disable=SC2086  # cmd is a command line
  eval "OUT=$R/$name timeout $secs $cmd" > "$R/$name.out" 2>&1 < /dev/null
  rc=$?
  echo "$name: rc=$rc after $(( $(date +%s) - T0 ))s of the call" | tee -a "$R/call.log"
  tail -15 "$R/$name.out"
  tar czf "$OUT/perf.tgz" -C "$R" .
done < "$SPEC"
tar czf "$OUT/perf.tgz" -C "$R" .
