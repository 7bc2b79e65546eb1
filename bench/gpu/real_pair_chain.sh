#!/usr/bin/env bash
# The real model pair on GPUs: SmolLM2-135M-Instruct (the embedded GGUF) as target and the
# bundled distilled draft, AR / SD / SSD through bench/harness.py. The device tool carries at
# most 64 MiB per call and the GGUF alone is 98 MB, so the GGUF travels in two parts over
# two calls to the same machine (the second within the first's warm window):
#
#   bash bench/gpu/real_pair_chain.sh 1 DIR  # DIR: GGUF part 1 + wheels the machine lacks
#                                        # (gguf); stages them in $STAGE.
#   bash bench/gpu/real_pair_chain.sh 2 DIR  # DIR: GGUF part 2, the draft's layer files
#                                        # (DIR/layers), HumanEval.jsonl.gz. Joins and
#                                        # converts the GGUF, builds the draft, runs:
#                                        # bf16 timing over every prompt set (SETS), then a float32
#                                        # exactness pass (SD/SSD == AR token for token).
#
# SSD puts the draft on its own GPU (--draft_devices 1); AR and SD use GPU 0 only. On a
# machine with the repo set up (scripts/setup.sh), step 2's harness lines run as they are
# with --model/--draft left out (the embedded target and the default draft).
set -o pipefail
step=${1:?usage: real_pair_chain.sh 1|2 DIR}
C=${2:?usage: real_pair_chain.sh 1|2 DIR}
S=${STAGE:-/tmp/stage}
OUT=${OUT:-/tmp/real_pair_out}
mkdir -p "$S" "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
GGUF_SHA=${GGUF_SHA:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}
t0=$(date +%s)
say() { echo "== [real_pair_chain $step] $* ($(($(date +%s) - t0))s)"; }

case $step in
1)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$C"/*.whl || exit 2
  cp "$C/gguf.part1" "$S/" || exit 2
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  ;;
2)
  [ -f "$S/gguf.part1" ] || { echo "real_pair_chain 2: $S/gguf.part1 missing: not call 1's machine"; exit 2; }
  cat "$S/gguf.part1" "$C/gguf.part2" > "$S/model.gguf" || exit 2
  echo "$GGUF_SHA  $S/model.gguf" | sha256sum -c - || exit 2
  say "convert the GGUF, build the draft"
  python3 -c "import sys; from ssd_jax.checkpoint import ensure_converted; ensure_converted(sys.argv[1], sys.argv[2])" \
    "$S/model.gguf" "$S/target" 2>&1 | grep -v "Converting and" || exit 3
  python3 -c "import sys; from ssd_jax.checkpoint.default_draft import build_full_draft; build_full_draft(sys.argv[1], sys.argv[2], target_path=sys.argv[3])" \
    "$C/layers" "$S/draft" "$S/target" || exit 3
  export SSD_JAX_HUMANEVAL=$C/HumanEval.jsonl.gz
  PAIR=(--model="$S/target" --draft="$S/draft" --draft_devices=1 --k=7 --f=3 --batch_size=1)
  say "bf16 timing, every prompt set"
  timeout "${TIMING_S:-330}" python3 bench/harness.py "${PAIR[@]}" --methods=ar,sd,ssd ${SETS:---all} \
    --numseqs="${NUMSEQS:-8}" --output_len=128 --dtype=bfloat16 \
    --output_json="$OUT/real_pair_bf16.json" --plot="$OUT/real_pair_bf16.png" \
    2>&1 | grep -v "^[IW][0-9]\|clean_up_tokenization" | tee "$OUT/real_pair_bf16.log"
  say "float32 exactness"
  timeout "${EXACT_S:-170}" python3 bench/harness.py "${PAIR[@]}" --methods=ar,sd,ssd \
    --dataset=humaneval --numseqs="${EXACT_NUMSEQS:-8}" --output_len=64 --dtype=float32 --nosplit_pass \
    --nomeasure_bandwidth --output_json="$OUT/real_pair_f32.json" \
    2>&1 | grep -v "^[IW][0-9]\|clean_up_tokenization" | tee "$OUT/real_pair_f32.log"
  ;;
*) echo "real_pair_chain: step must be 1 or 2"; exit 2 ;;
esac
say "done"
