#!/usr/bin/env bash
# Issue 19 checks on a GPU in one device call: the training-step benchmark (one config), `routescope record`
# on the GPU preset with the new defaults (bf16 autocast, fused AdamW), and the GPU tests.
#   CONFIG=gpu bash benchmarks/gpu_train_path.sh
set -x
pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 330 python benchmarks/train_step.py --config "${CONFIG:-gpu}" --json "$OUT/train_step_${CONFIG:-gpu}.json" 2>&1 | tail -16
if [ "${RECORD:-1}" = 1 ]; then
  timeout 200 python -c 'from routescope.cli import main; main()' record -c shakespeare-tree-gpu --steps 1000 --out "$OUT/bf16.h5" --device cuda 2>&1 | tail -3
  rm -f "$OUT"/*.h5 "$OUT"/*.ckpt.pt
fi
timeout 120 python -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_train_path.py -m "not slow" 2>&1 | tail -3
