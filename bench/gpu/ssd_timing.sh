#!/usr/bin/env bash
# Third two-GPU call (one process, ~6 min on 2x H200): AR, SD and SSD hit/miss rounds
# (profiled and not, with the host time of every dispatch), the kernels of every engine
# program, the single-step programs alone (draft step at batch 1 and at tree width 24,
# glue, 8B verify, AR step) under XLA's default command buffers, none, and "max" (loops
# and conditionals in CUDA graphs), then SD / SSD with "max" everywhere, then K=4.
# Every run is saved to the JSON as it finishes, so a timeout keeps what was done.
set -o pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ssd_jax_two_gpu}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
timeout 415 ${PYTHON:-python3} launch/ssd_timing.py --target llama-3.1-8b \
  --draft llama-3.2-1b --draft_devices 1 --k 7 --f 3 --prompt_len 128 --new_tokens 128 \
  --runs ar,sd,ssd_hit,ssd_miss_jit,ssd_miss_fast,steps,sd:max,ssd_hit:max,ssd_miss_jit:max,sd:k4,ssd_hit:k4 \
  --step_command_buffers default,off,max --output_json "$OUT/v3.json" 2>&1 \
  | grep -v "^[IW][0-9]" | tee "$OUT/v3.log"
