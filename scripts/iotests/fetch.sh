#!/usr/bin/env bash
# fetch.sh DEST - puts QEMU 10.0.2's qemu-iotests sources (tests/qemu-iotests,
# python/, VERSION) under DEST, once. They are GPL and never committed:
# scripts/iotests.sh and CI keep them in target/qemu-iotests.
#
# Source: the orig tarball of Debian's qemu 10.0.2 source package (the same
# version as the qemu-utils the differential tests use; the "+ds" repack only
# leaves out firmware blobs), from the Debian mirror this machine's apt is
# already configured with, checked against its SHA-256. apt runs with its
# own state directory beside DEST: the system's apt state is not touched.
set -euo pipefail
DEST=${1:?usage: fetch.sh DEST}
# apt takes relative paths as relative to /etc/apt: make them absolute.
DEST=$(realpath -m "$DEST")
if [ -d "$DEST/tests/qemu-iotests" ]; then exit 0; fi
TARBALL_SHA256=0901da33844a331bf8b3602b9c1fbd178e60b737c8e3ade678255bd090c9b9f1
VERSION='1:10.0.2+ds-2+deb13u1~bpo12+1'
STATE=$(dirname "$DEST")/qemu-iotests-apt
mkdir -p "$STATE/lists/partial" "$STATE/cache/archives/partial" "$STATE/src"

mirror() {
    local m
    m=$(grep -hoE '^URIs: *[^ ]+/debian$' /etc/apt/sources.list.d/*.sources 2>/dev/null | head -n1 | awk '{print $2}')
    if [ -z "$m" ]; then
        m=$(grep -hoE '^deb +(\[[^]]*\] +)?[^ ]+/debian ' /etc/apt/sources.list 2>/dev/null | head -n1 | awk '{print $NF}')
    fi
    printf '%s' "$m"
}
URI=$(mirror)
[ -n "$URI" ] || { echo "fetch.sh: no Debian mirror in the apt sources" >&2; exit 1; }
echo "deb-src [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $URI bookworm-backports main" >"$STATE/sources.list"
APT=(-o Dir::Etc::sourcelist="$STATE/sources.list" -o Dir::Etc::sourceparts=-
     -o Dir::State::Lists="$STATE/lists" -o Dir::Cache="$STATE/cache")
apt-get "${APT[@]}" update -qq
# Only the orig tarball matters; the .dsc or the Debian diff may have left
# the mirror already, which makes apt-get fail after the tarball is in.
(cd "$STATE/src" && apt-get "${APT[@]}" source --download-only "qemu=$VERSION" >/dev/null 2>&1) || true
TARBALL=$STATE/src/qemu_10.0.2+ds.orig.tar.xz
echo "$TARBALL_SHA256  $TARBALL" | sha256sum -c --quiet
mkdir -p "$DEST.partial"
tar xJf "$TARBALL" -C "$DEST.partial" --strip-components=1 \
    qemu-10.0.2/tests/qemu-iotests qemu-10.0.2/python qemu-10.0.2/VERSION
# A half-extracted tree must not pass for a complete one on the next run.
rm -rf "$DEST" && mv "$DEST.partial" "$DEST"
rm -rf "$STATE"
echo "QEMU iotests sources in $DEST"
