#!/usr/bin/env bash
# What a batch-1 decode step's small kernels are, in one call (issue 13):
#
#   bash bench/gpu/decode_anatomy.sh
#
# 1. The optimized HLO of the AR step and the draft step (bench/probes/step_programs.py
#    --hlo_dir) for the 8B, 1B and 135M shapes, and the first layers' launches read from it
#    (bench/probes/hlo_stats.py --launches): which ops XLA left in kernels of their own
#    beside the GEMMs (norms, residual adds, SiLU x up);
# 2. the decode attention kernel alone at batch 1 (bench/probes/kernel_bench.py --sweep)
#    over block sizes, warps, stages and splits, at the engine's short contexts (256) and
#    at a 2048-token page table (the default max_model_len).
# Random weights: timings only.
. "$(dirname "$0")/common.sh"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
quiet() { grep --line-buffered -v -i "warning"; }
timeout "${HLO_S:-150}" $PY bench/probes/step_programs.py --target llama-3.1-8b \
  --draft llama-3.2-1b --draft_devices 0 --programs target_ar_step,draft_step \
  --command_buffers default --iters 20 --hlo_dir "$OUT/hlo" 2>&1 | quiet | tee "$OUT/steps.log"
timeout "${HLO_SMALL_S:-60}" $PY bench/probes/step_programs.py --target smollm2-135m \
  --draft smollm2-135m --draft_devices 0 --programs target_ar_step \
  --command_buffers default --iters 20 --hlo_dir "$OUT/hlo_135m" 2>&1 | quiet | tee -a "$OUT/steps.log"
mv "$OUT/hlo_135m/target_ar_step_default.txt" "$OUT/hlo/smollm2_ar_step_default.txt" 2>/dev/null
for f in "$OUT"/hlo/*.txt; do
  echo "== $(basename "$f")"; $PY bench/probes/hlo_stats.py --launches 40 < "$f"
done > "$OUT/launches.txt" 2>&1
(cd "$OUT" && tar czf hlo.tgz hlo && rm -rf hlo hlo_135m)
timeout "${SWEEP_S:-200}" $PY bench/probes/kernel_bench.py --rows=none --reference=false \
  --read_floor=false --time_budget_s "${SWEEP_BUDGET_S:-180}" \
  --sweep_plan="${SWEEP_PLAN:-8b,1b,draft:decode:1:256,2048@/k=128/k=256/k=128,st=2/k=256,st=1/w=2/w=8/sp=1/sp=2/sp=4/sp=8}" \
  --output_json "$OUT/attention_b1.json" 2>&1 | quiet | tee "$OUT/attention_b1.log"
