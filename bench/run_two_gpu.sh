#!/usr/bin/env bash
# One call on nvidia-h200-x2: SSD round timings with the target (Llama-3.1-8B shape) on
# GPU 0 and the draft (Llama-3.2-1B shape) on GPU 1, then the PyTorch/transformers AR peer
# on the same target weights. Random weights (timing only). Results under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/ssd_jax_two_gpu}; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python3}
nvidia-smi -L
timeout 400 $PY launch/ssd_timing.py --target llama-3.1-8b --draft llama-3.2-1b \
  --draft_devices 1 --k 7 --f 3 --prompt_len 128 --new_tokens 128 \
  --output_json "$OUT/ssd_timing.json" 2>&1 | grep -v "^[IW][0-9]" | tee "$OUT/ssd_timing.log"
# The peer: same 8B shape, weights written to disk once and loaded by transformers.
timeout 170 $PY -c "
from ssd_jax.checkpoint import REAL_SHAPES, write_random_hf_checkpoint
write_random_hf_checkpoint(REAL_SHAPES['llama-3.1-8b'], '/tmp/llama8b', 'bfloat16')" &&
CUDA_VISIBLE_DEVICES=0 timeout 150 $PY launch/peer_transformers.py --model /tmp/llama8b \
  --methods ar --prompt_len 128 --output_len 128 --random_weights --reps 2 --warmup_runs 2 \
  --output_json "$OUT/peer.json" 2>&1 | grep -v "^[IW][0-9]" | tail -20 | tee "$OUT/peer.log"
echo "done"
