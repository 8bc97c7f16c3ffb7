#!/usr/bin/env bash
# Issues 19, 21 and 22 on a GPU in one device call, each step under a share of one deadline (BUDGET seconds):
# the registered ops' GPU tests (compile + CUDA graphs recording as eager), the training step (tree vs dense,
# fp32 / bf16 eager / compiled / CUDA graphs, recording every 25 steps), the eager host overhead per TreeFFN
# call, `routescope record` on the GPU preset with its defaults, the many-tree layer shapes, the pruned
# layer's forward and the probe's cost. Results under $OUT.
#   bash benchmarks/gpu_ops.sh                 (device tool: carry .whl)
pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
deadline=$(( $(date +%s) + ${BUDGET:-570} ))
step() {  # step LIMIT NAME command...: run under min(LIMIT, time left), output to $OUT/NAME.txt, tail shown
  local lim=$1 name=$2; shift 2
  local left=$(( deadline - $(date +%s) )); (( left < lim )) && lim=$left
  (( lim < 10 )) && { echo "== $name: skipped, out of time"; return; }
  local t0=$(date +%s); timeout "$lim" "$@" > "$OUT/$name.txt" 2>&1; local rc=$?
  echo "== $name: rc $rc, $(( $(date +%s) - t0 )) s"; grep -v "━" "$OUT/$name.txt" | tail -"${TAIL:-14}"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; python -c 'import torch, triton; print(torch.__version__, triton.__version__)'
TAIL=6 step 200 gpu_tests python -m pytest -q -p no:cacheprovider -rs tests/test_gpu.py tests/test_tree_ops.py
step 200 train_step_gpu python benchmarks/train_step.py --config gpu --json "$OUT/train_step_gpu.json" --modes "fp32 eager" \
  "bf16 eager" "bf16 compiled" "bf16 cudagraphs" "bf16 cudagraphs + record/25"
step 50 host_overhead python benchmarks/host_overhead.py --profile 20
mkdir -p /tmp/rec; TAIL=4 step 60 record_gpu python -c 'from routescope.cli import main; main()' record -c shakespeare-tree-gpu --steps 400 --out /tmp/rec/bf16.h5 --device cuda
step 50 tree_kernels_many python benchmarks/tree_kernels.py --shapes many --quick --no-fff --json "$OUT/tree_kernels_many.json"
step 30 prune_forward python benchmarks/prune_forward.py
step 40 probe_cost python benchmarks/probe_cost.py --config shakespeare-tree-gpu --device cuda
step 200 train_step_opt125m python benchmarks/train_step.py --config opt125m --json "$OUT/train_step_opt125m.json" \
  --modes "bf16 eager" "bf16 compiled" "bf16 cudagraphs"
