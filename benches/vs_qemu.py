#!/usr/bin/env python3
"""oxcow against QEMU, side by side, on the same machine in the same run.

Each workload is run alternately by oxcow and by QEMU's own tool, with a
warm-up round first and then ROUNDS measured rounds; the table gives the
median time of each and the ratio oxcow / QEMU (below 1.0: oxcow faster).

    benches/vs_qemu.py [--rounds N] [--size-gib N] [--dir DIR] [--only NAME[|NAME...]]

Needs qemu-img, qemu-nbd and a release build (cargo build --release).
"""
import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# OXCOW_BIN: another build of oxcow (say so next to the numbers).
OX = os.environ.get("OXCOW_BIN") or os.path.join(ROOT, "target", "release", "oxcow")


def sh(*args, check=True, **kw):
    r = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)
    if check and r.returncode != 0:
        sys.exit(f"failed: {' '.join(args)}\n{r.stdout}{r.stderr}")
    return r


def wait_for_socket(sock, tries):
    """Waits until a server has created its Unix socket (10 ms a try)."""
    for _ in range(tries):
        if os.path.exists(sock):
            return
        time.sleep(0.01)


def bench_time(out):
    m = re.search(r"Run completed in ([0-9.]+) seconds", out)
    if not m:
        sys.exit(f"no timing in output:\n{out}")
    return float(m.group(1))


def timed(fn):
    t = time.monotonic()
    fn()
    return time.monotonic() - t


class Ctx:
    def __init__(self, d, size):
        self.d = d
        self.size = size  # bytes

    def p(self, name):
        return os.path.join(self.d, name)

    def fresh_qcow2(self, name, opts=""):
        path = self.p(name)
        if os.path.exists(path):
            os.unlink(path)
        args = ["qemu-img", "create", "-q", "-f", "qcow2"]
        if opts:
            args += ["-o", opts]
        sh(*args, path, str(self.size))
        return path


def tool_bench(tool, path, args, fmt="qcow2"):
    exe = OX if tool == "oxcow" else "qemu-img"
    return bench_time(sh(exe, "bench", "-f", fmt, *args, path).stdout)


# Each workload: (name, prepare(ctx, tool) -> state, run(ctx, tool, state) -> seconds)
def w_alloc(opts, args):
    def prep(c, tool):
        return c.fresh_qcow2(f"alloc-{tool}.qcow2", opts)

    def run(c, tool, path):
        return tool_bench(tool, path, args)

    return prep, run


def w_alloc_raw(args):
    """The same writes into a fresh raw file of the disk's size with no
    blocks yet (qemu-img create -f raw: sparse), so the filesystem
    allocates as it does under a growing qcow2: the physical limit the
    qcow2 allocating rows are measured against."""
    def prep(c, tool):
        path = c.p(f"alloc-{tool}.raw")
        if os.path.exists(path):
            os.unlink(path)
        sh("qemu-img", "create", "-q", "-f", "raw", path, str(c.size))
        return path

    def run(c, tool, path):
        return tool_bench(tool, path, args, "raw")

    return prep, run


def w_on_allocated(args, fmt="qcow2"):
    def prep(c, tool):
        path = c.p(f"full-{tool}.{fmt}")
        if not os.path.exists(path):
            if fmt == "raw":
                sh("qemu-img", "create", "-q", "-f", "raw", path, str(c.size))
            else:
                sh("qemu-img", "create", "-q", "-f", "qcow2", path, str(c.size))
            sh("qemu-img", "bench", "-q", "-f", fmt, "-w", "-t", "none", "-s", "1M", "-d", "4",
               "-c", str(c.size >> 20), "--pattern", "0x5a", path)
        return path

    def run(c, tool, path):
        return tool_bench(tool, path, args, fmt)

    return prep, run


SECRET = "secret,id=s0,data=bench password"


def w_encrypted(fmt, write):
    """4k requests at depth 32 on a fully written LUKS image (qcow2 with
    encrypt.format=luks, or raw -f luks), aes-256-xts-plain64, served by
    oxcow serve or qemu-nbd given the secret through --image-opts, with
    qemu-img bench as the client (it takes no --object itself)."""
    def prep(c, tool):
        path = c.p(f"enc-{tool}.{fmt}")
        key = "encrypt.key-secret=s0" if fmt == "qcow2" else "key-secret=s0"
        opts = f"driver={fmt},file.filename={path},{key}"
        if not os.path.exists(path):
            src = c.p("enc-src.raw")
            if not os.path.exists(src):
                sh("qemu-img", "create", "-q", "-f", "raw", src, str(c.size))
                sh("qemu-img", "bench", "-q", "-w", "-s", "1M", "-d", "4", "-c", str(c.size >> 20),
                   "--pattern", "0x5a", "-f", "raw", src)
            o = "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10" if fmt == "qcow2" \
                else "key-secret=s0,iter-time=10"
            sh("qemu-img", "create", "-q", "-f", fmt, "--object", SECRET, "-o", o, path, str(c.size))
            sh("qemu-img", "convert", "-n", "--object", SECRET, "-f", "raw", src, "--target-image-opts", opts)
        sock = c.p(f"enc-{tool}.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        exe = [OX, "serve"] if tool == "oxcow" else ["qemu-nbd"]
        proc = subprocess.Popen([*exe, "-t", "-k", sock, "--object", SECRET, "--image-opts", opts])
        wait_for_socket(sock, 1000)
        return (proc, sock)

    def run(c, tool, st):
        proc, sock = st
        try:
            args = ["-f", "raw", "-d", "32", "-c", "20000"] + (["-w", "--pattern", "0x66"] if write else [])
            return bench_time(sh("qemu-img", "bench", *args, f"nbd+unix:///?socket={sock}").stdout)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    return prep, run


def fresh_target(c, tool, fmt):
    """The target path of `tool`'s convert, with both tools' earlier
    targets deleted: on a file system mounted with `discard` a target
    left from the run before is discarded while the next run copies,
    which made whichever tool ran second in a round up to 2x slower."""
    for t in ("oxcow", "qemu"):
        p = c.p(f"convdst-{t}.{fmt}")
        if os.path.exists(p):
            os.unlink(p)
    return c.p(f"convdst-{tool}.{fmt}")


def w_convert(src_fmt, dst_fmt, extra):
    def prep(c, tool):
        src = c.p(f"convsrc.{src_fmt}")
        if not os.path.exists(src):
            # Three quarters written, the rest holes: like a used disk.
            sh("qemu-img", "create", "-q", "-f", src_fmt, src, str(c.size))
            n = (c.size * 3 // 4) >> 20
            sh("qemu-img", "bench", "-q", "-f", src_fmt, "-w", "-s", "1M", "-d", "4", "-S", "1M",
               "-c", str(n), "--pattern", "0x33", src)
            # Some compressible but non-zero structure for -c.
        return (src, fresh_target(c, tool, dst_fmt))

    def run(c, tool, st):
        src, dst = st
        exe = OX if tool == "oxcow" else "qemu-img"
        return timed(lambda: sh(exe, "convert", "-f", src_fmt, "-O", dst_fmt, *extra, src, dst))

    return prep, run


def make_tls_creds(d):
    """A CA, a server certificate for localhost and a client certificate,
    in QEMU's layout under d (openssl; once per run)."""
    if os.path.exists(os.path.join(d, "client-key.pem")):
        return d
    os.makedirs(d, exist_ok=True)
    j = lambda n: os.path.join(d, n)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    sh("openssl", "req", "-x509", *ec, "-keyout", j("ca-key.pem"), "-out", j("ca-cert.pem"), "-days", "30",
       "-subj", "/C=GB/O=Bench/CN=Bench CA", "-addext", "keyUsage=critical,keyCertSign,cRLSign,digitalSignature")
    for role, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth"),
                      ("client", "extendedKeyUsage=clientAuth")):
        sh("openssl", "req", *ec, "-keyout", j(f"{role}-key.pem"), "-out", j(f"{role}.csr"),
           "-subj", f"/C=GB/O=Bench/CN={role}")
        with open(j(f"{role}.ext"), "w") as f:
            f.write("basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n" + ext + "\n")
        sh("openssl", "x509", "-req", "-in", j(f"{role}.csr"), "-CA", j("ca-cert.pem"), "-CAkey", j("ca-key.pem"),
           "-CAcreateserial", "-days", "30", "-extfile", j(f"{role}.ext"), "-out", j(f"{role}-cert.pem"))
    return d


def w_convert_vmdk_stream(to_stream):
    """qcow2 -> vmdk streamOptimized (the OVA export) and back."""
    prep_q, _ = w_convert("qcow2", "raw", [])

    def prep(c, tool):
        src_q, _ = prep_q(c, tool)
        src = src_q
        if not to_stream:
            src = c.p("convsrc-stream.vmdk")
            if not os.path.exists(src):
                sh("qemu-img", "convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src_q, src)
        return (src, fresh_target(c, tool, "vmdk" if to_stream else "qcow2"))

    def run(c, tool, st):
        src, dst = st
        exe = OX if tool == "oxcow" else "qemu-img"
        if to_stream:
            args = ["-f", "qcow2", "-O", "vmdk", "-o", "subformat=streamOptimized"]
        else:
            args = ["-f", "vmdk", "-O", "qcow2"]
        return timed(lambda: sh(exe, "convert", *args, src, dst))

    return prep, run


def w_nbd(write, tls=False, client="qemu"):
    def prep(c, tool):
        img = c.p(f"nbd-{tool}.qcow2")
        if not os.path.exists(img):
            sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(c.size))
            sh("qemu-img", "bench", "-q", "-w", "-s", "1M", "-d", "4", "-c", str(c.size >> 21), "--pattern", "0x44", img)
        sock = c.p(f"nbd-{tool}.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        extra = []
        if tls:
            creds = make_tls_creds(c.p("tls-creds"))
            extra = ["--object", f"tls-creds-x509,id=tls0,dir={creds},endpoint=server", "--tls-creds", "tls0"]
        if tool == "oxcow":
            proc = subprocess.Popen([OX, "serve", "-t", "-f", "qcow2", "-k", sock, *extra, img])
        else:
            proc = subprocess.Popen(["qemu-nbd", "-t", "-f", "qcow2", "-k", sock, *extra, img])
        wait_for_socket(sock, 500)
        return (proc, sock)

    def run(c, tool, st):
        proc, sock = st
        try:
            args = ["-f", "raw", "-d", "16", "-c", "20000"]
            if write:
                args += ["-w"]
            if tls:
                # qemu-img bench takes no --object, so no TLS: the client
                # is oxcow's bench for both servers (rustls against rustls
                # for oxcow, rustls against gnutls for qemu-nbd).
                url = f"nbds+unix:///?socket={sock}&tls-certificates={c.p('tls-creds')}"
                out = sh(OX, "bench", *args, url).stdout
            else:
                exe = OX if client == "oxcow" else "qemu-img"
                out = sh(exe, "bench", *args, f"nbd+unix:///?socket={sock}").stdout
            return bench_time(out)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    return prep, run


def w_nbdcopy(write, conns):
    """nbdcopy (libnbd) through the whole disk with `conns` connections,
    the server started with `-e conns` (so qemu-nbd advertises multi-conn
    too): reads of an allocated image into null:, or writes of a raw file
    with data into a fresh image."""
    def prep(c, tool):
        img = c.p(f"copy-{tool}.qcow2")
        src = c.p("copy-src.raw")
        if not os.path.exists(src):
            sh("qemu-img", "create", "-q", "-f", "raw", src, str(c.size))
            sh("qemu-img", "bench", "-q", "-w", "-t", "none", "-s", "1M", "-d", "4", "-c", str(c.size >> 20), "--pattern", "0x5a", "-f", "raw", src)
        if write or not os.path.exists(img):
            if os.path.exists(img):
                os.unlink(img)
            sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(c.size))
            if not write:
                sh("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", src, img)
        sock = c.p(f"copy-{tool}.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        argv = [OX, "serve"] if tool == "oxcow" else ["qemu-nbd"]
        proc = subprocess.Popen(argv + ["-t", "-e", str(conns), "-f", "qcow2", "-k", sock, img])
        wait_for_socket(sock, 500)
        return (proc, sock, src)

    def run(c, tool, st):
        proc, sock, src = st
        url = f"nbd+unix:///?socket={sock}"
        try:
            args = ["nbdcopy", f"--connections={conns}", "--requests=16"]
            args += [src, url] if write else [url, "null:"]
            return timed(lambda: sh(*args))
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)

    return prep, run


def big_image(c, name, size, step_mib, snapshots):
    """A sparse qcow2 of `size` with one 64 KiB write every `step_mib` MiB
    (so that many L2 tables are in use) and `snapshots` internal
    snapshots, made once per run by QEMU's tools."""
    img = c.p(name)
    if os.path.exists(img):
        return img
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, str(size))
    cmds = []
    for i in range(size // (step_mib << 20)):
        cmds += ["-c", f"write -q -P 0x{(i % 250) + 1:x} {i * step_mib}M 64k"]
    for k in range(0, len(cmds), 4000):
        sh("qemu-io", *cmds[k:k + 4000], img)
    for n in range(snapshots):
        sh("qemu-img", "snapshot", "-c", f"s{n}", img)
    return img


def w_metadata(cmd, name, size, step_mib, snapshots):
    """`qemu-img CMD` against `oxcow CMD` on a big image: the time to open
    it and walk its metadata."""
    def prep(c, tool):
        return big_image(c, name, size, step_mib, snapshots)

    def run(c, tool, img):
        exe = OX if tool == "oxcow" else "qemu-img"
        return timed(lambda: sh(exe, *cmd, img, check=cmd[0] != "check"))

    return prep, run


def workloads(size):
    n4k = 32768
    return [
        ("4k alloc writes, depth 32, O_DIRECT", w_alloc("", ["-w", "-t", "none", "-d", "32", "-c", str(n4k)])),
        ("raw: 4k alloc writes into a sparse file, depth 32, O_DIRECT",
         w_alloc_raw(["-w", "-t", "none", "-d", "32", "-c", str(n4k)])),
        ("4k rewrites of allocated, depth 32, O_DIRECT", w_on_allocated(["-w", "-t", "none", "-d", "32", "-c", str(n4k), "--pattern", "0x66"])),
        ("raw file baseline: 4k rewrites, depth 32, O_DIRECT",
         w_on_allocated(["-w", "-t", "none", "-d", "32", "-c", str(n4k), "--pattern", "0x66"], fmt="raw")),
        ("4k reads, depth 32, O_DIRECT", w_on_allocated(["-t", "none", "-d", "32", "-c", str(4 * n4k)])),
        ("raw file baseline: 4k reads, depth 32, O_DIRECT", w_on_allocated(["-t", "none", "-d", "32", "-c", str(4 * n4k)], fmt="raw")),
        ("4k alloc writes, writeback, depth 32", w_alloc("", ["-w", "-t", "writeback", "-d", "32", "-S", "64k", "-c", "8192"])),
        ("raw: 4k alloc writes into a sparse file, writeback, depth 32",
         w_alloc_raw(["-w", "-t", "writeback", "-d", "32", "-S", "64k", "-c", "8192"])),
        ("4k alloc writes, writethrough, lazy refcounts", w_alloc("lazy_refcounts=on", ["-w", "-t", "writethrough", "-d", "1", "-S", "64k", "-c", "2000"])),
        ("4k alloc writes, writethrough, no lazy refcounts", w_alloc("", ["-w", "-t", "writethrough", "-d", "1", "-S", "64k", "-c", "2000"])),
        ("raw: 4k alloc writes into a sparse file, writethrough",
         w_alloc_raw(["-w", "-t", "writethrough", "-d", "1", "-S", "64k", "-c", "2000"])),
        # Each write synced before it completes (issue 12: raw skipped it).
        ("raw: 4k writes, writethrough", w_on_allocated(["-w", "-t", "writethrough", "-d", "1", "-S", "64k", "-c", "2000"], fmt="raw")),
        ("64k sequential alloc writes, depth 32", w_alloc("", ["-w", "-t", "none", "-d", "32", "-s", "64k", "-c", str(size >> 16)])),
        # Requests smaller than or not aligned to the host block: with
        # O_DIRECT they are read-modify-write cycles wherever the block is
        # larger than 512 bytes, and neighbours share blocks (issue 12).
        ("512B alloc writes, depth 32, O_DIRECT", w_alloc("", ["-w", "-t", "none", "-d", "32", "-s", "512", "-c", str(n4k)])),
        ("4k alloc writes at offset 512 (unaligned), depth 32, O_DIRECT",
         w_alloc("", ["-w", "-t", "none", "-d", "32", "-o", "512", "-c", str(n4k)])),
        ("raw: 512B rewrites, depth 32, O_DIRECT", w_on_allocated(["-w", "-t", "none", "-d", "32", "-s", "512", "-c", str(n4k), "--pattern", "0x77"], fmt="raw")),
        *[(f"NBD {name} (aes-256-xts): 4k {what}, depth 32 (qemu-img bench client)", w_encrypted(fmt, write))
          for name, fmt in (("qcow2+luks", "qcow2"), ("raw luks", "luks"))
          for what, write in (("reads", False), ("rewrites", True))],
        ("convert qcow2 -> raw", w_convert("qcow2", "raw", [])),
        ("convert raw -> qcow2", w_convert("raw", "qcow2", [])),
        ("convert raw -> qcow2 compressed", w_convert("raw", "qcow2", ["-c"])),
        ("convert vmdk streamOptimized -> qcow2", w_convert_vmdk_stream(False)),
        *[(f"convert {f} -> qcow2", w_convert(f, "qcow2", [])) for f in ("qed", "vdi", "vpc", "vhdx", "vmdk")],
        *[(f"convert qcow2 -> {f}", w_convert("qcow2", f, [])) for f in ("qed", "vdi", "vpc", "vhdx", "vmdk")],
        ("convert qcow2 -> vmdk streamOptimized", w_convert_vmdk_stream(True)),
        ("NBD 4k reads, depth 16 (qemu-img bench client)", w_nbd(False)),
        ("NBD 4k writes, depth 16 (qemu-img bench client)", w_nbd(True)),
        ("NBD over TLS 4k reads, depth 16 (oxcow bench client, client certificates)", w_nbd(False, tls=True)),
        ("NBD over TLS 4k writes, depth 16 (oxcow bench client)", w_nbd(True, tls=True)),
        ("NBD plaintext 4k reads, depth 16 (oxcow bench client)", w_nbd(False, tls=False, client="oxcow")),
        ("NBD plaintext 4k writes, depth 16 (oxcow bench client)", w_nbd(True, tls=False, client="oxcow")),
        ("info, 4 TiB image, 64 snapshots, 1024 L2 tables", w_metadata(["info"], "meta-4t.qcow2", 4 << 40, 4096, 64)),
        ("info --output=json, 4 TiB image, 64 snapshots", w_metadata(["info", "--output=json"], "meta-4t.qcow2", 4 << 40, 4096, 64)),
        ("check, 1 TiB image, all 2048 L2 tables in use", w_metadata(["check"], "meta-1t.qcow2", 1 << 40, 512, 0)),
        ("nbdcopy reads, 4 connections (-e 4, multi-conn)", w_nbdcopy(False, 4)),
        ("nbdcopy writes into a fresh image, 4 connections (-e 4, multi-conn)", w_nbdcopy(True, 4)),
        ("nbdcopy reads, 1 connection", w_nbdcopy(False, 1)),
        ("nbdcopy writes into a fresh image, 1 connection", w_nbdcopy(True, 1)),
    ]


def peak_rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def serve_memory(d, rounds=3, cache_opts=""):
    """Peak RSS of `oxcow serve` and `qemu-nbd` exporting a 1 TiB image
    whose L2 tables are all in use, while a client reads across all of it:
    the median of `rounds` alternating rounds, both with default caches or
    both with the same `--image-opts` cache options."""
    img = os.path.join(d, "tib.qcow2")
    sh("qemu-img", "create", "-q", "-f", "qcow2", img, "1T")
    # One 64 KiB write per 512 MiB: every L2 table of the disk exists.
    cmds = []
    for i in range(2048):
        cmds += ["-c", f"write -q -P 0x{(i % 250) + 1:x} {i * 512}M 64k"]
    sh("qemu-io", *cmds, img)
    out = {"oxcow": [], "qemu": []}
    for tool in [t for r in range(rounds) for t in (("oxcow", "qemu") if r % 2 == 0 else ("qemu", "oxcow"))]:
        sock = os.path.join(d, f"mem-{tool}.sock")
        if os.path.exists(sock):
            os.unlink(sock)
        argv = [OX, "serve"] if tool == "oxcow" else ["qemu-nbd"]
        spec = ["--image-opts", f"driver=qcow2,file.filename={img},{cache_opts}"] if cache_opts else ["-f", "qcow2", img]
        proc = subprocess.Popen(argv + ["-t", "-k", sock] + spec)
        wait_for_socket(sock, 500)
        url = f"nbd+unix:///?socket={sock}"
        # 4096 reads spread over the whole terabyte, depth 16.
        sh("qemu-img", "bench", "-f", "raw", "-d", "16", "-c", "4096", "-S", str(256 << 20), url)
        out[tool].append(peak_rss_kib(proc.pid))
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    os.unlink(img)
    return {tool: (statistics.median(v), v) for tool, v in out.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--size-gib", type=int, default=1)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--only", default=None, help="run only workloads whose name contains one of these ('|'-separated)")
    ap.add_argument("--memory", action="store_true", help="also measure serve's peak RSS on a 1 TiB image")
    ap.add_argument("--memory-rounds", type=int, default=3)
    a = ap.parse_args()
    if not os.path.exists(OX):
        sh("cargo", "build", "--release", "--quiet", cwd=ROOT)
    d = a.dir or tempfile.mkdtemp(prefix="oxcow-bench-", dir=os.environ.get("TMPDIR", "/var/tmp"))
    c = Ctx(d, a.size_gib << 30)
    rows = []
    try:
        for name, (prep, run) in workloads(c.size):
            if a.only and not any(o in name for o in a.only.split("|")):
                continue
            times = {"oxcow": [], "qemu": []}
            for r in range(a.rounds + 1):
                for tool in (("oxcow", "qemu") if r % 2 == 0 else ("qemu", "oxcow")):
                    st = prep(c, tool)
                    # Each run starts with nothing dirty: otherwise the
                    # write-back of the run before (768 MiB after a
                    # convert) lands in whichever run comes next.
                    os.sync()
                    t = run(c, tool, st)
                    if r > 0:  # round 0 warms caches up
                        times[tool].append(t)
            mo, mq = statistics.median(times["oxcow"]), statistics.median(times["qemu"])
            rows.append((name, mo, mq, mo / mq))
            print(f"{name:52s} oxcow {mo:8.3f}s  qemu {mq:8.3f}s  ratio {mo / mq:5.2f}", flush=True)
        mem = [(o or "default caches", serve_memory(d, a.memory_rounds, o)) for o in ("", "l2-cache-size=64K")] \
            if a.memory else None
    finally:
        if not a.dir:
            shutil.rmtree(d, ignore_errors=True)
    print()
    print("| workload | oxcow (s) | QEMU (s) | oxcow / QEMU |")
    print("|---|---:|---:|---:|")
    for name, mo, mq, ratio in rows:
        print(f"| {name} | {mo:.3f} | {mq:.3f} | {ratio:.2f} |")
    by = {r[0]: r for r in rows}
    for what, qn, rn in (("reads", "4k reads, depth 32, O_DIRECT", "raw file baseline: 4k reads, depth 32, O_DIRECT"),
                         ("rewrites", "4k rewrites of allocated, depth 32, O_DIRECT",
                          "raw file baseline: 4k rewrites, depth 32, O_DIRECT")):
        q, r = by.get(qn), by.get(rn)
        if q and r:
            print(f"\nqcow2 {what} / raw {what}: oxcow {q[1] / r[1]:.2f}, QEMU {q[2] / r[2]:.2f}")
    for qn, rn in (("4k alloc writes, depth 32, O_DIRECT", "raw: 4k alloc writes into a sparse file, depth 32, O_DIRECT"),
                   ("4k alloc writes, writeback, depth 32", "raw: 4k alloc writes into a sparse file, writeback, depth 32"),
                   ("4k alloc writes, writethrough, lazy refcounts", "raw: 4k alloc writes into a sparse file, writethrough")):
        q, r = by.get(qn), by.get(rn)
        if q and r:
            print(f"{qn}: qcow2 / raw, oxcow {q[1] / r[1]:.2f}, QEMU {q[2] / r[2]:.2f}")
    for opts, m in mem or []:
        rounds = lambda t: " ".join(f"{k / 1024:.1f}" for k in m[t][1])
        print(f"\npeak RSS serving a 1 TiB image (all 2048 L2 tables in use), {opts}: "
              f"oxcow serve {m['oxcow'][0] / 1024:.1f} MiB ({rounds('oxcow')}), "
              f"qemu-nbd {m['qemu'][0] / 1024:.1f} MiB ({rounds('qemu')})")


if __name__ == "__main__":
    main()
