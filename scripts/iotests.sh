#!/usr/bin/env bash
# iotests.sh - run QEMU's own qemu-iotests (qcow2) against oxcow under its
# drop-in names. Not part of `cargo test`: the whole list takes minutes.
#
# Usage: scripts/iotests.sh [TESTS...]      (none: the 132 listed tests)
#        scripts/iotests.sh --ci             (the 30 fastest that pass: ~1 min)
#
# Builds the release binary, links qemu-img / qemu-io / qemu-nbd to it in
# target/dropin-bin, fetches QEMU 10.0.2's test sources once into
# target/qemu-iotests (from Debian's source package, by the fetch script in
# $IOTESTS_DIR), and runs them with the runner from the same place.
# Environment: IOTESTS_DIR (default ../shared/iotests or ../../shared/iotests, holding
# fetch-qemu-iotests.sh, run-iotests.sh and iotests-baseline.txt), and the
# runner's own knobs (IOTESTS_JOBS, IOTESTS_TIMEOUT, IOTESTS_WORK, ...).
# The last line is the runner's: "iotests: P/N qcow2 tests pass".
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
# Beside the checkout (../shared), or beside a worktree's parent (../../shared).
if [ -z "${IOTESTS_DIR:-}" ]; then
    for d in "$ROOT/../shared/iotests" "$ROOT/../../shared/iotests"; do
        [ -x "$d/run-iotests.sh" ] && { IOTESTS_DIR=$(cd "$d" && pwd); break; }
    done
fi
IOTESTS_DIR=${IOTESTS_DIR:-$ROOT/../shared/iotests}
[ -x "$IOTESTS_DIR/run-iotests.sh" ] || { echo "iotests.sh: no runner in $IOTESTS_DIR (set IOTESTS_DIR)" >&2; exit 2; }
SRC="$ROOT/target/qemu-iotests"
[ -d "$SRC/tests/qemu-iotests" ] || "$IOTESTS_DIR/fetch-qemu-iotests.sh" "$SRC"
cargo build --release -q -p oxcow-cli
BIN="$ROOT/target/dropin-bin"
"$ROOT/target/release/oxcow" install-links --force "$BIN" >/dev/null
# The 30 fastest of those that pass (docs/IOTESTS.md), for CI.
CI_TESTS="003 004 005 009 010 012 021 027 032 035 038 042 043 047 053 062 069 090 104 105 107 174 187 252 265 268 279 290 qsd-jobs regression-vhdx-log"
if [ "${1:-}" = --ci ]; then
    shift
    # shellcheck disable=SC2086
    set -- $CI_TESTS "$@"
fi
exec "$IOTESTS_DIR/run-iotests.sh" "$SRC" "$BIN/qemu-img" "$BIN/qemu-io" "$BIN/qemu-nbd" "$@"
