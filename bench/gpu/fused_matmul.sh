#!/usr/bin/env bash
# The layers' weight products with their norm, SiLU x up and residual adds fused in
# (kernels.fused_matmul) against XLA's, on one GPU (issue 13). Two calls:
#
#   bash bench/gpu/fused_matmul.sh kernels   # the kernel's tests on the GPU, the layer
#                                            # stack (fused_layers.py) over launch plans,
#                                            # GPU exactness of SD/SSD with the kernel
#   bash bench/gpu/fused_matmul.sh steps     # step programs and AR end to end, xla vs
#                                            # pallas, in one process each
# Random weights: timings only.
. "$(dirname "$0")/common.sh"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
quiet() { grep --line-buffered -v -i "warning"; }
case "${1:-kernels}" in
kernels)
  JAX_PLATFORMS=cuda timeout "${TESTS_S:-150}" $PY -m pytest -q -x tests/test_fused_matmul.py \
    2>&1 | tail -15 | tee "$OUT/gpu_tests.log"
  timeout "${STACK_S:-240}" $PY bench/probes/fused_layers.py \
    --shapes "${SHAPES:-llama-3.1-8b,llama-3.2-1b,smollm2-135m}" \
    --plans "${PLANS:-sp=1;bk=64;st=3;st=6;bn=32;sp=2;sp=8;bn=128,sp=4}" \
    --output_json "$OUT/fused_layers.json" 2>&1 | quiet | tee "$OUT/fused_layers.log"
  JAX_PLATFORMS=cuda timeout "${EXACT_S:-120}" $PY -m pytest -q -x tests/test_engine_exact.py \
    -k "fused or padded" 2>&1 | tail -8 | tee "$OUT/gpu_exact.log"
  ;;
steps)
  for impl in xla pallas; do
    timeout "${STEPS_S:-100}" $PY bench/probes/step_programs.py --target llama-3.1-8b \
      --draft llama-3.2-1b --draft_devices 0 --matmul $impl --command_buffers default \
      --programs target_ar_step,target_verify,draft_step,draft_glue,draft_tree_step \
      --iters 30 --output_json "$OUT/steps_$impl.json" 2>&1 | quiet | tee "$OUT/steps_$impl.log"
  done
  for impl in xla pallas; do
    timeout "${E2E_S:-130}" $PY bench/probes/fixed_cost.py \
      --models "${MODELS:-llama-3.1-8b,llama-3.2-1b,smollm2-135m}" --batches 1 \
      --variants "${VARIANTS:-rows8_steps1}" --matmul $impl --read_gb 4.3 \
      --output_json "$OUT/e2e_$impl.json" 2>&1 | quiet | tee "$OUT/e2e_$impl.log"
  done
  ;;
*) echo "usage: $0 kernels|steps" >&2; exit 2 ;;
esac
