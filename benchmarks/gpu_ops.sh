#!/usr/bin/env bash
# Issue 19 part 2 on a GPU in one device call: the registered ops' GPU tests (compile + CUDA graphs recording
# as eager), the eager host overhead per TreeFFN call, and the training step with the compiled and CUDA-graph
# modes side by side. Results under $OUT.
#   bash benchmarks/gpu_ops.sh                 (device tool: carry .whl)
set -x
pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 240 python -m pytest -q -p no:cacheprovider -x tests/test_gpu.py tests/test_tree_ops.py 2>&1 | tail -5
timeout 90 python benchmarks/host_overhead.py --profile 20 > "$OUT/host_overhead.txt" 2>&1; tail -14 "$OUT/host_overhead.txt"
timeout 240 python benchmarks/train_step.py --config "${CONFIG:-gpu}" --modes "bf16 eager" "bf16 compiled" \
  "bf16 cudagraphs" "bf16 cudagraphs + record/25" --json "$OUT/train_step_${CONFIG:-gpu}.json" 2>&1 | tail -16
