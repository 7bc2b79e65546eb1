#!/usr/bin/env bash
# Second two-GPU call: the copy bandwidth (roofline), SSD/SD/AR round timings with Pallas
# attention (prefix cache reset before timed runs), then AR and the SSD hit round with the
# XLA attention reference, to see what the kernels' fixed costs do at batch 1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ssd_jax_two_gpu}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
COMMON=(--target llama-3.1-8b --draft llama-3.2-1b --draft_devices 1 --k 7 --f 3
        --prompt_len 128 --new_tokens 128)
$PY -c "
import sys; sys.path.insert(0, 'launch')
from roofline import measure_copy_bandwidth
print('copy bandwidth', measure_copy_bandwidth())" 2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/bandwidth.log"
timeout 260 $PY launch/ssd_timing.py "${COMMON[@]}" --runs ar,sd,ssd_hit,ssd_miss_fast \
  --output_json "$OUT/pallas.json" 2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/pallas.log"
timeout 150 $PY launch/ssd_timing.py "${COMMON[@]}" --attention xla --runs ar,ssd_hit \
  --output_json "$OUT/xla.json" 2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/xla.log"
