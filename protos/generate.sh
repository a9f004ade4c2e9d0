#!/usr/bin/env bash
# Regenerates the protobuf modules under the name they are imported as (edgemoe.protos):
# protoc derives the generated imports from the .proto's path, so it is compiled as
# edgemoe/protos/*.proto in a staging folder.
# usage: protos/generate.sh [PYTHON] [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
python=${1:-python3}
out=${2:-$here}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/edgemoe/protos"
cp "$here"/*.proto "$stage/edgemoe/protos/"
"$python" -m grpc_tools.protoc -I"$stage" --python_out="$stage" --grpc_python_out="$stage" --pyi_out="$stage" "$stage"/edgemoe/protos/*.proto
mkdir -p "$out"
cp "$stage"/edgemoe/protos/*_pb2*.py* "$out"/
