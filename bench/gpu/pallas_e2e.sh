#!/usr/bin/env bash
# Issue 13's end-to-end figures with the kernels the engine runs on GPU, in one call:
#
#   bash bench/gpu/pallas_e2e.sh     # carry .peer/llama3 for the JAX peer
#
# 1. AR end to end (bench/probes/fixed_cost.py), batch 1, Pallas attention: 8B at one and
#    four steps per round and with KV pages of 256 tokens; 1B and 135M at the same plus
#    four steps with 256-token pages (the candidates for a small-model default);
# 2. the same 8B and 1B point with XLA's attention, the impl every fixed_cost figure before
#    94afce1 timed by mistake;
# 3. the engine's loop under the profiler, graphs kept (bench/probes/engine_timeline.py);
# 4. the JAX peer (jax-llm-examples' llama3, unmodified) on the same GPU;
# 5. the engine's exactness tests on the GPU (Pallas kernels on the given models), with
#    whatever time the call has left.
# Each stage archives its own output as it ends, so a call cut short still returns what
# finished (at most 8 files come back from a call). Random weights: timings only.
. "$(dirname "$0")/common.sh"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
quiet() { grep --line-buffered -v -i "warning"; }
# pack NAME PATTERN...: the patterns are expanded in $OUT (quote them at the call)
pack() { (cd "$OUT" && shopt -s nullglob && set -- "$1" ${*:2} && tar czf "$1.tgz" --remove-files "${@:2}"); }
timeout "${BIG_S:-110}" $PY bench/probes/fixed_cost.py --models llama-3.1-8b --batches 1 \
  --variants rows8_steps1,rows8_steps4,rows8_steps1_pg256 --output_json "$OUT/fixed_cost_8b.json" \
  2>&1 | quiet | tee "$OUT/fixed_cost_8b.log"
timeout "${SMALL_S:-110}" $PY bench/probes/fixed_cost.py --models llama-3.2-1b,smollm2-135m \
  --batches 1 --variants rows8_steps1,rows8_steps4,rows8_steps1_pg256,rows8_steps4_pg256 \
  --output_json "$OUT/fixed_cost_small.json" 2>&1 | quiet | tee "$OUT/fixed_cost_small.log"
pack fixed_cost "fixed_cost_*"
timeout "${XLA_S:-50}" $PY bench/probes/fixed_cost.py --models llama-3.1-8b,llama-3.2-1b \
  --batches 1 --variants rows8_steps1 --attention xla --output_json "$OUT/fixed_cost_xla.json" \
  2>&1 | quiet | tee "$OUT/fixed_cost_xla.log"
pack attention_xla "fixed_cost_xla.*"
XLA_FLAGS="--xla_enable_command_buffers_during_profiling=true ${XLA_FLAGS:-}" \
  timeout "${TIMELINE_S:-100}" $PY bench/probes/engine_timeline.py \
  --models llama-3.1-8b,llama-3.2-1b,smollm2-135m --output_dir "$OUT/timeline" 2>&1 | quiet \
  | tee "$OUT/engine_timeline.log"
mkdir -p "$OUT/traces" && mv "$OUT"/timeline/trace_* "$OUT/traces/" 2>/dev/null
pack engine_timeline engine_timeline.log timeline
pack engine_traces traces
[ -d .peer/llama3 ] && timeout "${PEER_S:-150}" $PY bench/peer_jax_llm_examples.py \
  --llama3_dir .peer/llama3 --output_json "$OUT/peer_jax.json" 2>&1 | quiet | tail -20 \
  | tee "$OUT/peer_jax.log"
pack peer_jax "peer_jax.*"
JAX_PLATFORMS=cuda timeout "${EXACT_S:-300}" $PY -m pytest -q -x tests/test_engine_exact.py \
  2>&1 | tail -15 | tee "$OUT/gpu_exact.log"
