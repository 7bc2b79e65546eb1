#!/usr/bin/env bash
# Does another of XLA's GEMM back ends read the decode step's weights faster? The step
# programs (8B AR step and verify, 1B draft, glue and tree step) and AR end to end (8B,
# 1B; bench/probes/fixed_cost.py, rows8_steps1) under each XLA_FLAGS setting below, in
# one GPU call (issue 13):
#
#   bash bench/gpu/gemm_flags.sh
#
# A flag this XLA does not know is reported and its variant skipped. Random weights of
# real shapes: timings only. Under $OUT: summary.json and every run's JSON and log in
# runs.tar.gz (at most 8 files come back from a device call).
. "$(dirname "$0")/common.sh"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
VARIANTS=${VARIANTS:-"default=
cublas_only=--xla_gpu_enable_triton_gemm=false
triton_any=--xla_gpu_triton_gemm_any=true
cublaslt=--xla_gpu_enable_cublaslt=true"}
while IFS='=' read -r name flags; do
  [ -z "$name" ] && continue
  export XLA_FLAGS="$flags"
  if ! $PY -c "import jax; jax.devices()" > "$OUT/check_$name.log" 2>&1; then
    echo "$name: XLA refused XLA_FLAGS='$flags' (see check_$name.log); skipped" | tee -a "$OUT/skipped.txt"
    continue
  fi
  echo "== $name: XLA_FLAGS='$flags'"
  timeout 240 $PY -m bench.probes.step_programs --target llama-3.1-8b --draft llama-3.2-1b \
    --draft_devices 0 --command_buffers default --iters 40 \
    --output_json "$OUT/steps_$name.json" 2>&1 | grep -v -i warning | tee "$OUT/steps_$name.log"
  timeout 240 $PY bench/probes/fixed_cost.py --models llama-3.1-8b,llama-3.2-1b --batches 1 \
    --variants rows8_steps1 --read_gb 4.3 --output_json "$OUT/e2e_$name.json" 2>&1 \
    | grep -v -i warning | tee "$OUT/e2e_$name.log"
done <<< "$VARIANTS"
unset XLA_FLAGS
$PY - "$OUT" <<'PYEOF'
import glob, json, os, sys
out = sys.argv[1]
rows = []
for path in sorted(glob.glob(f"{out}/steps_*.json")):
  name = os.path.basename(path)[len("steps_"):-len(".json")]
  for program, modes in json.load(open(path)).items():
    for row in modes.values():
      if "ms" in row:
        rows.append({"variant": name, "what": program, "ms": row["ms"],
                     "kernels": row.get("kernels"), "gemms": row.get("gemms")})
for path in sorted(glob.glob(f"{out}/e2e_*.json")):
  name = os.path.basename(path)[len("e2e_"):-len(".json")]
  for row in json.load(open(path)).get("rows", []):
    if "ms" in row:
      rows.append({"variant": name, "what": f"{row['model']} AR end to end", "ms": row["ms"]})
json.dump(rows, open(f"{out}/summary.json", "w"), indent=1)
for r in rows:
  print(f"{r['variant']:12s} {r['what']:28s} {r['ms']:.3f} ms  kernels {r.get('kernels')} gemms {r.get('gemms')}")
PYEOF
(cd "$OUT" && tar -czf runs.tar.gz ./steps_* ./e2e_* ./check_* && rm -f ./steps_* ./e2e_* ./check_*)
