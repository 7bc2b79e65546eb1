#!/usr/bin/env bash
# Serving on one GPU in one call (< 9 minutes): random-weight checkpoints with the shapes of
# Llama-3.1-8B (target) and Llama-3.2-1B (draft) behind `python -m ssd_jax.serve`, AR then
# SD (K=7), each measured by bench/serve_load.py at 3 Poisson request rates (streamed
# /v1/completions, token-id prompts); JSON per method + one PNG under $OUT, a table last.
#
#   bash bench/gpu/serve_load.sh             # one H200
#   bash bench/gpu/serve_load.sh --dry-run   # CPU: the same flow on tiny random checkpoints
#
# Random weights: timing only. Their draft is almost never accepted, so SD here is its worst
# case (one token per round); acceptance and speed-ups of random weights mean nothing.
# The checkpoints have no tokenizer: prompts are token ids and the server streams each
# token as its id in decimal (ssd_jax.LLM's text without a tokenizer), usage counts tokens.
# The GPU image lacks FastAPI/uvicorn/pydantic: run bench/gpu/serve_wheels.sh here first and
# carry `.whl`; they are installed under /tmp/site when the imports fail.
# Environment overrides: OUT, BUDGET_S (530), TARGET, DRAFT (a shape, or "self": the target
# drafts for itself), METHODS (ar,sd), RATES (1,4,16), NUM_PROMPTS (32), PROMPT_LEN (128),
# OUTPUT_LEN (128), BATCH (8), K (7), MAX_MODEL_LEN (512), DTYPE, CKPT_ROOT, PYTHON.
set -uo pipefail
cd "$(dirname "$0")/../.."

DRY=0
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n 2,19p "$0"; exit 0 ;;
    *) echo "serve_load.sh: unknown argument $a" >&2; exit 2 ;;
  esac
done

if [ "$DRY" = 1 ]; then  # the tiny shape drafting for itself: every draft token accepted
  : "${TARGET:=tiny-llama}" "${DRAFT:=self}" "${NUM_PROMPTS:=8}" "${PROMPT_LEN:=32}"
  : "${OUTPUT_LEN:=32}" "${BATCH:=4}" "${DTYPE:=float32}" "${BUDGET_S:=600}"
  export JAX_PLATFORMS=cpu
fi
OUT=${OUT:-/tmp/ssd_jax_serve_out}
mkdir -p "$OUT"
BUDGET_S=${BUDGET_S:-530}
TARGET=${TARGET:-llama-3.1-8b}
DRAFT=${DRAFT:-llama-3.2-1b}
METHODS=${METHODS:-ar,sd}
RATES=${RATES:-1,4,16}
NUM_PROMPTS=${NUM_PROMPTS:-32}
PROMPT_LEN=${PROMPT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-128}
BATCH=${BATCH:-8}
K=${K:-7}
MAX_MODEL_LEN=${MAX_MODEL_LEN:-512}
DTYPE=${DTYPE:-bfloat16}
CKPT_ROOT=${CKPT_ROOT:-/tmp/ssd_jax_random}
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/serve_load.log"
: >"$LOG"
exec > >(tee -a "$LOG") 2>&1

T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( BUDGET_S - $(date +%s) + T0 )); }
STAGES=""
stage_done() { STAGES="$STAGES$1=${2}s(rc=$3) "; echo "=== $1 done in ${2}s, rc=$3, elapsed $(elapsed)s of ${BUDGET_S}s"; }

echo "=== serve_load.sh $(date -u +%FT%TZ) dry=$DRY target=$TARGET draft=$DRAFT methods=$METHODS" \
     "rates=$RATES prompts=$NUM_PROMPTS prompt_len=$PROMPT_LEN output_len=$OUTPUT_LEN batch=$BATCH" \
     "K=$K dtype=$DTYPE budget=${BUDGET_S}s"
[ "$DRY" = 0 ] && { nvidia-smi -L 2>/dev/null || echo "(no nvidia-smi)"; }

# ---- 0. the server's packages (the GPU image has none of FastAPI, uvicorn, pydantic)
SERVE_IMPORTS="import fastapi, uvicorn, pydantic, httpx, prometheus_client"
if ! $PY -c "$SERVE_IMPORTS" 2>/dev/null; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
  fi
  $PY -c "$SERVE_IMPORTS" || { echo "!!! the server's packages are missing: run" \
      "bench/gpu/serve_wheels.sh on the dev machine and carry .whl"; exit 1; }
fi
$PY -c "import jax, sys; print('jax', jax.__version__, jax.devices(), 'python', sys.version.split()[0])" \
  || { echo "!!! jax does not start"; exit 1; }

# ---- 1. random-weight checkpoints (bf16, streamed; target and draft written in parallel)
s=$(date +%s)
write_ckpt() {  # output file (its last line: the directory), then the harness's model flags
  local out=$1; shift
  XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_PLATFORMS=cpu timeout 300 $PY bench/harness.py \
      --random_weights "$@" --ckpt_root "$CKPT_ROOT" --only_write_checkpoints >"$out"
}
write_ckpt "$OUT/.t_dir" --model "$TARGET" --methods ar &
p1=$!
if [ "$DRAFT" != self ]; then write_ckpt "$OUT/.d_dir" --draft "$DRAFT" & p2=$!; fi
wait $p1; r1=$?; r2=0
[ "$DRAFT" != self ] && { wait $p2; r2=$?; }
T_DIR=$(tail -n 1 "$OUT/.t_dir")
if [ "$DRAFT" = self ]; then D_DIR=$T_DIR; else D_DIR=$(tail -n 1 "$OUT/.d_dir"); fi
rm -f "$OUT/.t_dir" "$OUT/.d_dir"
stage_done checkpoints $(( $(date +%s) - s )) "$r1/$r2"
if [ "$r1" != 0 ] || [ "$r2" != 0 ] || [ ! -f "$T_DIR/config.json" ] || [ ! -f "$D_DIR/config.json" ]; then
  echo "!!! could not write the random checkpoints; stopping"; exit 1
fi
du -sh "$T_DIR" "$D_DIR" 2>/dev/null

# ---- 2. per method: launch the server, warm its batch shapes, 3 rates, SIGTERM it
WARM="1"; b=2; while [ "$b" -le "$BATCH" ]; do WARM="$WARM,$b"; b=$(( b * 2 )); done
IFS=, read -ra MLIST <<<"$METHODS"
JSONS=(); RCS=""; FAIL=0
for i in "${!MLIST[@]}"; do
  m=${MLIST[$i]}
  s=$(date +%s)
  limit=$(( ( $(left) - 15 ) / (${#MLIST[@]} - i) ))  # an equal share of what is left
  if [ "$limit" -lt 30 ]; then
    echo "!!! no time left for $m"; RCS="$RCS $m=skipped"; FAIL=1; continue
  fi
  SERVER=(--method "$m" --model "$T_DIR" --batch_size "$BATCH" --max_model_len "$MAX_MODEL_LEN"
          --dtype "$DTYPE" --warmup_batch_sizes "$WARM" --warmup_prompt_len "$PROMPT_LEN"
          --warmup_max_tokens "$OUTPUT_LEN" --log_level warning)
  [ "$m" != ar ] && SERVER+=(--draft "$D_DIR" --k "$K")
  timeout --signal=TERM --kill-after=30 "$limit" $PY bench/serve_load.py \
      --launch "$(printf '%q ' "${SERVER[@]}")" --launch_timeout_s $(( limit - 30 )) --label "$m" \
      --dataset random --input_len "$PROMPT_LEN" --output_len "$OUTPUT_LEN" \
      --num_prompts "$NUM_PROMPTS" --request_rates "$RATES" --warmup_ladder "1,$BATCH" \
      --random_weights --output_json "$OUT/$m.json" --server_log "$OUT/${m}_server.log"
  r=$?
  stage_done "$m" $(( $(date +%s) - s )) $r
  [ "$r" = 124 ] || [ "$r" = 143 ] && echo "!!! $m ran out of its ${limit}s: partial results in $OUT/$m.json"
  [ -f "$OUT/$m.json" ] && JSONS+=("$OUT/$m.json")
  RCS="$RCS $m=$r"
  [ "$r" = 0 ] || FAIL=1
done

# ---- 3. the plot and the table, last; server logs in one archive (8 files come back)
echo
echo "========================== RESULTS (random-weight timing) =========================="
if [ "${#JSONS[@]}" -gt 0 ]; then
  IFS=, ; $PY bench/serve_plot.py --inputs "${JSONS[*]}" --out "$OUT/serve_load.png" --table; unset IFS
fi
( cd "$OUT" && ls ./*_server.log >/dev/null 2>&1 && tar czf server_logs.tar.gz ./*_server.log \
  && rm -f ./*_server.log )
echo "stages: $STAGES total $(elapsed)s; rc:$RCS; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit "$FAIL"
