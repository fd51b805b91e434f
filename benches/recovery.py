#!/usr/bin/env python3
"""Crash recovery time with lazy refcounts: oxcow with its recovery journal,
oxcow's full scan, `qemu-img check -r all` and QEMU's open-time repair
(qemu-io opening the dirty image), side by side in one run.

The image: 1 TiB, 64 KiB clusters, lazy_refcounts=on, journal=on, one
4 KiB write into each of its 2048 L2 ranges (every L2 table in use; a
sparse file of a few hundred MiB), closed cleanly. Then, for N in 1, 100,
10000: N random allocating 4 KiB writes, a flush, and the process dies
(`abort`, as qemu-io's command: no clean close, the on-disk state a
SIGKILL leaves). Each measured run starts from a fresh sparse copy of that
dirty image and times the whole command (process start, open, repair,
close); alternating order, medians of ROUNDS rounds after a warm-up.
"oxcow, full scan" is the same dirty image with the journal's autoclear
bit cleared, which makes oxcow distrust the journal (as `--image-opts
...,x-ignore-journal=on` does); "oxcow check -r all, full scan" checks and
repairs that image as `qemu-img check -r all` does. The copy is synced
before the clock starts: otherwise the first fsync of whichever tool runs
pays for writing back the copy's hundreds of MiB.

    benches/recovery.py [--rounds N] [--dir DIR] [--counts 1,100,10000]

Needs qemu-img, qemu-io and a release build (cargo build --release).
"""
import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OX = os.path.join(ROOT, "target", "release", "oxcow")
SIZE = 1 << 40
L2_RANGE = 512 << 20  # guest bytes one L2 table maps with 64 KiB clusters
AUTOCLEAR_AT = 88
AUTOCLEAR_JOURNAL = 1 << 40


def sh(*args, check=True):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if check and r.returncode != 0:
        sys.exit(f"failed: {' '.join(args[:6])} ...\n{r.stdout[-2000:]}{r.stderr[-2000:]}")
    return r


def io_batches(img, cmds, extra=(), tail=()):
    """Runs oxcow io with the commands in batches small enough for argv;
    `tail` goes with the last batch."""
    step = 4000
    for k in range(0, max(len(cmds), 1), step):
        last = k + step >= len(cmds)
        args = [OX, "io", *extra]
        for c in cmds[k:k + step] + (list(tail) if last else []):
            args += ["-c", c]
        sh(*args, img, check=not (last and tail))


def base_image(d):
    img = os.path.join(d, "base.qcow2")
    sh(OX, "create", "-q", "-f", "qcow2", "-o", "cluster_size=64k,lazy_refcounts=on,journal=on", img, str(SIZE))
    cmds = [f"write -q -P 0x{(i % 250) + 1:x} {i * L2_RANGE} 4k" for i in range(SIZE // L2_RANGE)]
    io_batches(img, cmds, extra=("-t", "writeback"))
    return img


def dirty_image(d, base, n, rng):
    img = os.path.join(d, f"dirty-{n}.qcow2")
    sh("cp", "--sparse=always", base, img)
    clusters = SIZE >> 16
    picks = set()
    while len(picks) < n:
        c = rng.randrange(clusters)
        if (c << 16) % L2_RANGE != 0:
            picks.add(c)
    cmds = [f"write -q -P 0x5a {c << 16} 4k" for c in sorted(picks, key=lambda _: rng.random())]
    # One process: writes, flush, death (writeback: the flush is the only sync).
    args = [OX, "io", "-t", "writeback"]
    for c in cmds + ["flush", "abort"]:
        args += ["-c", c]
    r = subprocess.run(args + [img], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if r.returncode == 0:
        sys.exit("oxcow io did not die")
    with open(img, "rb") as f:
        h = f.read(104)
    if int.from_bytes(h[72:80], "big") & 1 == 0:
        sys.exit("image not dirty after the crash")
    return img


def clear_journal_bit(path):
    with open(path, "r+b") as f:
        f.seek(AUTOCLEAR_AT)
        v = int.from_bytes(f.read(8), "big") & ~AUTOCLEAR_JOURNAL
        f.seek(AUTOCLEAR_AT)
        f.write(v.to_bytes(8, "big"))


def recover(tool, path):
    if tool == "oxcow, journal":
        args = [OX, "io", "-c", "quit", path]
    elif tool == "oxcow, full scan":
        clear_journal_bit(path)
        args = [OX, "io", "-c", "quit", path]
    elif tool == "oxcow check -r all, full scan":
        clear_journal_bit(path)
        args = [OX, "check", "-q", "-r", "all", path]
    elif tool == "qemu-img check -r all":
        args = ["qemu-img", "check", "-q", "-r", "all", path]
    else:
        args = ["qemu-io", "-c", "quit", path]
    t = time.monotonic()
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    dt = time.monotonic() - t
    if r.returncode not in (0, 3):  # check: 3 = leaks left (none after -r all)
        sys.exit(f"{tool} failed on {path}: {r.stdout}{r.stderr}")
    return dt


TOOLS = ["oxcow, journal", "oxcow, full scan", "oxcow check -r all, full scan", "qemu-img check -r all",
         "qemu-io open (QEMU's repair)"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--counts", default="1,100,10000")
    a = ap.parse_args()
    if not os.path.exists(OX):
        sh("cargo", "build", "--release", "--quiet")
    d = a.dir or tempfile.mkdtemp(prefix="oxcow-recovery-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    rng = random.Random(19)
    rows = []
    try:
        base = base_image(d)
        for n in [int(x) for x in a.counts.split(",")]:
            dirty = dirty_image(d, base, n, rng)
            work = os.path.join(d, "work.qcow2")
            times = {t: [] for t in TOOLS}
            for r in range(a.rounds + 1):
                order = TOOLS if r % 2 == 0 else TOOLS[::-1]
                for tool in order:
                    sh("cp", "--sparse=always", dirty, work)
                    sh("sync")
                    t = recover(tool, work)
                    if tool == "oxcow, journal" and r == 0:
                        # What the journal's repair leaves: no corruption.
                        c = sh("qemu-img", "check", work, check=False)
                        line = [x for x in c.stdout.splitlines() if "leaked" in x or "No errors" in x]
                        print(f"  N={n}: qemu-img check after the journal's repair: exit {c.returncode} {line}",
                              flush=True)
                        if c.returncode not in (0, 3):
                            sys.exit(c.stdout + c.stderr)
                    if r > 0:
                        times[tool].append(t)
            med = {t: statistics.median(v) for t, v in times.items()}
            rows.append((n, med))
            print(f"N={n:6d} " + "  ".join(f"{t}: {med[t]:.3f}s" for t in TOOLS), flush=True)
            os.unlink(dirty)
    finally:
        if not a.dir:
            shutil.rmtree(d, ignore_errors=True)
    print()
    print("| clusters written since the last clean point | " + " | ".join(TOOLS)
          + " | journal / qemu-img check | journal / QEMU open | check full scan / qemu-img check"
          + " | open full scan / QEMU open |")
    print("|---:|" + "---:|" * (len(TOOLS) + 4))
    for n, med in rows:
        j, qc, qo = med[TOOLS[0]], med["qemu-img check -r all"], med["qemu-io open (QEMU's repair)"]
        print(f"| {n} | " + " | ".join(f"{med[t]:.3f} s" for t in TOOLS)
              + f" | {j / qc:.2f} | {j / qo:.2f} | {med[TOOLS[2]] / qc:.2f} | {med[TOOLS[1]] / qo:.2f} |")


if __name__ == "__main__":
    main()
