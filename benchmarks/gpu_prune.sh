#!/usr/bin/env bash
# Issue 21 on the GPU preset, after notebooks/study/launch_gpu.sh's `record` runs have finished: prune the bf16
# run with its checkpoint (JSON report), and the two runs' summaries (bf16 defaults vs fp32: val loss, speed).
#   bash benchmarks/gpu_prune.sh                 (same machine as launch_gpu.sh)
export PYTHONPATH=/tmp/site:$PWD
RUNS=${RUNS:-/tmp/study-runs}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
rs() { python -c 'from routescope.cli import main; main()' "$@"; }
for precision in bf16 fp32; do
  rs info "$RUNS/preset/preset-$precision.h5" --json > "$OUT/preset-$precision.info.json" 2>&1; tail -c 300 "$OUT/preset-$precision.info.json"; echo
  grep -v "━" "$RUNS/logs/$precision.log" | tail -6
done
timeout 240 python -c 'from routescope.cli import main; main()' prune "$RUNS/preset/preset-bf16.h5" \
  --out "$RUNS/preset/preset-bf16.pruned.pt" --json > "$OUT/prune_gpu.json" 2> "$OUT/prune_gpu.err"
echo "prune rc $?"; head -c 3000 "$OUT/prune_gpu.json"; tail -3 "$OUT/prune_gpu.err"
