#!/usr/bin/env bash
# GPU check of issue 16, one call on a lent GPU machine (under 8 minutes):
#   1. install the project's missing dependencies from carried wheels (.whl/, see
#      benchmarks/fetch_gpu_wheels.sh; the machine has torch, CuPy, SciPy, scikit-image);
#   2. run the gpu-marked tests;
#   3. print the GPU figures beside the CPU ones (benchmarks/gpu_figures.py).
# Usage (device tool): carry [".whl"], command "bash benchmarks/gpu_check.sh", timeout 540.
# Logs and figures go to $OUT when it is set (the device tool's output folder).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
cd "$(dirname "$0")/.."
t0=$(date +%s)
stamp() { echo "== $1 ($(($(date +%s) - t0)) s)"; }

stamp "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
$PY --version
if compgen -G ".whl/*.whl" >/dev/null; then
  stamp "installing $(ls .whl/*.whl | wc -l) carried wheels"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  echo "no .whl/ carried: using what the machine has"
  export PYTHONPATH=$PWD
fi
$PY -c "import cupy, torch; print('cupy', cupy.__version__, 'devices', cupy.cuda.runtime.getDeviceCount(), '| torch', torch.__version__, torch.cuda.is_available())" \
  || { echo "CuPy/torch not usable: stop"; exit 1; }
$PY -c "import simgen.pipeline, training.train, abtem, zarr, dask.distributed" \
  || { echo "project import failed (missing wheel?)"; exit 1; }

stamp "gpu tests"
timeout 150 $PY -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$OUT/gpu_tests.log" | tail -15

stamp "figures"
timeout $((470 - ($(date +%s) - t0))) $PY -m benchmarks.gpu_figures --device gpu \
  --json "$OUT/gpu_figures.json" 2>&1 | tee "$OUT/gpu_figures.log"
stamp "done"
