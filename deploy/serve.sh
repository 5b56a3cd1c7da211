#!/usr/bin/env bash
# Set up (if needed) and start loramux on the embedded default model.
# Extra arguments go to `loramux`; with none, it generates one answer locally.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/setup.sh
if [ $# -eq 0 ]; then
  set -- run --chat "In one sentence, what is a LoRA adapter?" --max-tokens 64
fi
exec .venv/bin/loramux "$@"
