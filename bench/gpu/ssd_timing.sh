#!/usr/bin/env bash
# Round timings at real shapes on two GPUs (bench/probes/ssd_timing.py): the target on
# GPU 0, the draft on GPU 1 (--draft_devices 1), random weights (timing only), batch 1,
# 128-token prompt, 128 new tokens, K=7, F=3; every run is saved to the JSON as it
# finishes, so a timeout keeps what was done. Output: $OUT/$NAME.{json,log}.
#
#   bash bench/gpu/ssd_timing.sh                            # AR, SD, SSD hit / miss
#   bash bench/gpu/ssd_timing.sh --runs ar,sd,ssd_hit,steps  # any ssd_timing.py flags
#   bash bench/gpu/ssd_timing.sh --name xla --attention xla --runs ar,ssd_hit
#   TARGET=llama-3.1-70b bash bench/gpu/ssd_timing.sh --target_layers 40 --runs ar,sd,ssd_hit
#   bash bench/gpu/ssd_timing.sh --ceilings --peer          # + read/copy ceilings, the peer
#
# Options of this script (the rest go to ssd_timing.py, after its defaults here):
#   --name NAME     output file names (default ssd_timing)
#   --ceilings      first measure the read ceiling and the copy bandwidth (bench/roofline.py)
#   --peer          last, the PyTorch/transformers AR on the same target weights (GPU 0)
# Environment: OUT (/tmp/ssd_jax_ssd_timing), TARGET (llama-3.1-8b), DRAFT (llama-3.2-1b),
# TIMEOUT_S (415, ssd_timing.py's limit), PYTHON.
set -o pipefail
cd "$(dirname "$0")/../.."
NAME=ssd_timing; CEILINGS=0; PEER=0; ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --name) NAME=$2; shift 2 ;;
    --name=*) NAME=${1#--name=}; shift ;;
    --ceilings) CEILINGS=1; shift ;;
    --peer) PEER=1; shift ;;
    -h|--help) sed -n 2,20p "$0"; exit 0 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
OUT=${OUT:-/tmp/ssd_jax_ssd_timing}; mkdir -p "$OUT"
TARGET=${TARGET:-llama-3.1-8b}; DRAFT=${DRAFT:-llama-3.2-1b}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
quiet() { grep -v "^[IW][0-9]"; }  # drop XLA's and absl's info/warning lines
nvidia-smi -L

if [ "$CEILINGS" = 1 ]; then
  $PY -c "
from bench import roofline
for kind, m in roofline.measure_ceilings().items():
  print(kind, round(m['bandwidth_Bps'] / 1e9, 1), 'GB/s', m['method'])" 2>&1 | quiet \
    | tee "$OUT/ceilings.log"
fi

timeout "${TIMEOUT_S:-415}" $PY bench/probes/ssd_timing.py --target "$TARGET" --draft "$DRAFT" \
  --draft_devices 1 --k 7 --f 3 --prompt_len 128 --new_tokens 128 "${ARGS[@]}" \
  --output_json "$OUT/$NAME.json" 2>&1 | quiet | tee "$OUT/$NAME.log"
rc=$?

if [ "$PEER" = 1 ]; then
  # The same target shape, its weights written to disk once and loaded by transformers.
  timeout 170 $PY -c "
import sys
from ssd_jax.checkpoint import REAL_SHAPES, write_random_hf_checkpoint
write_random_hf_checkpoint(REAL_SHAPES[sys.argv[1]], '/tmp/ssd_jax_peer_target', 'bfloat16')" \
    "$TARGET" &&
  CUDA_VISIBLE_DEVICES=0 timeout 150 $PY bench/peer_transformers.py \
    --model /tmp/ssd_jax_peer_target --methods ar --prompt_len 128 --output_len 128 \
    --random_weights --reps 2 --warmup_runs 2 --output_json "$OUT/peer.json" 2>&1 \
    | quiet | tail -20 | tee "$OUT/peer.log"
fi
echo "done (ssd_timing rc=$rc)"
exit $rc
