#!/usr/bin/env bash
# Starts every study sweep on one GPU as detached processes (setsid: they outlive the device call that starts
# them and run until the machine is given back), N shards a sweep so several processes share the GPU, plus the
# fp32 twin of the GPU preset's first run (issue 19: bf16 vs fp32 val loss). Then collect_gpu.sh summarises.
#   bash notebooks/study/launch_gpu.sh && bash notebooks/study/collect_gpu.sh     (device tool: carry .whl)
#   DEVICE=cpu SIZE_SMALL=tiny SIZE_GPU=tiny PRESET=shakespeare-tree STEPS=20 SEEDS_SMALL=1 ...   (a dry run here)
set -x
pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
RUNS=${RUNS:-/tmp/study-runs}
LOGS=$RUNS/logs
mkdir -p "$LOGS" "$RUNS/preset"
git rev-parse HEAD > "$RUNS/commit" 2>/dev/null || echo unknown > "$RUNS/commit"
rs() { python -c 'from routescope.cli import main; main()' "$@"; }
export -f rs
export OMP_NUM_THREADS=2
# sweep size seeds shards data-folder-name
launch() {
  for i in $(seq 0 $(($4 - 1))); do
    setsid nohup bash -c "rs sweep $1 --size $2 --seeds $3 --shard $i/$4 --device ${DEVICE:-cuda} ${STEPS:+--steps $STEPS} --out $RUNS/$5" \
      > "$LOGS/$5-$i.log" 2>&1 < /dev/null &
  done
}
launch study "${SIZE_SMALL:-small-gpu}" "${SEEDS_SMALL:-5}" "${SHARDS_SMALL:-4}" small-gpu
launch study-gpu "${SIZE_GPU:-gpu}" "${SEEDS_GPU:-3}" "${SHARDS_GPU:-4}" gpu
launch study-regime "${SIZE_SMALL:-small-gpu}" "${SEEDS_REGIME:-3}" "${SHARDS_REGIME:-2}" regime
# the GPU preset by `record`'s defaults (bf16, checkpointed: issue 21 prunes it) and its fp32 twin
setsid nohup bash -c "rs record -c ${PRESET:-shakespeare-tree-gpu} --device ${DEVICE:-cuda} ${STEPS:+--steps $STEPS} --out $RUNS/preset/preset-bf16.h5" \
  > "$LOGS/bf16.log" 2>&1 < /dev/null &
setsid nohup bash -c "rs record -c ${PRESET:-shakespeare-tree-gpu} --precision fp32 --device ${DEVICE:-cuda} ${STEPS:+--steps $STEPS} --out $RUNS/preset/preset-fp32.h5" \
  > "$LOGS/fp32.log" 2>&1 < /dev/null &
sleep 5
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
