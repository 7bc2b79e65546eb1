#!/usr/bin/env bash
# The server's Python packages as wheels for the GPU machine, whose image has httpx,
# prometheus-client, anyio, click, h11 and annotated-doc but not FastAPI, Starlette,
# pydantic or uvicorn (../../.library/device/KINDS.md, "Python packages already there"),
# and cannot reach a registry. Run once here, at the repository root; then name `.whl` in
# the device call's `carry`; bench/gpu/serve_load.sh installs them when the imports fail.
#
#   bash bench/gpu/serve_wheels.sh      # -> .whl/ (9 wheels, ~3 MB; cp312, x86-64)
#
# The versions are this repository's development environment's (the tests' server).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.whl/' "$(git rev-parse --git-common-dir)/info/exclude" 2>/dev/null \
  || echo /.whl/ >>"$(git rev-parse --git-common-dir)/info/exclude"
PY=${PYTHON:-python3}
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic_core==2.50.5 \
  annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 \
  opentelemetry-api==1.45.2 uvicorn==0.55.0
ls .whl
du -sh .whl
