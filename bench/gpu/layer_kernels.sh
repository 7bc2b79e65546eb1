#!/usr/bin/env bash
# The RoPE + KV-write kernel (ssd_jax/kernels/pallas_layer.py) against the code before it,
# and how often XLA re-records its CUDA graphs, on one GPU in one call (issue 13):
#
#   BASE=.ab/base bash bench/gpu/layer_kernels.sh
#
# 1. their tests on the GPU (Triton kernels against the XLA reference, the model with
#    either impl) and the engine's exactness tests; 2. AR end to end at real shapes (bench/probes/fixed_cost.py) with this
#    tree; 3. the same with the tree at $BASE (a copy of the code before, e.g. from
#    `git archive <commit> ssd_jax bench`; skipped when unset), A/B in the same process
#    kind and minute (after 3.); 3. AR again with XLA's command-buffer log on, summarised
#    by graph_updates.py; 5. the device timeline of the step programs (kernel_timeline.py).
# Random weights of real shapes: timings only. JSON and logs under $OUT.
. "$(dirname "$0")/common.sh"
MODELS=${MODELS:-llama-3.1-8b,llama-3.2-1b,smollm2-135m}
VARIANTS=${VARIANTS:-rows8_steps1,rows8_steps4}
PYTHONPATH=$PWD JAX_PLATFORMS=cuda timeout ${TEST_S:-200} $PY -m pytest -q -p no:cacheprovider \
  tests/test_layer_kernels.py tests/test_kernels.py -k "rope or model_pallas" \
  2>&1 | tail -15 | tee "$OUT/gpu_pytest.log"
# The engine's exactness tests on the GPU (AR = SD = SSD token for token, float32).
PYTHONPATH=$PWD JAX_PLATFORMS=cuda timeout ${EXACT_S:-300} $PY -m pytest -q -p no:cacheprovider \
  tests/test_engine_exact.py 2>&1 | tail -15 | tee "$OUT/gpu_exact.log"
PYTHONPATH=$PWD timeout ${NEW_S:-240} $PY bench/probes/fixed_cost.py --models "$MODELS" --batches 1 \
  --variants "$VARIANTS" --output_json "$OUT/fixed_cost_new.json" 2>&1 | grep -v -i warning \
  | tee "$OUT/fixed_cost_new.log"
TF_CPP_MIN_LOG_LEVEL=0 TF_CPP_VMODULE=command_buffer_thunk=3 PYTHONPATH=$PWD \
  timeout ${GRAPHS_S:-100} $PY bench/probes/fixed_cost.py --models llama-3.2-1b,llama-3.1-8b \
  --batches 1 --variants rows8_steps1 --repeats 1 --output_json "$OUT/graphs_fixed_cost.json" \
  2> "$OUT/xla_cb.log" | tee "$OUT/graphs_fixed_cost.log"
$PY bench/probes/graph_updates.py "$OUT/xla_cb.log" --output_json "$OUT/graph_updates.json" \
  | tee "$OUT/graph_updates.log"
grep -m 20 "command buffer" "$OUT/xla_cb.log" > "$OUT/xla_cb_head.log"; rm -f "$OUT/xla_cb.log"
if [ -n "$BASE" ]; then
  PYTHONPATH=$PWD/$BASE timeout ${BASE_S:-150} $PY "$BASE/bench/probes/fixed_cost.py" \
    --models "$MODELS" --batches 1 --variants "$VARIANTS" \
    --output_json "$OUT/fixed_cost_base.json" 2>&1 | grep -v -i warning \
    | tee "$OUT/fixed_cost_base.log"
fi
PYTHONPATH=$PWD timeout ${TIMELINE_S:-90} $PY bench/probes/kernel_timeline.py --target llama-3.1-8b \
  --draft llama-3.2-1b --draft_devices 0 --output_json "$OUT/timeline.json" 2>&1 \
  | grep -v -i warning | tee "$OUT/timeline.log"
# At most 8 files come back from a device call: everything in one archive.
(cd "$OUT" && tar czf layer_kernels.tgz --remove-files ./*.json ./*.log ./*.txt)
