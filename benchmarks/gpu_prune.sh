#!/usr/bin/env bash
# Issue 21 on the GPU preset: prune a bf16 `record` run of shakespeare-tree-gpu with its checkpoint (the quality
# check on CUDA), JSON report under $OUT. Uses notebooks/study/launch_gpu.sh's run when the machine has it
# (and its fp32 twin's summary beside it), else records one first (~2-3 min on an H200).
#   bash benchmarks/gpu_prune.sh                 (device tool: carry .whl)
pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
RUNS=${RUNS:-/tmp/study-runs}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" "$RUNS/preset" "$RUNS/logs"
rs() { python -c 'from routescope.cli import main; main()' "$@"; }
if [ ! -f "$RUNS/preset/preset-bf16.ckpt.pt" ]; then
  timeout "${RECORD_S:-360}" python -c 'from routescope.cli import main; main()' record -c shakespeare-tree-gpu \
    --device cuda --out "$RUNS/preset/preset-bf16.h5" --overwrite > "$RUNS/logs/bf16.log" 2>&1
fi
for precision in bf16 fp32; do
  [ -f "$RUNS/preset/preset-$precision.h5" ] || continue
  rs info "$RUNS/preset/preset-$precision.h5" --json > "$OUT/preset-$precision.info.json" 2>&1
  grep -v "━" "$RUNS/logs/$precision.log" | tail -4
done
timeout "${PRUNE_S:-240}" python -c 'from routescope.cli import main; main()' prune "$RUNS/preset/preset-bf16.h5" \
  --out "$RUNS/preset/preset-bf16.pruned.pt" --overwrite --device cuda --json > "$OUT/prune_gpu.json" 2> "$OUT/prune_gpu.err"
echo "prune rc $?"; head -c 4000 "$OUT/prune_gpu.json"; tail -3 "$OUT/prune_gpu.err"
