#!/usr/bin/env bash
# Set up (if needed) and start loramux on the embedded default model.
# Extra arguments go to `loramux`; with none, it serves gRPC on :50051 and
# Prometheus metrics on :9400 (see `loramux serve --help`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
if [ $# -eq 0 ]; then
  set -- serve
fi
exec .venv/bin/loramux "$@"
