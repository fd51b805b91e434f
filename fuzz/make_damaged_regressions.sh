#!/usr/bin/env bash
# Writes the damaged images of issue 21 (small: 512-byte clusters) into
# regressions/damaged/, where `cargo test` replays them through every fuzz
# target. Each is QEMU's own image with one field changed; rerun after
# adding a case. Needs qemu-img and qemu-io.
set -euo pipefail
cd "$(dirname "$0")"
out=regressions/damaged
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

be64() { echo $((0x$(od -An -tx1 -j "$2" -N 8 "$1" | tr -d ' \n'))); }
put() { # file offset value bytes
    local hex
    hex=$(printf "%0$(($4 * 2))x" "$3")
    printf '%s' "$hex" | sed 's/../\\x&/g' | xargs -0 printf | dd of="$1" bs=1 seek="$2" conv=notrunc status=none
}
put64() { put "$1" "$2" "$3" 8; }
put32() { put "$1" "$2" "$3" 4; }
put16() { put "$1" "$2" "$3" 2; }

base=$tmp/base.qcow2
qemu-img create -q -f qcow2 -o cluster_size=512 "$base" 1M
qemu-io -f qcow2 -c 'write -P 0x10 0 512' -c 'write -P 0x11 512 512' -c 'write -P 0x12 1k 512' \
    -c 'write -P 0x13 1536 512' "$base" >/dev/null
l1=$(be64 "$base" 40)
rt=$(be64 "$base" 48)
rb=$(be64 "$base" "$rt")
l2=$(($(be64 "$base" "$l1") & 0x00fffffffffffe00))
d0=$(($(be64 "$base" "$l2") & 0x00fffffffffffe00))
end=$(stat -c %s "$base")
copied=0x8000000000000000
refcount_of() { echo $((rb + $1 / 512 * 2)); }

new() { # starts $out/NAME.qcow2 from the base image, as $f
    f=$out/$1.qcow2
    cp "$2" "$f"
}
new l2_entry_past_eof "$base"; put64 "$f" $((l2 + 8)) $((copied | 0x100000))
new l2_entry_at_eof "$base"; put64 "$f" $((l2 + 8)) $((copied | end))
new l1_table_past_eof "$base"; put64 "$f" 40 0x100000
new l2_table_past_eof "$base"; put64 "$f" "$l1" $((copied | 0x100000))
new refcount_block_past_eof "$base"; put64 "$f" "$rt" 0x100000
new data_refcount_zero "$base"; put16 "$f" "$(refcount_of "$d0")" 0
new untouched_data_refcount_zero "$base"; put16 "$f" "$(refcount_of "$(($(be64 "$base" $((l2 + 16))) & 0x00fffffffffffe00))")" 0
new l2_table_refcount_zero "$base"; put16 "$f" "$(refcount_of "$l2")" 0
new l1_table_refcount_zero "$base"; put16 "$f" "$(refcount_of "$l1")" 0
new refcount_block_on_l1_table "$base"; put64 "$f" "$rt" "$l1"
new refcount_block_on_header "$base"; put64 "$f" "$rt" 0
new l2_table_on_refcount_table "$base"; put64 "$f" "$l1" $((copied | rt))
new l1_table_on_refcount_block "$base"; put64 "$f" 40 "$rb"
new data_cluster_on_l1_table "$base"; put64 "$f" "$l2" $((copied | l1))
new two_l1_entries_share_an_l2_table "$base"; put64 "$f" $((l1 + 8)) "$(be64 "$base" "$l1")"

# One snapshot: guest cluster 0 holds 0x20 in it, 0x21 in the active state.
snap=$tmp/snap.qcow2
cp "$base" "$snap"
qemu-io -f qcow2 -c 'write -P 0x20 0 512' "$snap" >/dev/null
qemu-img snapshot -c s1 "$snap"
qemu-io -f qcow2 -c 'write -P 0x21 0 512' "$snap" >/dev/null
table=$(be64 "$snap" 64)
sn_l1=$(be64 "$snap" "$table")
new snapshot_l1_unaligned "$snap"; put64 "$f" "$table" $((sn_l1 + 0x100))
new snapshot_l1_past_eof "$snap"; put64 "$f" "$table" 0x1000000
new snapshot_l1_on_header "$snap"; put64 "$f" "$table" 0
new snapshot_l1_on_active_l1 "$snap"; put64 "$f" "$table" "$(be64 "$snap" 40)"
new snapshot_l1_size_past_eof "$snap"; put32 "$f" $((table + 8)) 0x100000
new snapshot_l2_past_eof "$snap"; put64 "$f" "$sn_l1" 0x100000000
new snapshot_disk_size_above_2pib "$snap"; put64 "$f" $((table + 48)) $(((2 << 50) + 512))
new snapshot_disk_size_absurd "$snap"; put64 "$f" $((table + 48)) 0x1a00000000800000
new snapshot_disk_size_odd "$snap"; put64 "$f" $((table + 48)) $(((1 << 20) + 256))
ls -l "$out" | tail -n +2 | wc -l
