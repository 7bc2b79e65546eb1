#!/usr/bin/env bash
# Batch-1 decode on one GPU in one call (~5 minutes): where a call's time goes. Writes
# under $OUT:
#   check.log            compiled kernel vs reference (quick set, 20 repeats per split case)
#   sweep.{json,log}     decode B=1 at 4k/16k (8b, 70b): split counts, merges, block_k,
#                        stages, warps; each timed in one program with the pool rotated
#                        through more than the L2, next to XLA reading the same bytes
#   l2.{json,log}        one such row with a single, L2-resident pool, for contrast
#   ncu.csv              kernel-only GPU time, DRAM bytes, registers and occupancy of each
#                        launch (Nsight Compute, caches flushed before each kernel),
#                        8b decode B=1 4k, defaults
#
#   OUT=/tmp/out bash bench/gpu/kernels_batch1.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-/tmp/ssd_jax_kernels_out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
B=bench/probes/kernel_bench.py
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv > "$OUT/gpu.txt" 2>&1

timeout 150 python3 $B --check --check_set=quick --rows=none 2>&1 | tee "$OUT/check.log"

CFGS="/merge=xla/sp=8/sp=12/sp=16/sp=24/k=32/k=128/st=2/st=4/w=2/w=8/sp=16,k=128/sp=16,st=4"
timeout 200 python3 $B --rows=none --time_budget_s=170 --output_json="$OUT/sweep.json" \
  --sweep_plan="8b:decode:1:4096@$CFGS 8b:decode:1:16384@/sp=16/sp=24/k=128 \
                70b:decode:1:4096,16384@/sp=16/sp=24" 2>&1 | tee "$OUT/sweep.log"

timeout 60 python3 $B --rows=none --rotate_mb=0 --output_json="$OUT/l2.json" \
  --sweep_plan="8b:decode:1:4096@" 2>&1 | tee "$OUT/l2.log"

NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
M=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__registers_per_thread
M=$M,launch__shared_mem_per_block_dynamic,launch__waves_per_multiprocessor
M=$M,sm__warps_active.avg.pct_of_peak_sustained_active
if [ -n "$NCU" ]; then
  timeout 120 "$NCU" --clock-control none --cache-control all --csv --metrics $M \
    --kernel-name regex:paged_attention --launch-count 8 \
    python3 $B --rows=none --rotate_mb=0 --repeats=1 --inner=2 --noreference --noread_floor \
    --sweep_plan="8b:decode:1:4096@" > "$OUT/ncu.csv" 2> "$OUT/ncu.err"
  grep -c paged_attention "$OUT/ncu.csv"
else
  echo "no ncu on this machine"
fi
