#!/usr/bin/env bash
# Generate the Python gRPC code for protos/loramux/v1 into protos/gen/loramux_api
# (the importable package `loramux_api.v1`). Generated code is never edited or
# committed; deploy/setup.sh runs this. Usage: bash deploy/gen_protos.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${1:-.venv/bin/python}
out=protos/gen
rm -rf "$out.tmp" && mkdir -p "$out.tmp"
# -Iloramux_api=protos/loramux maps the files to loramux_api/v1/*.proto, so the
# generated imports read `from loramux_api.v1 import ...` and never collide with
# the server package `loramux`.
"$PYTHON" -m grpc_tools.protoc -Iloramux_api=protos/loramux \
  --python_out="$out.tmp" --grpc_python_out="$out.tmp" --pyi_out="$out.tmp" \
  protos/loramux/v1/*.proto
echo '"""Generated from protos/loramux (deploy/gen_protos.sh); do not edit."""' > "$out.tmp/loramux_api/__init__.py"
touch "$out.tmp/loramux_api/v1/__init__.py"
rm -rf "$out" && mv "$out.tmp" "$out"
