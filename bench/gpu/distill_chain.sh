#!/usr/bin/env bash
# Distils the default draft of SmolLM2-135M-Instruct on a one-GPU machine whose calls are
# capped at 10 minutes each and at 64 MiB of files carried per call (the workplace's device
# tool; bench/DISTILL.md says why the run is cut this way). Three calls on the same machine:
#
#   bash bench/gpu/distill_chain.sh 1 DIR  # DIR: GGUF part 1, tokenizer files (DIR/tok),
#                                      # prompts.npz, wheels. Stages them in $STAGE,
#                                      # tokenises the machine's own installed text and
#                                      # rehearses the whole run on a random target of the
#                                      # same shape (fills the JAX compilation cache).
#   bash bench/gpu/distill_chain.sh 2 DIR  # DIR: GGUF part 2. Joins and checks the GGUF,
#                                      # converts it (ssd_jax.checkpoint), self-generates,
#                                      # trains until STOP2_S, checkpointing (orbax).
#   bash bench/gpu/distill_chain.sh 3      # resumes to the end of the schedule, exports the
#                                      # draft layers to $OUT/layers, evaluates.
#
# On a machine with the repo installed and no call limits, the single command in
# bench/DISTILL.md ("Repeatable command") does the same in one process.
set -o pipefail
step=${1:?usage: distill_chain.sh 1|2|3 [carry dir]}
C=${2:-}
S=${STAGE:-/tmp/stage}
OUT=${OUT:-/tmp/distill_out}
CK=${CKPT_DIR:-/tmp/distill_ckpt}
mkdir -p "$S" "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=true
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/jaxcache}
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
GGUF_SHA=${GGUF_SHA:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}
t0=$(date +%s)
say() { echo "== [distill_chain $step] $* ($(($(date +%s) - t0))s)"; }

# One schedule for all three calls. RUN_S sizes the run (seconds of training, measured
# speed) across calls 2 and 3; STOP2_S ends call 2's share; BUDGET3_S caps call 3.
FLAGS=(--draft_layers="${LAYERS:-6}" --init_from_target --freeze_embeddings
  --batch="${BATCH:-32}" --seq_len="${SEQ:-512}" --lr=1e-3 --warmup=200 --weight_decay=0.01 --clip=1.0
  --self_gen="${SELF_GEN:-32768}" --self_gen_tokens=256 --self_gen_mix="${MIX:-0.6}"
  --gen_batch="${GEN_BATCH:-1024}"
  --eval_batches=8 --eval_sets=humaneval,humaneval_chat --eval_prompts="${EVAL_PROMPTS:-164}"
  --eval_max_new=128 --eval_gen_batch="${EVAL_GEN_BATCH:-168}" --eval_ks=4,7 --log_every=50 --ckpt_every=500
  --layers_dtype=int8 --layers_shard_mb=15
  --corpus="$S/corpus.u16" --heldout_corpus="$S/heldout.u16" --prompts_file="$S/prompts.npz")

case $step in
1)
  [ -d "$C" ] || { echo "distill_chain 1: carry dir '$C' not found"; exit 2; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$C"/*.whl || exit 2
  cp "$C/gguf.part1" "$C/prompts.npz" "$S/" && rm -rf "$S/tok" && cp -r "$C/tok" "$S/tok" || exit 2
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import sys, jax, flax, optax, orbax.checkpoint, gguf, transformers; print(sys.version.split()[0], 'jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'transformers', transformers.__version__)" || exit 2
  say "tokenise the machine's text"
  python3 -m ssd_jax.distill --mode=tokenize --tokenizer="$S/tok" --split=heldout \
    --max_tokens="${HELD_TOKENS:-300000}" --tokens_out="$S/heldout.u16" || exit 3
  python3 -m ssd_jax.distill --mode=tokenize --tokenizer="$S/tok" --split=train \
    --shuffle_buffer=256 --max_tokens=80000000 --tokenize_seconds="${TOK_S:-100}" \
    --tokens_out="$S/corpus.u16" || exit 3
  say "rehearsal on a random target of the same shape"
  python3 -m ssd_jax.distill "${FLAGS[@]}" --target=random:smollm2 --tokenizer="$S/tok" \
    --ckpt_dir=/tmp/rehearsal_ckpt --steps=0 --time_budget_s="${REHEARSAL_S:-110}" \
    --self_gen_seconds=20 --layers_out=/tmp/rehearsal_layers \
    --eval_json="$OUT/rehearsal.json" 2>&1 | tee "$OUT/rehearsal.log" || exit 4
  rm -rf /tmp/rehearsal_ckpt
  ;;
2)
  [ -f "$S/gguf.part1" ] || { echo "distill_chain 2: $S/gguf.part1 missing: not call 1's machine"; exit 2; }
  cat "$S/gguf.part1" "$C/gguf.part2" > "$S/model.gguf" || exit 2
  echo "$GGUF_SHA  $S/model.gguf" | sha256sum -c - || exit 2
  say "convert the GGUF"
  python3 -c "import sys; from ssd_jax.checkpoint import ensure_converted; print(ensure_converted(sys.argv[1], sys.argv[2]))" \
    "$S/model.gguf" "$S/target" || exit 3
  say "self-generate and train"
  python3 -m ssd_jax.distill "${FLAGS[@]}" --target="$S/target" --ckpt_dir="$CK" \
    --steps=0 --time_budget_s="${RUN_S:-1000}" --self_gen_seconds="${GEN_S:-150}" \
    --stop_after_s="${STOP2_S:-330}" --noeval --layers_out="$OUT/layers_call2" \
    2>&1 | tee "$OUT/train_call2.log" || exit 4
  ;;
3)
  [ -d "$CK" ] || { echo "distill_chain 3: no checkpoint at $CK: not call 2's machine"; exit 2; }
  say "resume, export, evaluate"
  python3 -m ssd_jax.distill "${FLAGS[@]}" --target="$S/target" --ckpt_dir="$CK" --resume \
    --steps=0 --time_budget_s="${BUDGET3_S:-500}" --layers_out="$OUT/layers" \
    --eval_json="$OUT/eval.json" 2>&1 | tee "$OUT/train_call3.log" || exit 4
  ;;
*) echo "distill_chain: step must be 1, 2 or 3"; exit 2 ;;
esac
say "done"
