#!/usr/bin/env bash
# The fixed cost per program on one GPU (bench/RESULTS.md, "Fixed cost per program"), in
# two calls of < 10 minutes each:
#
#   bash bench/gpu/fixed_cost.sh ours   # read ceiling, AR end to end at real shapes and
#                                       # variants, single step programs, the JAX peer
#                                       # (carry .peer/llama3: jax-ml/jax-llm-examples'
#                                       # llama3/ directory, run unmodified)
#   bash bench/gpu/fixed_cost.sh torch  # the PyTorch/transformers peer on the same weights
#                                       # shape, then the exactness tests on the GPU
#
# Random weights of real shapes: timings only. JSON and logs under $OUT.
. "$(dirname "$0")/common.sh"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
case ${1:?usage: fixed_cost.sh ours|torch} in
ours)
  # (each stage has a timeout, so what finished is under $OUT when a call runs out)
  timeout "${B1_S:-330}" $PY bench/probes/fixed_cost.py \
    --models llama-3.1-8b,llama-3.2-1b,smollm2-135m --batches 1 \
    --variants "${VARIANTS:-rows1_steps1,rows8_steps1,rows8_steps4}" \
    --output_json "$OUT/fixed_cost_b1.json" 2>&1 | grep -v -i warning | tee "$OUT/fixed_cost_b1.log"
  timeout "${B8_S:-100}" $PY bench/probes/fixed_cost.py --models llama-3.1-8b --batches 8 \
    --read_gb 4.3 --variants rows1_steps1,rows8_steps4 --output_json "$OUT/fixed_cost_b8.json" \
    2>&1 | grep -v -i warning | tee "$OUT/fixed_cost_b8.log"
  timeout "${PROGRAMS_S:-100}" $PY -m bench.probes.step_programs --target llama-3.1-8b \
    --draft llama-3.2-1b --draft_devices 0 --command_buffers default --iters 40 \
    --output_json "$OUT/step_programs.json" 2>&1 | grep -v -i warning | tee "$OUT/step_programs.log"
  [ -d .peer/llama3 ] && timeout "${PEER_S:-90}" $PY bench/peer_jax_llm_examples.py \
    --llama3_dir .peer/llama3 --output_json "$OUT/peer_jax.json" 2>&1 | grep -v -i warning \
    | tail -20 | tee "$OUT/peer_jax.log"
  ;;
torch)
  CK=/tmp/ssd_jax_random/llama-3.1-8b
  $PY -c "from ssd_jax.checkpoint import REAL_SHAPES, write_random_hf_checkpoint as w; w(REAL_SHAPES['llama-3.1-8b'], '$CK')"
  $PY bench/peer_transformers.py --model "$CK" --methods ar --prompt_len 128 --output_len 128 \
    --random_weights --output_json "$OUT/peer_torch.json" 2>&1 | grep -v -i warning | tail -15 \
    | tee "$OUT/peer_torch.log"
  JAX_PLATFORMS=cuda timeout 420 $PY -m pytest -q tests/test_engine_exact.py tests/test_sampling_exact.py \
    2>&1 | tail -15 | tee "$OUT/gpu_pytest.log"
  ;;
esac
