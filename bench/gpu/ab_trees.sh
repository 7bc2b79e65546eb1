#!/usr/bin/env bash
# The same AR measurement (bench/probes/fixed_cost.py) on two source trees, alternated in
# one GPU call so that clock drift between calls cannot pass for a difference:
#
#   bash bench/gpu/ab_trees.sh BEFORE_DIR [MODELS] [ROUNDS]
#
# BEFORE_DIR holds `ssd_jax/` and `bench/` of the other version (e.g. `git archive` of a
# commit, or this tree with some commits reverted), carried to the GPU machine as an
# ignored path; "after" is this tree. MODELS defaults to llama-3.1-8b, ROUNDS to 2
# (before, after, before, after). STEP_PROGRAMS=1 also times the single step programs
# (bench/probes/step_programs.py: 8B AR step and verify, 1B draft, glue and tree step) on
# each side in each round. Under $OUT: summary.json and the per-run JSON and logs in
# runs.tar.gz.
set -o pipefail
cd "$(dirname "$0")/../.."
BEFORE=${1:?usage: ab_trees.sh BEFORE_DIR [MODELS] [ROUNDS]}
MODELS=${2:-llama-3.1-8b}
ROUNDS=${3:-2}
OUT=${OUT:-/tmp/ab_trees}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee -a "$OUT/gpu.txt"
for r in $(seq 1 "$ROUNDS"); do
  for side in before after; do
    dir=$PWD; [ "$side" = before ] && dir=$(cd "$BEFORE" && pwd)
    (cd "$dir" && PYTHONPATH=$dir $PY bench/probes/fixed_cost.py --models "$MODELS" \
      --batches 1 --variants rows8_steps1 --read_gb 4.3 \
      --output_json "$OUT/${side}_$r.json") 2>&1 | grep -v -i warning | tee "$OUT/${side}_$r.log"
    [ "${STEP_PROGRAMS:-0}" = 1 ] && (cd "$dir" && PYTHONPATH=$dir $PY -m bench.probes.step_programs \
      --target llama-3.1-8b --draft llama-3.2-1b --draft_devices 0 --command_buffers default \
      --iters 40 --output_json "$OUT/steps_${side}_$r.json") 2>&1 | grep -v -i warning \
      | tee "$OUT/steps_${side}_$r.log"
  done
done
$PY - "$OUT" <<'EOF'
import glob, json, sys
out = sys.argv[1]
best = {}
for path in sorted(glob.glob(f"{out}/*_[0-9]*.json")):
  side = path.rsplit("/", 1)[1].split("_")[0]
  for row in json.load(open(path)).get("rows", []):
    if "ms" in row:
      key = (side, row["model"])
      best[key] = min(best.get(key, 1e9), row["ms"])
for path in sorted(glob.glob(f"{out}/steps_*_[0-9]*.json")):
  side = path.rsplit("/", 1)[1].split("_")[1]
  for program, modes in json.load(open(path)).items():
    for mode, row in modes.items():
      if "ms" in row:
        key = (side, f"{program}[{row.get('kernels')} kernels]")
        best[key] = min(best.get(key, 1e9), row["ms"])
summary = [{"side": s, "model": m, "best_ms": v} for (s, m), v in sorted(best.items())]
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
for row in summary:
  print(f"{row['side']:7s} {row['model']:36s} {row['best_ms']:.3f} ms")
EOF
# At most 8 files come back from a device call: the per-run files go in one archive.
(cd "$OUT" && tar -czf runs.tar.gz ./*_[0-9]*.json ./*_[0-9]*.log && rm -f ./*_[0-9]*.json ./*_[0-9]*.log)
