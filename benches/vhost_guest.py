#!/usr/bin/env python3
"""In-guest disk I/O on a vhost-user-blk export: oxcow storage-daemon
against qemu-storage-daemon, on the same kind of image, in the same run.

A Linux guest (scripts/vm/guest.sh, TCG unless GUEST_ACCEL=kvm) boots on
a fresh qcow2 image exported by one daemon or the other and runs O_DIRECT
workloads with busybox dd: sequential writes and reads in 1 MiB blocks,
then random 4 KiB writes and reads (one dd per request, at offsets from
the shell's $RANDOM, the same sequence for both daemons). Each workload
is timed on the host between the guest's start and end lines. Rounds
alternate which daemon goes first; the table gives the medians and the
ratio oxcow / QEMU (below 1.0: oxcow faster).

Under TCG the guest's CPU is emulated: every request costs guest
instructions that dwarf the back end's work, so the ratio says more than
the absolute numbers.

    benches/vhost_guest.py [--rounds N] [--seq-mib N] [--random N] [--dir DIR]

Needs qemu-system-x86_64, qemu-storage-daemon, the guest set up
(bash scripts/vm/guest.sh setup) and a release build (cargo build --release).
"""
import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OX = os.environ.get("OXCOW_BIN", os.path.join(ROOT, "target", "release", "oxcow"))
GUEST = os.path.join(ROOT, "scripts", "vm", "guest.sh")
WORKLOADS = ["seq-write", "seq-read", "rand-write", "rand-read"]


def sh(*args, **kw):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{r.stdout}{r.stderr}")
    return r


def guest_script(seq_mib, random_n, span_blocks):
    # RANDOM is seeded so both daemons see the same offsets.
    return f"""
RANDOM=42
echo BENCH-START seq-write
dd if=/dev/zero of=/dev/vda bs=1M count={seq_mib} oflag=direct 2>/dev/null
echo BENCH-END seq-write
echo BENCH-START seq-read
dd if=/dev/vda of=/dev/null bs=1M count={seq_mib} iflag=direct 2>/dev/null
echo BENCH-END seq-read
echo BENCH-START rand-write
i=0; while [ $i -lt {random_n} ]; do dd if=/dev/zero of=/dev/vda bs=4k count=1 seek=$((RANDOM % {span_blocks})) oflag=direct 2>/dev/null; i=$((i+1)); done
echo BENCH-END rand-write
echo BENCH-START rand-read
i=0; while [ $i -lt {random_n} ]; do dd if=/dev/vda of=/dev/null bs=4k count=1 skip=$((RANDOM % {span_blocks})) iflag=direct 2>/dev/null; i=$((i+1)); done
echo BENCH-END rand-read
echo BENCH-DONE
poweroff -f
"""


def start_daemon(tool, d, image, sock):
    if os.path.exists(sock):
        os.unlink(sock)
    exe = [OX, "storage-daemon"] if tool == "oxcow" else ["qemu-storage-daemon"]
    args = exe + [
        "--blockdev", f"driver=file,node-name=f,filename={image}",
        "--blockdev", "driver=qcow2,node-name=q,file=f",
        "--export", f"type=vhost-user-blk,id=e,node-name=q,addr.type=unix,addr.path={sock},writable=on",
    ]
    p = subprocess.Popen(args, cwd=d, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    # Both daemons bind the socket before they serve; that is readiness.
    while not os.path.exists(sock):
        if p.poll() is not None:
            sys.exit(f"{tool} daemon failed: {p.stderr.read()}")
        time.sleep(0.01)
    return p


def one_boot(tool, d, initrd, image_size):
    image = os.path.join(d, f"{tool}.qcow2")
    if os.path.exists(image):
        os.unlink(image)
    sh("qemu-img", "create", "-q", "-f", "qcow2", image, str(image_size))
    sock = os.path.join(d, f"{tool}.sock")
    daemon = start_daemon(tool, d, image, sock)
    vm = subprocess.Popen(
        ["bash", GUEST, "boot", initrd, "-chardev", f"socket,id=c0,path={sock}",
         "-device", "vhost-user-blk-pci,chardev=c0"],
        cwd=d, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    starts, times, console = {}, {}, []
    for line in vm.stdout:
        now = time.monotonic()
        console.append(line)
        # The console's escape sequences may precede a marker on its line.
        m = re.search(r"BENCH-(START|END) (\S+)", line)
        if m and m.group(1) == "START":
            starts[m.group(2)] = now
        elif m and m.group(2) in starts:
            times[m.group(2)] = now - starts[m.group(2)]
    vm.wait()
    daemon.terminate()
    daemon.wait()
    os.unlink(image)
    if set(times) != set(WORKLOADS):
        sys.exit(f"{tool}: the guest did not finish its workloads:\n{''.join(console)}")
    return times


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seq-mib", type=int, default=64)
    ap.add_argument("--random", type=int, default=300, help="random requests per direction")
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    if not os.path.exists(OX):
        sys.exit("build first: cargo build --release")
    d = tempfile.mkdtemp(prefix="oxcow-vhost-bench-", dir=a.dir)
    try:
        script = os.path.join(d, "init.sh")
        with open(script, "w") as f:
            # Random requests land in the part the sequential write filled.
            f.write(guest_script(a.seq_mib, a.random, a.seq_mib * 256))
        initrd = os.path.join(d, "initrd.gz")
        sh("bash", GUEST, "initrd", script, initrd)
        image_size = max(a.seq_mib * 2, 64) << 20
        results = {"oxcow": {w: [] for w in WORKLOADS}, "qemu": {w: [] for w in WORKLOADS}}
        one_boot("oxcow", d, initrd, image_size)  # warm-up (page cache, binaries)
        one_boot("qemu", d, initrd, image_size)
        for r in range(a.rounds):
            order = ["oxcow", "qemu"] if r % 2 == 0 else ["qemu", "oxcow"]
            for tool in order:
                for w, t in one_boot(tool, d, initrd, image_size).items():
                    results[tool][w].append(t)
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
        accel = os.environ.get("GUEST_ACCEL", "tcg")
        print(f"guest under {accel}, {a.rounds} rounds, medians; seq {a.seq_mib} MiB in 1 MiB requests, "
              f"random {a.random} x 4 KiB, all O_DIRECT")
        print(f"{'workload':<12} {'oxcow s':>9} {'qemu s':>9} {'ratio':>7}")
        for w in WORKLOADS:
            o = statistics.median(results["oxcow"][w])
            q = statistics.median(results["qemu"][w])
            print(f"{w:<12} {o:9.2f} {q:9.2f} {o / q:7.2f}")
    finally:
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
