#!/usr/bin/env bash
# The study's GPU runs in one device call each (PROTOCOL.md), summaries written under $OUT/data/<size>/ (small
# files that come back; the raw runs stay on the machine). Carry .whl (the wheels the GPU image lacks).
#   SWEEP=study SIZE=small-gpu SEEDS=5 bash notebooks/study/run_gpu.sh
#   SWEEP=study-gpu SIZE=gpu SEEDS=3 bash notebooks/study/run_gpu.sh          (several calls: finished runs are reused)
#   SWEEP=study-regime SIZE=small-gpu SEEDS=3 DATA=regime bash notebooks/study/run_gpu.sh
set -x
pip install --no-index --no-deps --target /tmp/site .whl/*.whl -q 2>&1 | tail -1
export PYTHONPATH=/tmp/site:$PWD
OUT=${OUT:-/tmp/out}
RUNS=${RUNS:-/tmp/study-runs/${SWEEP:-study}-${SIZE:-small-gpu}}
mkdir -p "$OUT/data/${DATA:-${SIZE:-small-gpu}}" "$RUNS"
nvidia-smi --query-gpu=name --format=csv,noheader
commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
timeout "${BUDGET:-540}" python -c 'from routescope.cli import main; main()' sweep "${SWEEP:-study}" --size "${SIZE:-small-gpu}" \
  --seeds "${SEEDS:-5}" --device cuda --out "$RUNS" 2>&1 | grep -v "━" | tail -5
python notebooks/study/summarize.py "$RUNS" --out "$OUT/data/${DATA:-${SIZE:-small-gpu}}" \
  --command "routescope sweep ${SWEEP:-study} --size ${SIZE:-small-gpu} --seeds ${SEEDS:-5} --device cuda (commit $commit)"
ls "$OUT/data/${DATA:-${SIZE:-small-gpu}}" | wc -l
