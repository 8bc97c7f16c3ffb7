#!/usr/bin/env bash
# Waits for the study processes that launch_gpu.sh started (until none is left or WAIT seconds pass), then
# summarises every finished run into $OUT/data/<size>/ (small files that come back; unfinished runs are skipped,
# and a later call on the same machine picks them up).
#   WAIT=500 bash notebooks/study/collect_gpu.sh
export PYTHONPATH=/tmp/site:$PWD
RUNS=${RUNS:-/tmp/study-runs}
OUT=${OUT:-/tmp/out}
deadline=$(( $(date +%s) + ${WAIT:-500} ))
while pgrep -f "routescope.cli import main" > /dev/null && [ "$(date +%s)" -lt "$deadline" ]; do sleep 10; done
commit=$(cat "$RUNS/commit")
for data in small-gpu gpu regime; do
  [ -d "$RUNS/$data" ] || continue
  mkdir -p "$OUT/data/$data"
  python notebooks/study/summarize.py "$RUNS/$data" --out "$OUT/data/$data" \
    --command "notebooks/study/launch_gpu.sh: routescope sweep (size and seeds per folder; commit $commit)" 2>&1 | tail -2
  echo "$data: $(ls "$OUT/data/$data" | wc -l) summaries"
done
mkdir -p "$OUT/logs" && for f in "$RUNS"/logs/*.log; do grep -v "━" "$f" | tail -4 > "$OUT/logs/$(basename "$f")"; done
nvidia-smi --query-gpu=name,memory.used,utilization.gpu --format=csv,noheader
