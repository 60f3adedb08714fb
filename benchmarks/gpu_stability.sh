#!/usr/bin/env bash
# One lent-GPU call of the stability benchmark (the evidence issue): install,
# record the machine, optionally start CUDA MPS so the worker processes'
# kernels can share the GPU, run `gnmr-fx bench stability` with the given
# arguments under a deadline, and bundle everything into $OUT.
#   bash benchmarks/gpu_stability.sh NAME --preset gpu --scenarios e-nvfp4 ... --deadline 500
# Results: $OUT/NAME.tgz (results.json, tables.md, plots), $OUT/NAME.md, $OUT/NAME.log.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gnmr_out}
NAME=$1; shift
mkdir -p "$OUT"
# benchmarks/gpu_call.sh installs once for all its benches (GNMR_INSTALLED=1).
if [ -z "$GNMR_INSTALLED" ]; then
  python3 -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | grep -v "Running pip as"
fi
python3 -c "import gnmr_fx" || exit 1
# MPS uses its default pipe directory, so every CUDA process of the call
# (two benchmark commands run side by side, say) shares the one server.
if [ -n "$GNMR_MPS" ] && ! pgrep -f nvidia-cuda-mps-control >/dev/null; then
  if nvidia-cuda-mps-control -d && timeout 60 python3 -c "import torch; torch.ones(1, device='cuda').sum().item()"; then
    echo "MPS: on"
  else
    echo "MPS: failed to start, running without it"; echo quit | nvidia-cuda-mps-control 2>/dev/null
  fi
fi 2>&1 | tee "$OUT/$NAME.env"
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
  echo "commit ${GNMR_COMMIT:-unknown (pass GNMR_COMMIT: the device copy's .git is not the checkout's)}"; date -u; } 2>&1 | tee -a "$OUT/$NAME.env"
res=/tmp/gnmr_res/$NAME
python3 -m gnmr_fx.cli bench stability "$@" --out "$res" 2>&1 | tee "$OUT/$NAME.log"
rc=$?
cp "$res/tables.md" "$OUT/$NAME.md" 2>/dev/null
tar czf "$OUT/$NAME.tgz" -C "$res" --exclude='*.pt' . 2>/dev/null
nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv >> "$OUT/$NAME.env" 2>&1
exit $rc
