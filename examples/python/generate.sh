#!/usr/bin/env bash
# Generates Python stubs for the Signpost API from proto/ into ./gen (or the directory given).
# Needs: pip install grpcio-tools
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-"$here/gen"}
mkdir -p "$out"
python3 -m grpc_tools.protoc \
  -I "$here/../../proto" \
  --python_out="$out" \
  --grpc_python_out="$out" \
  "$here/../../proto/signpost/v1/registry.proto"
# Make the generated tree importable as packages.
touch "$out/signpost/__init__.py" "$out/signpost/v1/__init__.py"
echo "generated stubs in $out"
