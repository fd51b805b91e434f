#!/usr/bin/env bash
# run.sh SRC IMG IO NBD [TESTS...] - runs qemu-iotests (qcow2) from the QEMU
# source tree SRC with IMG, IO and NBD as qemu-img, qemu-io and qemu-nbd.
# No tests named: those of baseline.txt beside this script.
#
# No qemu-system is needed: QEMU_PROG is a stand-in that answers the help
# queries the test harness makes at start-up and otherwise marks the test
# "not run", so tests that boot a VM are counted as noemu, not as failures.
#
# Environment: IOTESTS_JOBS (parallel tests, default nproc), IOTESTS_TIMEOUT
# (seconds per test, default 300), IOTESTS_WORK (work dir, default a fresh
# /tmp/iotests-run-XXXXXX), IOTESTS_VERBOSE=1 (a line per finished test),
# QSD_PROG (default /usr/bin/qemu-storage-daemon).
#
# The work dir keeps logs/NAME.log (the harness output with its diff) and
# results.txt ("NAME CLASS SECONDS REASON", CLASS one of pass fail timeout
# skip noemu). The last line printed is "iotests: P/N qcow2 tests pass";
# the exit status is 0 only when all N pass.
set -u
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
fail_setup() { echo "run.sh: $*" >&2; echo "iotests: 0/0 qcow2 tests pass"; exit 2; }
[ $# -ge 4 ] || fail_setup "usage: run.sh SRC IMG IO NBD [TESTS...]"
absolute() { (cd "$(dirname "$1")" 2>/dev/null && printf '%s/%s' "$PWD" "$(basename "$1")"); }
SRC=$(cd "$1" 2>/dev/null && pwd)/tests/qemu-iotests || fail_setup "no such tree: $1"
[ -x "$SRC/check" ] || fail_setup "no $SRC/check"
IMG=$(absolute "$2"); IO=$(absolute "$3"); NBD=$(absolute "$4")
shift 4
for p in "$IMG" "$IO" "$NBD"; do [ -f "$p" ] && [ -x "$p" ] || fail_setup "not a program: $p"; done

WORK=${IOTESTS_WORK:-$(mktemp -d /tmp/iotests-run-XXXXXX)}
mkdir -p "$WORK" && WORK=$(cd "$WORK" && pwd) || fail_setup "no work dir"
# Some tests (197, 215) refuse a TEST_DIR with other characters.
case $WORK in *[^-_a-zA-Z0-9/]*) fail_setup "work dir must match [-_a-zA-Z0-9/]*: $WORK" ;; esac
mkdir -p "$WORK/bin" "$WORK/logs" "$WORK/scratch" "$WORK/sock" "$WORK/cwd"
: >"$WORK/results.txt"

# The stand-in emulator. The driver list is what Debian's qemu-utils 10.0.2
# has built in: tests asking for one of them (_require_drivers) run.
cat >"$WORK/bin/qemu-system-x86_64" <<'STANDIN'
#!/bin/sh
case "$*" in
"-machine help" | "-M help")
    printf '%s\n' "Supported machines are:" \
        "pc                   Standard PC (i440FX + PIIX, 1996) (alias of pc-i440fx-10.0)" \
        "pc-i440fx-10.0       Standard PC (i440FX + PIIX, 1996) (default)"
    exit 0 ;;
*"-drive format=help"*)
    d="blkdebug blklogwrites blkverify bochs cloop compress copy-before-write copy-on-read dmg file host_cdrom host_device luks nbd null-aio null-co nvme parallels preallocate qcow qcow2 qed quorum raw replication snapshot-access throttle vdi vhdx vmdk vpc vvfat"
    echo "Supported formats: $d"
    echo "Supported formats (read-only): $d"
    exit 0 ;;
*"-device help"*)
    echo "Storage devices:"
    for d in floppy ide-cd ide-hd lsi53c895a scsi-cd scsi-hd usb-storage virtio-blk-pci virtio-scsi-pci; do
        echo "name \"$d\", desc \"stand-in\""
    done
    exit 0 ;;
esac
if [ -n "${TEST_DIR:-}" ] && [ -d "$TEST_DIR" ]; then
    t=${TEST_DIR##*/}
    echo "needs qemu-system (stand-in QEMU_PROG)" >"$TEST_DIR/${t#"$IMGFMT-$IMGPROTO-"}.notrun"
fi
echo "qemu-system: not available (stand-in)" >&2
exit 1
STANDIN
chmod +x "$WORK/bin/qemu-system-x86_64"
QSD=${QSD_PROG:-/usr/bin/qemu-storage-daemon}
[ -x "$QSD" ] || { QSD=$WORK/bin/qemu-storage-daemon; cp "$WORK/bin/qemu-system-x86_64" "$QSD"; }

export QEMU_PROG="$WORK/bin/qemu-system-x86_64" QEMU_IMG_PROG="$IMG" QEMU_IO_PROG="$IO" \
    QEMU_NBD_PROG="$NBD" QSD_PROG="$QSD" TEST_DIR="$WORK/scratch"
unset QEMU_IMG_OPTIONS QEMU_IO_OPTIONS QEMU_NBD_OPTIONS IMGOPTS SOCK_DIR

if [ $# -eq 0 ]; then
    mapfile -t TESTS < <(awk '!/^#/ && NF {print $1}' "$HERE/baseline.txt")
else
    TESTS=("$@")
fi
[ ${#TESTS[@]} -gt 0 ] || fail_setup "no tests"

# A FUSE export left behind by a test that stopped half-way blocks rm -rf.
unmount_below() {
    awk -v d="$1" 'index($2, d) == 1 {print $2}' /proc/mounts 2>/dev/null | while read -r m; do
        fusermount3 -u "$m" 2>/dev/null || fusermount -u "$m" 2>/dev/null || umount -l "$m" 2>/dev/null
    done
}

one() {
    local t=$1 name=${1##*/} log class reason start rc notrun scratch
    log=$WORK/logs/$name.log
    scratch=$WORK/scratch/qcow2-file-$name
    mkdir -p "$WORK/cwd/$name" "$WORK/sock/$name"
    start=$(date +%s)
    (cd "$WORK/cwd/$name" && SOCK_DIR=$WORK/sock/$name exec timeout -k 15 "$TIMEOUT" \
        python3 "$SRC/check" -qcow2 -tap --source-dir "$SRC" \
        --build-dir "$WORK/build/tests/qemu-iotests" "$t") >"$log" 2>&1 </dev/null
    rc=$?
    unmount_below "$scratch/"
    reason=
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        class=timeout reason="after ${TIMEOUT}s"
    elif grep -q "^ok qcow2 $name # SKIP" "$log"; then
        class=skip
    elif grep -q "^ok qcow2 $name\$" "$log"; then
        class=pass
    else
        class=fail
        grep -q "^not ok qcow2 $name\$" "$log" || reason="no result line (status $rc)"
    fi
    notrun=$scratch/$name.notrun
    if [ $class != pass ] && [ -f "$notrun" ]; then
        reason=$(head -n1 "$notrun")
        case $reason in *"stand-in QEMU_PROG"*) class=noemu ;; *) [ $class = fail ] || class=skip ;; esac
    fi
    case $class in fail | timeout) ;; *) rm -rf "$scratch" ;; esac
    echo "$name $class $(($(date +%s) - start))s $reason" >>"$WORK/results.txt"
    [ -z "$IOTESTS_VERBOSE" ] || echo "$name $class $reason"
}
export -f one unmount_below
export WORK SRC TIMEOUT=${IOTESTS_TIMEOUT:-300} IOTESTS_VERBOSE=${IOTESTS_VERBOSE:-}
JOBS=${IOTESTS_JOBS:-$(nproc)}
T0=$(date +%s)
printf '%s\n' "${TESTS[@]}" | xargs -P "$JOBS" -I{} bash -c 'one "$1"' _ {}
# Servers a test forked off (qemu-nbd --fork, the daemon) outlive it; only
# those of this run carry its unique work dir in their arguments.
for pid in $(pgrep -f -- "$WORK/"); do [ "$pid" = $$ ] || kill "$pid" 2>/dev/null; done
unmount_below "$WORK/"

sort -o "$WORK/results.txt" "$WORK/results.txt"
count() { awk -v c="$1" '$2 == c' "$WORK/results.txt" | wc -l; }
echo "work dir: $WORK"
for c in fail timeout; do
    l=$(awk -v c="$c" '$2 == c {printf "%s ", $1}' "$WORK/results.txt")
    [ -z "$l" ] || echo "$c: $l"
done
P=$(count pass)
echo "pass=$P fail=$(count fail) timeout=$(count timeout) skip=$(count skip) noemu=$(count noemu) of ${#TESTS[@]} in $(($(date +%s) - T0))s with $JOBS jobs"
echo "iotests: $P/${#TESTS[@]} qcow2 tests pass"
[ "$P" -eq "${#TESTS[@]}" ]
