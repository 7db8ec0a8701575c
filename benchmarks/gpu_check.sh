#!/usr/bin/env bash
# What `make gpu-check` runs on a CUDA machine, also callable where make is missing:
#
#     bash benchmarks/gpu_check.sh [OUT]      # results to OUT (default benchmarks/results)
#
# The machine's own python3 (its CUDA build of torch and its Triton) runs benchmarks/gpu_check.py.
# Peers that machine lacks come as wheels carried in .whl/ (`make gpu-wheels` fetches them for its
# Python), installed into a private folder: all at once, else one by one, so that one wheel that
# does not fit costs only its own peer (which then reports "No module named ...").
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${GPU_PYTHON:-python3}
SITE=${GPU_SITE:-/tmp/fire-opd-site}
OUT=${1:-}
if ls .whl/*.whl >/dev/null 2>&1; then
  install() { "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$@"; }
  if ! install .whl/*.whl; then
    for wheel in .whl/*.whl; do install "$wheel" || echo "gpu-check: $wheel does not install here"; done
  fi
fi
export PYTHONPATH="$PWD:$SITE" PYTHONUNBUFFERED=1
exec "$PYTHON" benchmarks/gpu_check.py ${OUT:+--out "$OUT"}
