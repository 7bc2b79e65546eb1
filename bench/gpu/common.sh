# The preamble every one-call GPU measurement script sources: the repository root as the
# working directory, $OUT (default /tmp/<script name>) made, $PY, unbuffered Python, and
# the GPU's clocks at the start in $OUT/gpu.txt. Scripts that time another tree ($BASE)
# set PYTHONPATH per command; the others export it after sourcing this.
set -o pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 2
OUT=${OUT:-/tmp/$(basename "$0" .sh)}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,clocks.mem --format=csv | tee -a "$OUT/gpu.txt"
