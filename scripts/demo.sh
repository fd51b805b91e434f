#!/usr/bin/env bash
# Builds oxcow and runs its main job on a small example: create a qcow2
# image, write to it, inspect it, check it and convert it to raw.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --quiet
ox=target/release/oxcow
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
"$ox" create -f qcow2 -o cluster_size=64k "$dir/demo.qcow2" 64M
"$ox" io -c 'write -P 0xab 0 1M' -c 'write -z 4M 1M' -c 'read -P 0xab 0 1M' "$dir/demo.qcow2"
"$ox" info "$dir/demo.qcow2"
"$ox" map --output=json "$dir/demo.qcow2"
"$ox" check "$dir/demo.qcow2"
"$ox" convert -O raw "$dir/demo.qcow2" "$dir/demo.raw"
"$ox" compare "$dir/demo.qcow2" "$dir/demo.raw"
