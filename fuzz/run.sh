#!/usr/bin/env bash
# Runs every fuzz target (or those in $TARGETS) for SECONDS each (default 600) and copies any
# crashing input into regressions/<target>/ so `cargo test` replays it.
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP lets stable build them.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
export RUSTC_BOOTSTRAP=1
for t in ${TARGETS:-header open_read check ops}; do
    mkdir -p corpus/$t regressions/$t artifacts/$t
    cargo fuzz run -O "$t" corpus/$t -- -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 \
        -artifact_prefix=artifacts/$t/ 2>&1 | grep -E "^(#[0-9]+ +DONE|==|SUMMARY|Done)" | tail -3
    for f in artifacts/$t/*; do
        [ -f "$f" ] && cp "$f" regressions/$t/ && echo "crash input kept: regressions/$t/$(basename "$f")"
    done
    echo "$t: fuzzed ${secs}s"
done
