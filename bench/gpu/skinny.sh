#!/usr/bin/env bash
# The Pallas skinny matmul on one GPU (bench/RESULTS.md, "Few-row weight products"), in
# two calls of < 10 minutes each:
#
#   bash bench/gpu/skinny.sh kernels   # read ceiling; XLA vs the kernel at every weight
#                                      # shape of the 8B / 1B / 135M steps (M = 8, 32), a
#                                      # sweep of launch plans at M = 8; the kernel's tests
#                                      # (MODELS=, SWEEP_ROWS=, SWEEP_MODELS=, SWEEP_S= narrow it)
#   bash bench/gpu/skinny.sh steps     # the single step programs and AR end to end, XLA's
#                                      # products against the kernel's, same process
#
# Random weights of real shapes: timings only. JSON and logs under $OUT.
set -o pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/skinny}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee -a "$OUT/gpu.txt"
case ${1:?usage: skinny.sh kernels|steps} in
kernels)
  JAX_PLATFORMS=cuda timeout 120 $PY -m pytest -q tests/test_skinny_matmul.py 2>&1 | tail -5 \
    | tee "$OUT/gpu_pytest.log"
  timeout 420 $PY bench/probes/skinny_gemm.py --models ${MODELS:-llama-3.1-8b,llama-3.2-1b,smollm2-135m} \
    --rows 8,32 --sweep_rows ${SWEEP_ROWS:-8} --sweep_models "${SWEEP_MODELS:-}" \
    --time_budget_s ${SWEEP_S:-300} --output_json "$OUT/skinny_gemm.json" 2>&1 \
    | grep -v -i warning | tee "$OUT/skinny_gemm.log"
  ;;
steps)
  # The kernel takes only weights of <= 8 MB (kernels/skinny_matmul.py): the 8B's programs
  # are XLA's either way, so the draft's programs and the 1B / 135M AR steps are timed.
  timeout 200 $PY -m bench.probes.step_programs --target llama-3.1-8b --draft llama-3.2-1b \
    --draft_devices 0 --programs target_ar_step,draft_step,draft_glue,draft_tree_step \
    --command_buffers default --iters 40 --matmul xla,pallas \
    --output_json "$OUT/step_programs.json" 2>&1 | grep -v -i warning | tee "$OUT/step_programs.log"
  timeout 200 $PY bench/probes/fixed_cost.py --models llama-3.2-1b,smollm2-135m --batches 1 \
    --read_gb 4.3 --variants rows8_steps1,rows8_steps1_pallas,rows8_steps4,rows8_steps4_pallas \
    --output_json "$OUT/fixed_cost.json" 2>&1 | grep -v -i warning | tee "$OUT/fixed_cost.log"
  ;;
esac
