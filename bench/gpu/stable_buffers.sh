#!/usr/bin/env bash
# The decode state donated to each round (fewer buffers that move between rounds, which
# XLA updates its CUDA graphs for before a launch) against the tree before it, on one GPU
# in one call (issue 13):
#
#   BASE=.ab/base bash bench/gpu/stable_buffers.sh
#
# 1. AR end to end at real shapes (bench/probes/fixed_cost.py): 8B and 1B at one step per
#    round, 135M at four (its default), with this tree, then with the tree at $BASE (a copy
#    of the code before, e.g. `git archive <commit> ssd_jax bench`; skipped when unset);
#    2. the three at one step per round with XLA's command-buffer log on, summarised by
#    graph_updates.py;
#    3. the engine's AR round compiled alone beside the probe's step program
#    (bench/probes/step_programs.py: target_ar_round vs target_ar_step), to tell whether
#    what the engine adds per step is in its program or in its host loop.
# Random weights of real shapes: timings only. Everything under $OUT in one archive.
. "$(dirname "$0")/common.sh"
fixed_cost() {  # TREE TAG TIMEOUT: the three AR points with the code at TREE
  PYTHONPATH=$PWD/$1 timeout "$3" $PY "$1/bench/probes/fixed_cost.py" \
    --models llama-3.1-8b,llama-3.2-1b --batches 1 --variants rows8_steps1 \
    --output_json "$OUT/fixed_cost_$2.json" 2>&1 | grep -v -i warning | tee "$OUT/fixed_cost_$2.log"
  PYTHONPATH=$PWD/$1 timeout "$3" $PY "$1/bench/probes/fixed_cost.py" \
    --models smollm2-135m --batches 1 --variants rows8_steps4 --read_gb 4.3 \
    --output_json "$OUT/fixed_cost_135m_$2.json" 2>&1 | grep -v -i warning \
    | tee "$OUT/fixed_cost_135m_$2.log"
}
fixed_cost . new "${NEW_S:-100}"
[ -n "$BASE" ] && fixed_cost "$BASE" base "${BASE_S:-100}"
TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 PYTHONPATH=$PWD \
  timeout ${GRAPHS_S:-100} $PY bench/probes/fixed_cost.py \
  --models smollm2-135m,llama-3.2-1b,llama-3.1-8b --batches 1 --variants rows8_steps1 \
  --repeats 1 --output_json "$OUT/graphs_fixed_cost.json" 2> "$OUT/xla_cb.log" \
  | tee "$OUT/graphs_fixed_cost.log"
$PY bench/probes/graph_updates.py "$OUT/xla_cb.log" --output_json "$OUT/graph_updates.json" \
  | tee "$OUT/graph_updates.log"
grep -m 20 "command buffer" "$OUT/xla_cb.log" > "$OUT/xla_cb_head.log"; rm -f "$OUT/xla_cb.log"
PYTHONPATH=$PWD timeout ${PROGRAMS_S:-80} $PY -m bench.probes.step_programs \
  --target llama-3.1-8b --draft llama-3.2-1b --draft_devices 0 --command_buffers default \
  --programs target_ar_step,target_ar_round,draft_step --iters 40 \
  --output_json "$OUT/step_programs.json" 2>&1 | grep -v -i warning | tee "$OUT/step_programs.log"
# At most 8 files come back from a device call: everything in one archive.
(cd "$OUT" && tar czf stable_buffers.tgz --remove-files ./*.json ./*.log ./*.txt)
