#!/usr/bin/env bash
# The lent-GPU run of issue #4, in one call: install, GPU tests (SQNR, no
# syncs, zero recompiles), then `gnmr-fx bench perf` with the given args.
#   bash benchmarks/gpu_suite.sh --sizes 1b,8b,70b --profile
# Issue 13 (emulated recipes, one branch per unit): EMULATION="<args>" also
# runs `gnmr-fx bench emulation --device cuda <args>`; SKIP_PERF=1 skips perf:
#   SKIP_TESTS=1 SKIP_PERF=1 EMULATION="--recipes mxfp4,nvfp4 --layers 6 --embd 384 --heads 6 \
#     --context 256 --batch 32 --autocast bf16 --limit 1.1" bash benchmarks/gpu_suite.sh
# Results go to $OUT (the device tool's folder) or /tmp/gnmr_out.
# GPU_TESTS_TIMEOUT (seconds, default 290) bounds the GPU tests (19 tests took over 200 s in s25a);
# GPU_TESTS_K="<pytest -k expression>" runs only the matching ones.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gnmr_out}
mkdir -p "$OUT"
# torchao travels as a wheel (.whl, git-ignored) where the image lacks it.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
python3 -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | grep -v "Running pip as"
python3 -c "import gnmr_fx.backends.host_dispatch" || exit 1
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
  python3 -c "import torchao; print('torchao', torchao.__version__)" 2>&1 | tail -1
  date -u; } 2>&1 | tee "$OUT/env.txt"
if [ -z "$SKIP_TESTS" ]; then
  GNMR_SQNR_LOG="$OUT/sqnr.jsonl" timeout "${GPU_TESTS_TIMEOUT:-290}" python3 -m pytest -v -s -p no:cacheprovider tests/test_gpu.py \
    ${GPU_TESTS_K:+-k "$GPU_TESTS_K"} 2>&1 \
    | tee "$OUT/test_gpu.log" | grep -vE '^\s*$' | tail -40
fi
if [ -n "$EMULATION" ]; then
  # shellcheck disable=SC2086  # EMULATION is a list of arguments
  python3 -m gnmr_fx.cli bench emulation --device cuda $EMULATION --out "$OUT/emulation.json" \
    --md "$OUT/emulation.md" 2>&1 | tee "$OUT/emulation.log"
fi
if [ -z "$SKIP_PERF" ]; then
  python3 -m gnmr_fx.cli bench perf "$@" --out "$OUT/perf.json" --md "$OUT/perf.md" 2>&1 | tee "$OUT/perf.log"
fi
