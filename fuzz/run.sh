#!/usr/bin/env bash
# Runs every fuzz target (or those in $TARGETS) for SECONDS each (default 600) and copies any
# crashing input into regressions/<target>/ so `cargo test` replays it. The corpora
# (corpus/<target>/) are kept in git, minimized.
# cargo-fuzz needs nightly features; RUSTC_BOOTSTRAP lets stable build them.
set -uo pipefail
cd "$(dirname "$0")"
secs=${1:-600}
export RUSTC_BOOTSTRAP=1
for t in ${TARGETS:-header open_read check ops damaged formats bitmaps}; do
    mkdir -p corpus/$t regressions/$t artifacts/$t
    # Past crashes seed the corpus; so do the issue-21 damaged images for
    # every target that takes an image.
    cp -n regressions/$t/* corpus/$t/ 2>/dev/null || true
    case $t in open_read | check) cp -n regressions/damaged/* corpus/$t/ 2>/dev/null || true ;; esac
    cargo fuzz run -O "$t" corpus/$t -- -max_total_time="$secs" -rss_limit_mb=2048 -timeout=20 \
        -artifact_prefix=artifacts/$t/ 2>&1 | grep -E "^(#[0-9]+ +DONE|==|SUMMARY|Done)" | tail -3
    for f in artifacts/$t/*; do
        [ -f "$f" ] && cp "$f" regressions/$t/ && echo "crash input kept: regressions/$t/$(basename "$f")"
    done
    # The corpora are kept in git: minimize before committing them.
    cargo fuzz cmin -O "$t" corpus/$t >/dev/null 2>&1 || true
    echo "$t: fuzzed ${secs}s"
done
