#!/usr/bin/env bash
# Compile time of each arm in a fresh process with empty Inductor / Triton
# caches (in one process the arms share cached kernels, which favours the
# arms compiled later). Then the rowwise recipe at one size.
#   bash benchmarks/compile_time.sh 8b
# ARMS="bf16 gnmr gnmr_lowg" picks the arms (default: bf16 lowp gnmr torchao);
# SKIP_ROWWISE=1 leaves out the rowwise run.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gnmr_out}
SIZE=${1:-8b}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | grep -v "Running pip as"
for arm in ${ARMS:-bf16 lowp gnmr torchao}; do
  TORCHINDUCTOR_FORCE_DISABLE_CACHES=1 TORCHINDUCTOR_CACHE_DIR=/tmp/ic_$arm TRITON_CACHE_DIR=/tmp/tc_$arm \
    python3 -m gnmr_fx.cli bench perf --sizes "$SIZE" --arms $arm --steps 3 --rounds 1 --warmup 1 \
    --out "$OUT/compile_$arm.json" 2>&1 | grep -E "^$SIZE " | tail -1 | tee -a "$OUT/compile_time.txt"
done
[ -n "$SKIP_ROWWISE" ] && exit 0
python3 -m gnmr_fx.cli bench perf --sizes "$SIZE" --recipe fp8_rowwise --arms bf16,lowp,gnmr \
  --steps 10 --rounds 3 --warmup 2 --out "$OUT/perf_rowwise.json" --md "$OUT/perf_rowwise.md" 2>&1 | tail -8
