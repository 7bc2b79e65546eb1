#!/usr/bin/env bash
# The same AR measurement (bench/probes/fixed_cost.py) on two source trees, alternated in
# one GPU call so that clock drift between calls cannot pass for a difference:
#
#   bash bench/gpu/ab_trees.sh BEFORE_DIR [MODELS] [ROUNDS]
#
# BEFORE_DIR holds `ssd_jax/` and `bench/` of the other version (e.g. `git archive` of a
# commit, or this tree with some commits reverted), carried to the GPU machine as an
# ignored path; "after" is this tree. MODELS defaults to llama-3.1-8b, ROUNDS to 2
# (before, after, before, after). JSON per run and a summary under $OUT.
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
summary = [{"side": s, "model": m, "best_ms_per_token": v} for (s, m), v in sorted(best.items())]
json.dump(summary, open(f"{out}/summary.json", "w"), indent=1)
for row in summary:
  print(f"{row['side']:7s} {row['model']:14s} {row['best_ms_per_token']:.3f} ms/token")
EOF
