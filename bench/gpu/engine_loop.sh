#!/usr/bin/env bash
# What the engine's loop adds to a decode step, on one GPU in one call (issue 13):
#
#   bash bench/gpu/engine_loop.sh
#
# 1. AR end to end (bench/probes/fixed_cost.py) with XLA's attention against the Pallas
#    kernels (the impl a loaded model gets on GPU), 8B and 1B at one step per round; then
#    KV pages of 256 tokens (a 128 + 128-token sequence never grows a page while decoding,
#    so the batch's constants are never replaced between rounds) against the default 64;
# 2. the engine's loop under the profiler with its CUDA graphs kept
#    (bench/probes/engine_timeline.py): the device's idle time per step and the host
#    phase running in each idle gap, 8B / 1B / 135M;
# 3. the 8B step's graph updates with the Pallas kernels (XLA's command-buffer log,
#    bench/probes/graph_updates.py).
# Random weights of real shapes: timings only. Everything under $OUT in one archive.
. "$(dirname "$0")/common.sh"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
quiet() { grep --line-buffered -v -i "warning"; }
timeout "${ATTN_S:-110}" $PY bench/probes/fixed_cost.py --models llama-3.1-8b,llama-3.2-1b \
  --batches 1 --variants rows8_steps1 --attention xla --output_json "$OUT/fixed_cost_xla.json" \
  2>&1 | quiet | tee "$OUT/fixed_cost_xla.log"
timeout "${PAGES_S:-110}" $PY bench/probes/fixed_cost.py --models llama-3.1-8b,llama-3.2-1b \
  --batches 1 --variants rows8_steps1,rows8_steps1_pg256 --output_json "$OUT/fixed_cost_pg.json" \
  2>&1 | quiet | tee "$OUT/fixed_cost_pg.log"
XLA_FLAGS="--xla_enable_command_buffers_during_profiling=true ${XLA_FLAGS:-}" \
  timeout "${TIMELINE_S:-150}" $PY bench/probes/engine_timeline.py \
  --models llama-3.1-8b,llama-3.2-1b,smollm2-135m --output_dir "$OUT/timeline" 2>&1 | quiet \
  | tee "$OUT/engine_timeline.log"
TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 \
  timeout "${GRAPHS_S:-70}" $PY bench/probes/fixed_cost.py --models llama-3.1-8b --batches 1 \
  --variants rows8_steps1 --repeats 1 --output_json "$OUT/graphs_fixed_cost.json" \
  2> "$OUT/xla_cb.log" | tee "$OUT/graphs_fixed_cost.log"
$PY bench/probes/graph_updates.py "$OUT/xla_cb.log" --output_json "$OUT/graph_updates.json" \
  | tee "$OUT/graph_updates.log"
rm -f "$OUT/xla_cb.log"
# At most 8 files come back from a device call: everything in one archive.
(cd "$OUT" && tar czf engine_loop.tgz --remove-files ./*.json ./*.log ./*.txt timeline)
