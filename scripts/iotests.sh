#!/usr/bin/env bash
# iotests.sh - run QEMU's own qemu-iotests (qcow2) against oxcow under its
# drop-in names.
#
# Usage: scripts/iotests.sh [TESTS...]      (none: the 132 of scripts/iotests/baseline.txt)
#        scripts/iotests.sh --ci [TESTS...] (the fast subset cargo test runs)
#
# Fetches QEMU 10.0.2's test sources once into target/qemu-iotests
# (scripts/iotests/fetch.sh; IOTESTS_SRC overrides the place), builds the
# release binary unless OXCOW_BIN names one to use, links qemu-img /
# qemu-io / qemu-nbd to it in target/dropin-bin (or $OXCOW_BIN's dir +
# dropin-bin), and runs scripts/iotests/run.sh, whose knobs apply
# (IOTESTS_JOBS, IOTESTS_TIMEOUT, IOTESTS_WORK, IOTESTS_VERBOSE).
# The last line is the runner's: "iotests: P/N qcow2 tests pass".
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
SRC=${IOTESTS_SRC:-$ROOT/target/qemu-iotests}
[ -d "$SRC/tests/qemu-iotests" ] || scripts/iotests/fetch.sh "$SRC"
if [ -n "${OXCOW_BIN:-}" ]; then
    BIN=$(dirname "$OXCOW_BIN")/dropin-bin
else
    cargo build --release -q -p oxcow-cli
    OXCOW_BIN=$ROOT/target/release/oxcow
    BIN=$ROOT/target/dropin-bin
fi
"$OXCOW_BIN" install-links --force "$BIN" >/dev/null
# Fast tests that pass (docs/IOTESTS.md): about 30 s with two jobs.
CI_TESTS="003 004 005 009 010 011 012 021 027 032 035 038 042 043 046 047 048 050 052 053 054 062 069 074 090 103 104 105 107 111 114 150 174 179 187 188 252 263 265 268 270 272 279 284 289 290 292 293 qsd-jobs regression-vhdx-log"
if [ "${1:-}" = --ci ]; then
    shift
    # shellcheck disable=SC2086
    set -- $CI_TESTS "$@"
fi
exec scripts/iotests/run.sh "$SRC" "$BIN/qemu-img" "$BIN/qemu-io" "$BIN/qemu-nbd" "$@"
