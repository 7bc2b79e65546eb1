#!/usr/bin/env bash
# Do XLA's CUDA graphs help or cost the decode step? AR end to end with command buffers at
# XLA's default and off (bench/probes/fixed_cost.py variants `_cboff`), and the single step
# programs under both modes (bench/probes/step_programs.py), in one GPU call (issue 13):
#
#   bash bench/gpu/command_buffers.sh
#
# Random weights of real shapes: timings only. Everything under $OUT in one archive.
. "$(dirname "$0")/common.sh"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
timeout ${BIG_S:-170} $PY bench/probes/fixed_cost.py --models llama-3.1-8b,llama-3.2-1b --batches 1 \
  --variants rows8_steps1,rows8_steps1_cboff --output_json "$OUT/fixed_cost_8b_1b.json" 2>&1 \
  | grep -v -i warning | tee "$OUT/fixed_cost_8b_1b.log"
timeout ${SMALL_S:-60} $PY bench/probes/fixed_cost.py --models smollm2-135m --batches 1 --read_gb 4.3 \
  --variants rows8_steps4,rows8_steps4_cboff --output_json "$OUT/fixed_cost_135m.json" 2>&1 \
  | grep -v -i warning | tee "$OUT/fixed_cost_135m.log"
timeout ${PROGRAMS_S:-110} $PY -m bench.probes.step_programs --target llama-3.1-8b --draft llama-3.2-1b \
  --draft_devices 0 --command_buffers default,off --iters 40 --output_json "$OUT/step_programs.json" \
  2>&1 | grep -v -i warning | tee "$OUT/step_programs.log"
(cd "$OUT" && tar czf command_buffers.tgz --remove-files ./*.json ./*.log ./*.txt)
