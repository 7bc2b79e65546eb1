#!/usr/bin/env bash
# The GPU benchmark in one call (< 9 minutes on one H100): random-weight checkpoints with
# the real shapes of Llama-3.1-8B (target) and Llama-3.2-1B (draft), then our AR, SD and
# SSD (K=7, F=3) and the PyTorch/transformers peer (compiled AR + assisted generation) on
# the same GPU and the same bf16 weights; JSON + PNG under $OUT, a short table last.
#
#   bash bench/gpu/ours_vs_peer.sh              # one GPU: AR, SD, SSD (draft shares GPU 0), peer
#   bash bench/gpu/ours_vs_peer.sh --two-gpu    # SSD's draft on GPU 1 (--draft_devices 1)
#   bash bench/gpu/ours_vs_peer.sh --skip-peer  # ours only
#   bash bench/gpu/ours_vs_peer.sh --dry-run    # CPU: the flow on tiny in-memory models
#
# Random weights: timings only. Acceptance and cache hits of random weights mean nothing,
# and no speed-up over AR is claimed from them (every result is labelled so).
# Environment overrides: OUT, BUDGET_S (default 530), PEER_RESERVE_S (170), TARGET, DRAFT,
# PROMPT_LEN (128), OUTPUT_LEN (256), K (7), F (3), CKPT_ROOT, PYTHON.
set -uo pipefail
cd "$(dirname "$0")/../.."

TWO_GPU=0; SKIP_PEER=0; DRY=0
for a in "$@"; do
  case "$a" in
    --two-gpu) TWO_GPU=1 ;;
    --skip-peer) SKIP_PEER=1 ;;
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,17p "$0"; exit 0 ;;
    *) echo "ours_vs_peer.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

OUT=${OUT:-/tmp/ssd_jax_bench_out}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-530}
PEER_RESERVE_S=${PEER_RESERVE_S:-170}
TARGET=${TARGET:-llama-3.1-8b}
DRAFT=${DRAFT:-llama-3.2-1b}
PROMPT_LEN=${PROMPT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-256}
K=${K:-7}
F=${F:-3}
CKPT_ROOT=${CKPT_ROOT:-/tmp/ssd_jax_random}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/ours_vs_peer.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET_S - $(date +%s) + T0 )); }
STAGES=""
stage_done() { STAGES="$STAGES$1=${2}s(rc=$3) "; echo "=== $1 done in ${2}s, rc=$3, elapsed $(elapsed)s of ${BUDGET_S}s"; }

echo "=== ours_vs_peer.sh $(date -u +%FT%TZ) two_gpu=$TWO_GPU dry=$DRY target=$TARGET draft=$DRAFT" \
     "prompt_len=$PROMPT_LEN output_len=$OUTPUT_LEN K=$K F=$F budget=${BUDGET_S}s"
if [ "$DRY" = 0 ]; then
  nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"
  $PY -c "import jax, sys; print('jax', jax.__version__, jax.devices(), 'python', sys.version.split()[0])" \
    || { echo "jax does not start"; exit 1; }
fi

COMMON=(--dataset prose --numseqs 1 --prompt_len "$PROMPT_LEN" --output_len "$OUTPUT_LEN"
        --batch_size 1 --k "$K" --f "$F" --random_weights --nowarmup_generate)

# ---- 1. random-weight checkpoints (bf16, streamed; target and draft written in parallel)
if [ "$DRY" = 1 ]; then
  T_DIR=""; D_DIR=""
else
  s=$(date +%s)
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cpu $PY bench/harness.py --random_weights \
      --model "$TARGET" --methods ar --ckpt_root "$CKPT_ROOT" --only_write_checkpoints \
      >"$OUT/.t_dir" &
  p1=$!
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cpu $PY bench/harness.py --random_weights \
      --draft "$DRAFT" --ckpt_root "$CKPT_ROOT" --only_write_checkpoints \
      >"$OUT/.d_dir" &
  p2=$!
  wait $p1; r1=$?; wait $p2; r2=$?
  T_DIR=$(tail -n 1 "$OUT/.t_dir"); D_DIR=$(tail -n 1 "$OUT/.d_dir")
  rm -f "$OUT/.t_dir" "$OUT/.d_dir"
  stage_done checkpoints $(( $(date +%s) - s )) "$r1/$r2"
  if [ "$r1" != 0 ] || [ "$r2" != 0 ] || [ ! -f "$T_DIR/config.json" ] || [ ! -f "$D_DIR/config.json" ]; then
    echo "!!! could not write the random checkpoints; stopping"; exit 1
  fi
  du -sh "$T_DIR" "$D_DIR" 2>/dev/null
fi

# ---- 2. ours: AR, SD, SSD in one process (each engine built, warmed up, timed, freed)
OURS_JSON="$OUT/ours.json"
s=$(date +%s)
limit=$(( $(left) - (SKIP_PEER == 1 ? 15 : PEER_RESERVE_S) ))
[ "$limit" -lt 30 ] && limit=30
if [ "$DRY" = 1 ]; then
  ENGINE=(--engine tiny --bandwidth_gbps 3000)
else
  ENGINE=(--model "$T_DIR" --draft "$D_DIR" --dtype bfloat16)
fi
if [ "$TWO_GPU" = 1 ]; then
  EXTRA=(--draft_devices 1 --draft_devices_for ssd --label "2 GPUs: SSD draft on GPU 1")
else
  EXTRA=()
fi
timeout --signal=TERM --kill-after=10 "$limit" $PY bench/harness.py "${ENGINE[@]}" "${COMMON[@]}" \
    "${EXTRA[@]}" --methods ar,sd,ssd --output_json "$OURS_JSON"
r=$?
stage_done ours $(( $(date +%s) - s )) $r
[ "$r" = 124 ] || [ "$r" = 143 ] && echo "!!! ours ran out of its ${limit}s budget: partial results in $OURS_JSON"
[ "$r" = 1 ] && echo "!!! ours: SD/SSD output differs from AR (see the EXACTNESS lines above)"
[ "$r" = 3 ] && echo "!!! ours: a method failed (see FAILED above; the others ran)"
OURS_RC=$r

# ---- 3. the peer: transformers generate (static cache + compile) and assisted generation
PEER_JSON="$OUT/peer.json"
if [ "$SKIP_PEER" = 0 ] && [ "$DRY" = 0 ]; then
  s=$(date +%s)
  limit=$(( $(left) - 15 ))
  if [ "$limit" -lt 30 ]; then
    echo "!!! no time left for the peer"; PEER_RC=skipped
  else
    CUDA_VISIBLE_DEVICES=${PEER_GPU:-0} timeout --signal=TERM --kill-after=10 "$limit" \
      $PY bench/peer_transformers.py --model "$T_DIR" --draft "$D_DIR" --dataset prose \
      --numseqs 1 --prompt_len "$PROMPT_LEN" --output_len "$OUTPUT_LEN" --k "$K" \
      --dtype bfloat16 --random_weights --reps 2 --sd_reps 1 --warmup_runs 2 \
      --output_json "$PEER_JSON"
    PEER_RC=$?
    stage_done peer $(( $(date +%s) - s )) $PEER_RC
  fi
else
  PEER_RC=skipped
fi

# ---- 4. plot + the table, last
PLOT_ARGS=(--bench "$OURS_JSON" --out "$OUT/bench.png" --table)
[ -f "$PEER_JSON" ] && PLOT_ARGS+=(--peer "$PEER_JSON")
echo
echo "================================ RESULTS (random-weight timing) ================================"
$PY bench/plot.py "${PLOT_ARGS[@]}"
echo "stages: $STAGES total $(elapsed)s; ours rc=$OURS_RC peer rc=$PEER_RC; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
[ "$OURS_RC" = 0 ] || exit "$OURS_RC"
