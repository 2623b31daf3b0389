#!/usr/bin/env bash
# Generates the Python SDK, package `imgd_sdk`, into OUTDIR (default client/python/build) from
# proto/ with Debian's protoc (protobuf-compiler, libprotobuf-dev for the well-known types) and
# grpc_python_plugin (protobuf-compiler-grpc). Use it with Debian's python3-protobuf and
# python3-grpcio: PYTHONPATH=OUTDIR /usr/bin/python3 -c 'import imgd_sdk'.
#
#   client/python/generate.sh [OUTDIR]
#
# Generated code is not committed: OUTDIR is replaced on every run.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
out=${1:-$here/build}

protoc=/usr/bin/protoc
plugin=/usr/bin/grpc_python_plugin
wkt=/usr/include # google/protobuf/*.proto, from libprotobuf-dev
[ -x "$protoc" ] || { echo "generate.sh: $protoc missing: apt-get install protobuf-compiler" >&2; exit 1; }
[ -x "$plugin" ] || { echo "generate.sh: $plugin missing: apt-get install protobuf-compiler-grpc" >&2; exit 1; }
[ -f "$wkt/google/protobuf/timestamp.proto" ] || { echo "generate.sh: $wkt/google/protobuf/timestamp.proto missing: apt-get install libprotobuf-dev" >&2; exit 1; }

# The .proto roots are buf's inputs (buf.gen.yaml `- directory:` lines): the same files the
# TypeScript code is generated from, google/rpc's status and error details included.
# (A here-string, not < <(...): the test VM's guest has no /dev/fd for process substitution.)
mapfile -t roots <<<"$(sed -n 's/^ *- directory: *//p' "$repo/buf.gen.yaml")"
[ -n "${roots[0]}" ] || { echo "generate.sh: no '- directory:' inputs in buf.gen.yaml" >&2; exit 1; }

# Each root is mapped under the virtual directory imgd_sdk/ (protoc's -IVIRTUAL=DIR): the
# generated modules then live in the package and import each other as imgd_sdk.<path>_pb2, no
# rewriting. The well-known types stay google.protobuf.*, as python3-protobuf ships them.
includes=()
for root in "${roots[@]}"; do includes+=("-Iimgd_sdk=$repo/$root"); done
includes+=("-I$wkt")

# imgd's API, and what a client needs to read errors: google.rpc.Status and its ErrorInfo.
wanted=(imgd/v1/imgd.proto google/rpc/status.proto google/rpc/error_details.proto)
files=()
for f in "${wanted[@]}"; do
  found=
  for root in "${roots[@]}"; do
    if [ -f "$repo/$root/$f" ]; then found=1; break; fi
  done
  [ -n "$found" ] || { echo "generate.sh: $f is in none of buf.gen.yaml's inputs (${roots[*]})" >&2; exit 1; }
  files+=("imgd_sdk/$f")
done

tmp=$(mktemp -d "${out%/}.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
"$protoc" "${includes[@]}" --python_out="$tmp" "${files[@]}"
# Service stubs: only imgd's file has services.
"$protoc" "${includes[@]}" --plugin=protoc-gen-grpc_python="$plugin" --grpc_python_out="$tmp" "${files[0]}"
# The hand-written layer lives in src/ (not beside test_sdk.py, whose directory Python puts
# first on sys.path: an incomplete imgd_sdk there would hide the generated one).
cp "$here/src/imgd_sdk/__init__.py" "$tmp/imgd_sdk/__init__.py"
rm -rf "$out"
mv "$tmp" "$out"
trap - EXIT
