//! Concurrency torture (issue 12). Many threads, and several NBD clients
//! (QEMU's `qemu-img bench` among them), issue random reads, writes,
//! write-zeroes, discards and flushes of 1 byte to 2 MiB at unaligned
//! offsets chosen to overlap and to meet inside shared sectors, 4 KiB blocks
//! and clusters, on images of every geometry (raw; qcow2 with 512 B to
//! 2 MiB clusters, with and without subclusters, v2 and v3, raw and qcow2
//! backing files, lazy refcounts, 1-bit refcounts, LUKS-encrypted), in
//! every cache mode,
//! through the library on real files (so O_DIRECT is really used) and
//! through the NBD server. `torture_model` checks the bytes kept from every
//! read made during the run, and every byte at the end as read by oxcow,
//! by QEMU from the file and (NBD runs) by QEMU over NBD; `qemu-img check`
//! must find the image clean.
//!
//! What the model lets each request leave is what the device promises:
//! - write: its bytes, exactly over its range;
//! - write-zeroes (with or without unmap): zeros, exactly over its range;
//! - discard on raw: zeros exactly over its range (a hole is punched);
//! - discard on qcow2: zeros over the whole clusters inside the range (the
//!   partial cluster at the end of the disk included), nothing elsewhere;
//!   on v2 images with a backing file nothing at all (v2 has no zero flag,
//!   and deallocating would show the backing data), as QEMU does;
//! - discard over NBD: what the served device does (the server runs with
//!   `--discard=unmap` and a 1-byte minimum block, so ranges pass exactly);
//! - flush and read: nothing.
//!
//! Budget: by default every geometry runs once through the library and once
//! over NBD, with cache modes rotated by the seed so that each run covers
//! every mode on both paths, for 0.8 s of load each.
//! `OXCOW_LONG=1` runs the full matrix (geometries x modes x paths) for 4 s
//! each. `OXCOW_TORTURE_SEED=N` replays a run's choices (each thread's
//! sequence of requests and the rotation; the interleaving is the
//! machine's), `OXCOW_TORTURE_ONLY=TEXT` runs the configurations of the full
//! matrix whose name contains TEXT, `OXCOW_TORTURE_SECS=X` sets the load
//! time. Every failure message names its seed and configuration.

use crate::support::{self, Rng};
use crate::torture_model::{fill_pattern, sample, Clock, Effect, History, Mutation, Observation};
use oxcow::nbd::client::NbdClient;
use oxcow::nbd::server::{DiscardMode, ExportConfig, ServeOptions};
use oxcow::{BlockDevice, CacheMode, Format, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Virtual disk size: not a multiple of most cluster sizes, so the partial
/// last cluster is exercised.
const DISK: u64 = (16 << 20) + 1536;
/// Backing file length: shorter than the disk and not sector-aligned.
const BASE_LEN: u64 = (12 << 20) + 777;
/// Largest request.
const MAX_REQ: u64 = 2 << 20;
/// Read bytes kept per read for the model to check.
const READ_SAMPLES: usize = 64;
/// Every thread issues at least this many requests, however slow the mode.
const MIN_OPS: u32 = 12;
/// Id of the initial content's pattern (request ids have a nonzero actor
/// in their top byte).
const BASE_ID: u32 = 0x00ff_ffff;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backing {
    None,
    Raw,
    Qcow2,
}

#[derive(Debug, Clone, Copy)]
struct Geometry {
    name: &'static str,
    raw: bool,
    cluster: u64,
    extended_l2: bool,
    v2: bool,
    backing: Backing,
    lazy_refcounts: bool,
    refcount_bits: u32,
    /// LUKS (`encrypt.format=luks`) under the password [`SECRET`].
    encrypted: bool,
}

/// The encrypted geometries' password.
const SECRET: &str = "torture";

const Q: Geometry = Geometry {
    name: "",
    raw: false,
    cluster: 65536,
    extended_l2: false,
    v2: false,
    backing: Backing::None,
    lazy_refcounts: false,
    refcount_bits: 16,
    encrypted: false,
};

const GEOMETRIES: &[Geometry] = &[
    Geometry { name: "raw", raw: true, cluster: 4096, ..Q },
    Geometry { name: "c512", cluster: 512, ..Q },
    Geometry { name: "c1k-rb1", cluster: 1024, refcount_bits: 1, ..Q },
    Geometry { name: "c4k", cluster: 4096, ..Q },
    Geometry { name: "c64k", ..Q },
    Geometry { name: "c2m", cluster: 2 << 20, ..Q },
    Geometry { name: "c16k-ext", cluster: 16384, extended_l2: true, ..Q },
    Geometry { name: "c2m-ext", cluster: 2 << 20, extended_l2: true, ..Q },
    Geometry { name: "c64k-rawbase", backing: Backing::Raw, ..Q },
    Geometry { name: "c64k-ext-rawbase", extended_l2: true, backing: Backing::Raw, ..Q },
    Geometry { name: "c4k-qcow2base", cluster: 4096, backing: Backing::Qcow2, ..Q },
    Geometry { name: "v2-c64k-rawbase", v2: true, backing: Backing::Raw, ..Q },
    Geometry { name: "v2-c512", v2: true, cluster: 512, ..Q },
    Geometry { name: "c4k-lazy", cluster: 4096, lazy_refcounts: true, ..Q },
    Geometry { name: "c4k-luks", cluster: 4096, encrypted: true, ..Q },
    Geometry { name: "c64k-ext-luks-rawbase", extended_l2: true, backing: Backing::Raw, encrypted: true, ..Q },
];

/// qemu-img's arguments naming the disk at `p`: an option string with the
/// secret for the encrypted geometries, else `-f FMT P`.
fn qemu_names(geo: &Geometry, fmt: &str, p: &str) -> Vec<String> {
    if geo.encrypted {
        let o = format!("driver=qcow2,file.filename={p},encrypt.key-secret=s0");
        ["--object", &format!("secret,id=s0,data={SECRET}"), "--image-opts", &o].map(String::from).to_vec()
    } else {
        ["-f", fmt, p].map(String::from).to_vec()
    }
}

const MODES: [CacheMode; 5] =
    [CacheMode::None, CacheMode::Directsync, CacheMode::Writeback, CacheMode::Writethrough, CacheMode::Unsafe];

fn mode_name(m: CacheMode) -> &'static str {
    match m {
        CacheMode::None => "none",
        CacheMode::Directsync => "directsync",
        CacheMode::Writeback => "writeback",
        CacheMode::Writethrough => "writethrough",
        CacheMode::Unsafe => "unsafe",
    }
}

#[derive(Debug, Clone, Copy)]
struct Config {
    /// Position in the full matrix (mixed into the seed).
    index: usize,
    geo: Geometry,
    mode: CacheMode,
    nbd: bool,
}

impl Config {
    fn name(&self) -> String {
        format!("{}/{}/{}", if self.nbd { "nbd" } else { "lib" }, self.geo.name, mode_name(self.mode))
    }
}

fn full_matrix() -> Vec<Config> {
    let mut v = Vec::new();
    for nbd in [false, true] {
        for &geo in GEOMETRIES {
            for mode in MODES {
                v.push(Config { index: v.len(), geo, mode, nbd });
            }
        }
    }
    v
}

fn long_mode() -> bool {
    std::env::var("OXCOW_LONG").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn parse_seed(s: &str) -> Option<u64> {
    let s = s.trim();
    match s.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => s.parse().ok(),
    }
}

fn base_seed() -> u64 {
    if let Some(s) = std::env::var("OXCOW_TORTURE_SEED").ok().and_then(|s| parse_seed(&s)) {
        return s;
    }
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    t ^ u64::from(std::process::id()).rotate_left(32)
}

fn load_time() -> Duration {
    let default = if long_mode() { 4.0 } else { 0.8 };
    let secs = std::env::var("OXCOW_TORTURE_SECS").ok().and_then(|s| s.parse::<f64>().ok()).unwrap_or(default);
    Duration::from_secs_f64(secs.max(0.0))
}

/// The configurations to run on one path: those named by
/// `OXCOW_TORTURE_ONLY`, the whole matrix in long mode, otherwise every
/// geometry once with the cache modes rotated by the seed (the two paths
/// rotated apart so the same geometry meets different modes on each).
fn selection(nbd: bool, seed: u64) -> Vec<Config> {
    let all: Vec<Config> = full_matrix().into_iter().filter(|c| c.nbd == nbd).collect();
    if let Ok(only) = std::env::var("OXCOW_TORTURE_ONLY") {
        return all.into_iter().filter(|c| c.name().contains(&only)).collect();
    }
    if long_mode() {
        return all;
    }
    let rot = (seed % MODES.len() as u64) as usize + if nbd { 2 } else { 0 };
    all.into_iter()
        .filter(|c| {
            let g = GEOMETRIES.iter().position(|g| g.name == c.geo.name).unwrap_or(0);
            c.mode == MODES[(g + rot) % MODES.len()]
        })
        .collect()
}

// --- The workload -----------------------------------------------------------

#[derive(Debug, Clone, Copy)]
enum Op {
    Read(u64, u64),
    Write(u64, u64),
    Zero(u64, u64, bool),
    Discard(u64, u64),
    Flush,
}

/// Where requests go: positions many requests start or end at, so that
/// requests from different threads overlap or meet inside shared sectors,
/// blocks and clusters.
struct Shape {
    size: u64,
    cluster: u64,
    hot: Vec<u64>,
}

impl Shape {
    fn new(geo: &Geometry, rng: &mut Rng) -> Shape {
        let size = DISK;
        let cluster = geo.cluster;
        let mut hot = vec![size, BASE_LEN, 0];
        for _ in 0..4 {
            hot.push(rng.below(size / cluster + 1) * cluster);
        }
        for _ in 0..4 {
            // A sector boundary inside a 4 KiB block.
            hot.push((rng.below(size / 4096) * 8 + 1 + rng.below(7)) * 512);
        }
        for _ in 0..3 {
            hot.push(rng.below(size));
        }
        for h in &mut hot {
            *h = (*h).min(size);
        }
        Shape { size, cluster, hot }
    }
}

fn log_uniform(r: &mut Rng, lo: u64, hi: u64) -> u64 {
    let (lb, hb) = (lo.ilog2(), hi.ilog2());
    let k = lb + r.below(u64::from(hb - lb).max(1)) as u32;
    let base = 1u64 << k;
    (base + r.below(base)).clamp(lo, hi)
}

struct Gen<'a> {
    rng: Rng,
    shape: &'a Shape,
}

impl Gen<'_> {
    fn len(&mut self) -> u64 {
        let r = &mut self.rng;
        match r.below(100) {
            0..=29 => 1 + r.below(1024),
            30..=37 => 512,
            38..=44 => 4096,
            45..=74 => log_uniform(r, 1 << 10, 64 << 10),
            75..=89 => log_uniform(r, 64 << 10, (2 * self.shape.cluster).clamp(256 << 10, MAX_REQ)),
            _ => log_uniform(r, 512 << 10, MAX_REQ),
        }
    }

    fn range(&mut self) -> (u64, u64) {
        let size = self.shape.size;
        let len = self.len().min(size);
        let r = &mut self.rng;
        let hot = self.shape.hot[r.below(self.shape.hot.len() as u64) as usize] as i64;
        let jitter: i64 = match r.below(8) {
            0 => 1,
            1 => -1,
            2 => 512,
            3 => -512,
            _ => 0,
        };
        let off: i64 = match r.below(100) {
            // Start or end exactly at (or a byte or sector off) a hot spot.
            0..=34 if r.below(2) == 0 => hot + jitter,
            0..=34 => hot - len as i64 + jitter,
            35..=54 => hot + r.below(32 << 10) as i64 - (16 << 10),
            55..=79 => r.below(size) as i64,
            _ => (r.below(size / 512) * 512) as i64,
        };
        (off.clamp(0, (size - len) as i64) as u64, len)
    }

    fn op(&mut self) -> Op {
        let (off, len) = self.range();
        match self.rng.below(100) {
            0..=26 => Op::Read(off, len),
            27..=74 => Op::Write(off, len),
            75..=85 => Op::Zero(off, len, self.rng.below(2) == 0),
            86..=95 => Op::Discard(off, len),
            _ => Op::Flush,
        }
    }
}

/// Where a discard promises zeros (see the module comment).
#[derive(Clone, Copy)]
struct DiscardPromise {
    raw: bool,
    nothing: bool,
    cluster: u64,
    size: u64,
}

impl DiscardPromise {
    fn new(geo: &Geometry) -> Self {
        DiscardPromise {
            raw: geo.raw,
            nothing: !geo.raw && geo.v2 && geo.backing != Backing::None,
            cluster: geo.cluster,
            size: DISK,
        }
    }
    fn effective(&self, off: u64, len: u64) -> Option<(u64, u64)> {
        if self.raw {
            return Some((off, len));
        }
        if self.nothing {
            return None;
        }
        let cs = self.cluster;
        let first = off.div_ceil(cs) * cs;
        let end = off + len;
        let last = if end == self.size { end } else { end / cs * cs };
        (last > first).then(|| (first, last - first))
    }
}

/// What one actor did.
#[derive(Default)]
struct Log {
    muts: Vec<Mutation>,
    reads: Vec<Observation>,
    /// reads, writes, write-zeroes, discards, flushes, bench runs
    counts: [u64; 6],
    written: u64,
    errors: Vec<String>,
    /// The request that took longest (wall time), for the summary: slow
    /// paths show here long before they show in a benchmark.
    slowest: Option<(Duration, String)>,
}

impl Log {
    fn merge(&mut self, o: Log) {
        self.muts.extend(o.muts);
        self.reads.extend(o.reads);
        for (a, b) in self.counts.iter_mut().zip(o.counts) {
            *a += b;
        }
        self.written += o.written;
        self.errors.extend(o.errors);
        if let Some((d, what)) = o.slowest {
            self.note_time(d, || what);
        }
    }
    fn note_time(&mut self, d: Duration, what: impl FnOnce() -> String) {
        if self.slowest.as_ref().is_none_or(|s| s.0 < d) {
            self.slowest = Some((d, what()));
        }
    }
}

struct Run<'a> {
    shape: &'a Shape,
    discard: DiscardPromise,
    clock: &'a Clock,
    until: Instant,
    start: &'a Barrier,
}

/// One thread's random requests against `dev` until the load time is up.
fn worker(dev: &dyn BlockDevice, actor: u32, seed: u64, run: &Run) -> Log {
    let mut gen = Gen { rng: Rng(seed | 1), shape: run.shape };
    let mut buf = vec![0u8; MAX_REQ as usize];
    let mut log = Log::default();
    let clock = run.clock;
    run.start.wait();
    let mut n = 0u32;
    while n < MIN_OPS || Instant::now() < run.until {
        n += 1;
        let id = (actor << 24) | n;
        let op = gen.op();
        let began = Instant::now();
        let (res, start, end) = match op {
            Op::Read(off, len) => {
                let b = &mut buf[..len as usize];
                let s = clock.tick();
                let res = dev.read_at(b, off);
                let e = clock.tick();
                if res.is_ok() {
                    let samples = sample(b, off, READ_SAMPLES, u64::from(id) ^ seed);
                    log.reads.push(Observation { id, off, len, start: s, end: e, samples });
                }
                log.counts[0] += 1;
                (res, s, e)
            }
            Op::Write(off, len) => {
                let b = &mut buf[..len as usize];
                fill_pattern(id, off, b);
                let s = clock.tick();
                let res = dev.write_at(b, off);
                let e = clock.tick();
                log.muts.push(Mutation {
                    id,
                    kind: "write",
                    effect: Effect::Pattern,
                    off,
                    len,
                    asked: (off, len),
                    start: s,
                    end: e,
                });
                log.counts[1] += 1;
                log.written += len;
                (res, s, e)
            }
            Op::Zero(off, len, unmap) => {
                let s = clock.tick();
                let res = dev.write_zeroes(off, len, unmap);
                let e = clock.tick();
                let kind = if unmap { "write-zeroes+unmap" } else { "write-zeroes" };
                log.muts.push(Mutation {
                    id,
                    kind,
                    effect: Effect::Zero,
                    off,
                    len,
                    asked: (off, len),
                    start: s,
                    end: e,
                });
                log.counts[2] += 1;
                (res, s, e)
            }
            Op::Discard(off, len) => {
                let s = clock.tick();
                let res = dev.discard(off, len);
                let e = clock.tick();
                if let Some((o, l)) = run.discard.effective(off, len) {
                    let (kind, effect) = ("discard", Effect::Zero);
                    log.muts.push(Mutation { id, kind, effect, off: o, len: l, asked: (off, len), start: s, end: e });
                }
                log.counts[3] += 1;
                (res, s, e)
            }
            Op::Flush => {
                let s = clock.tick();
                let res = dev.flush();
                let e = clock.tick();
                log.counts[4] += 1;
                (res, s, e)
            }
        };
        log.note_time(began.elapsed(), || format!("{op:?}"));
        if let Err(e) = res {
            log.errors.push(format!("request #{id:x} {op:?} (ticks {start}..{end}) failed: {e}"));
            break;
        }
    }
    log
}

/// QEMU's NBD client as one more writer: `qemu-img bench -w` runs of
/// 512-byte writes at sector- but not block-aligned offsets, or 4 KiB
/// writes starting 512 bytes into a block (the workloads of issue 12), 16
/// in flight, each run filling its range with one byte value.
fn bench_writer(uri: &str, actor: u32, seed: u64, slow: bool, run: &Run) -> Log {
    let mut rng = Rng(seed | 1);
    let mut log = Log::default();
    let size = run.shape.size;
    run.start.wait();
    let mut k = 0u32;
    while k == 0 || Instant::now() < run.until {
        k += 1;
        let id = (actor << 24) | k;
        let pattern = (1 + rng.below(255)) as u8;
        let (req, count) = if rng.below(2) == 0 { (512u64, 1024u64) } else { (4096, 256) };
        let count = if slow { count / 8 } else { count };
        let len = req * count;
        let off = if rng.below(2) == 0 {
            let h = run.shape.hot[rng.below(run.shape.hot.len() as u64) as usize];
            h.min(size - len) / 512 * 512
        } else {
            rng.below((size - len) / 4096) * 4096
        };
        // Never block-aligned: start one sector into a 4 KiB block.
        let off = match off % 4096 {
            0 if off + 512 + len <= size => off + 512,
            0 => off - 4096 + 512,
            _ => off,
        };
        let mut cmd = Command::new("qemu-img");
        cmd.args(["bench", "-q", "-f", "raw", "-w", "-d", "16"]);
        cmd.args(["-c", &count.to_string(), "-s", &req.to_string(), "-S", &req.to_string()]);
        cmd.args(["-o", &off.to_string(), "--pattern", &pattern.to_string()]);
        if rng.below(3) == 0 {
            cmd.args(["--flush-interval", "64"]);
        }
        cmd.arg(uri);
        let began = Instant::now();
        let s = run.clock.tick();
        let out = support::process::run_within(&mut cmd, Duration::from_secs(300));
        let e = run.clock.tick();
        log.note_time(began.elapsed(), || format!("qemu-img bench of {count} x {req} bytes"));
        log.muts.push(Mutation {
            id,
            kind: "qemu-img bench",
            effect: Effect::Fill(pattern),
            off,
            len,
            asked: (off, len),
            start: s,
            end: e,
        });
        log.counts[5] += 1;
        log.written += len;
        if !out.status.success() {
            log.errors.push(format!(
                "qemu-img bench #{id:x} at {off} ({count} x {req} bytes) failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ));
            break;
        }
    }
    log
}

// --- Images -----------------------------------------------------------------

/// The content of backing files and of raw disks before the run: a pattern
/// with holes (every fifth 64 KiB run is zero, so a qcow2 base made from it
/// has unallocated clusters).
fn base_content(len: u64) -> Vec<u8> {
    let mut v = vec![0u8; len as usize];
    for (k, chunk) in v.chunks_mut(65536).enumerate() {
        if k % 5 != 3 {
            fill_pattern(BASE_ID, k as u64 * 65536, chunk);
        }
    }
    v
}

/// Creates the disk (and its backing file) in `dir` with QEMU's tools;
/// returns its path and its initial content.
fn prepare(dir: &Path, geo: &Geometry) -> (PathBuf, Vec<u8>) {
    if geo.raw {
        let init = base_content(DISK);
        let p = dir.join("disk.raw");
        std::fs::write(&p, &init).unwrap();
        return (p, init);
    }
    let mut init = vec![0u8; DISK as usize];
    let p = dir.join("disk.qcow2");
    let mut o = format!("cluster_size={},refcount_bits={}", geo.cluster, geo.refcount_bits);
    o.push_str(if geo.v2 { ",compat=0.10" } else { ",compat=1.1" });
    if geo.extended_l2 {
        o.push_str(",extended_l2=on");
    }
    if geo.lazy_refcounts {
        o.push_str(",lazy_refcounts=on");
    }
    if geo.encrypted {
        o.push_str(",encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=10");
    }
    let secret = format!("secret,id=s0,data={SECRET}");
    let mut args: Vec<String> =
        ["create", "-q", "-f", "qcow2", "--object", &secret, "-o", &o].iter().map(|s| s.to_string()).collect();
    if geo.backing != Backing::None {
        let base = base_content(BASE_LEN);
        std::fs::write(dir.join("base.raw"), &base).unwrap();
        init[..base.len()].copy_from_slice(&base);
        if geo.backing == Backing::Raw {
            args.extend(["-b", "base.raw", "-F", "raw"].map(String::from));
        } else {
            let (b, q) = (dir.join("base.raw"), dir.join("base.qcow2"));
            support::ok(
                "qemu-img",
                &["convert", "-q", "-f", "raw", "-O", "qcow2", b.to_str().unwrap(), q.to_str().unwrap()],
            );
            args.extend(["-b", "base.qcow2", "-F", "qcow2"].map(String::from));
        }
    }
    args.push(p.to_str().unwrap().into());
    args.push(DISK.to_string());
    let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
    support::ok("qemu-img", &args);
    (p, init)
}

fn read_all(dev: &dyn BlockDevice) -> Result<Vec<u8>, String> {
    let mut v = vec![0u8; dev.len() as usize];
    for (k, chunk) in v.chunks_mut(1 << 20).enumerate() {
        dev.read_at(chunk, (k as u64) << 20).map_err(|e| format!("reading back at {}: {e}", (k as u64) << 20))?;
    }
    Ok(v)
}

/// The disk as QEMU reads it from `src` (the file named by qemu-img's
/// arguments `names`, or an NBD URI).
fn qemu_view(dir: &Path, names: &[String], what: &str) -> Result<Vec<u8>, String> {
    let out = dir.join(format!("{what}.raw"));
    let o = out.to_str().unwrap();
    let mut args = vec!["convert"];
    args.extend(names.iter().map(String::as_str));
    args.extend(["-O", "raw", o]);
    let src = names.join(" ");
    let (code, so, se) = support::run("qemu-img", &args);
    if code != 0 {
        return Err(format!("qemu-img convert of {src} failed: {so}{se}"));
    }
    let v = std::fs::read(&out).map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&out);
    Ok(v)
}

// --- One configuration --------------------------------------------------------

/// What a configuration did, for the summary line.
struct Summary {
    actors: usize,
    log: Log,
    elapsed: Duration,
    final_views: usize,
    read_bytes_checked: u64,
}

impl Summary {
    fn line(&self, name: &str) -> String {
        let c = &self.log.counts;
        let total: u64 = c.iter().sum();
        let bench = if c[5] > 0 { format!(", {} qemu-img bench runs", c[5]) } else { String::new() };
        let slowest = match &self.log.slowest {
            Some((d, what)) => format!("; slowest {:.3} s: {what}", d.as_secs_f64()),
            None => String::new(),
        };
        format!(
            "{name}: {} actors, {total} requests ({} reads, {} writes, {} write-zeroes, {} discards, {} flushes{bench}) \
             in {:.2} s, {} MiB written, {} read bytes and {} x {} final bytes checked{slowest}",
            self.actors,
            c[0],
            c[1],
            c[2],
            c[3],
            c[4],
            self.elapsed.as_secs_f64(),
            self.log.written >> 20,
            self.read_bytes_checked,
            self.final_views,
            DISK,
        )
    }
}

/// Aborts the process when a configuration hangs (a deadlock is a finding
/// too), naming it, instead of leaving CI waiting.
struct Watchdog(Option<std::sync::mpsc::Sender<()>>);

impl Watchdog {
    fn arm(name: String, limit: Duration) -> Watchdog {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        std::thread::spawn(move || {
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(limit) {
                eprintln!("concurrency_torture: {name} did not finish within {limit:?} (hang?); aborting");
                std::process::abort();
            }
        });
        Watchdog(Some(tx))
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.0.take();
    }
}

const LIB_THREADS: usize = 8;
const NBD_CLIENTS: usize = 3;
const THREADS_PER_CLIENT: usize = 2;

fn run_config(cfg: &Config, seed: u64, load: Duration) -> Result<String, String> {
    let _dog = Watchdog::arm(format!("{} (seed {seed:#x})", cfg.name()), Duration::from_secs(120) + load * 20);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let geo = &cfg.geo;
    let (path, initial) = prepare(d, geo);
    let fmt = if geo.raw { Format::Raw } else { Format::Qcow2 };
    let mut opts = OpenOptions::default().format(Some(fmt)).write(true).cache(cfg.mode);
    if cfg.index % 2 == 1 {
        // Half the runs with 512-byte L2 slices in a cache of a few, so
        // slices are evicted (dirty ones written back) under the load.
        opts = opts.qcow2_cache(crate::support::small_slices().l2_cache_size(4096));
    }
    if geo.encrypted {
        opts.key_secret = Some(oxcow::crypto::Secret::new(SECRET.as_bytes().to_vec()));
    }
    let img = oxcow::open(&path, &opts).map_err(|e| format!("opening: {e}"))?;
    let dev = img.device().clone();
    let mut rng = Rng(seed | 1);
    let shape = Shape::new(geo, &mut rng);
    let clock = Clock::new();
    let t0 = Instant::now();
    let mut problems = Vec::new();
    let mut nbd_view = None;
    let (log, actors, ours) = if cfg.nbd {
        let sock = d.join("nbd.sock");
        let config = ExportConfig::default().discard(DiscardMode::Unmap).multi_conn_ok(true);
        let sopts = ServeOptions::default().persistent(true).max_connections(16);
        let server = support::nbd::start_unix(dev.clone(), config, sopts, &sock);
        let uri = server.uri("");
        let clients: Vec<Arc<NbdClient>> = (0..NBD_CLIENTS)
            .map(|_| NbdClient::connect(&uri).map(Arc::new))
            .collect::<Result<_, _>>()
            .map_err(|e| format!("connecting: {e}"))?;
        let actors = NBD_CLIENTS * THREADS_PER_CLIENT + 1;
        let start = Barrier::new(actors);
        let run = Run {
            shape: &shape,
            discard: DiscardPromise::new(geo),
            clock: &clock,
            until: Instant::now() + load,
            start: &start,
        };
        let slow = matches!(cfg.mode, CacheMode::Writethrough | CacheMode::Directsync);
        let log = std::thread::scope(|s| {
            let mut hs = Vec::new();
            for t in 0..NBD_CLIENTS * THREADS_PER_CLIENT {
                let (c, run) = (&clients[t / THREADS_PER_CLIENT], &run);
                let ts = rng.next_u64();
                hs.push(s.spawn(move || worker(&**c, t as u32 + 1, ts, run)));
            }
            let (bs, run, uri) = (rng.next_u64(), &run, &uri);
            hs.push(s.spawn(move || bench_writer(uri, 0x40, bs, slow, run)));
            let mut log = Log::default();
            for h in hs {
                log.merge(h.join().expect("worker panicked"));
            }
            log
        });
        let ours = read_all(&*clients[0]);
        nbd_view = Some(qemu_view(d, &["-f", "raw", &uri].map(String::from), "over-nbd"));
        drop(clients);
        if let Err(e) = server.stop() {
            problems.push(format!("the NBD server failed: {e}"));
        }
        (log, actors, ours)
    } else {
        let start = Barrier::new(LIB_THREADS);
        let run = Run {
            shape: &shape,
            discard: DiscardPromise::new(geo),
            clock: &clock,
            until: Instant::now() + load,
            start: &start,
        };
        let log = std::thread::scope(|s| {
            let hs: Vec<_> = (0..LIB_THREADS)
                .map(|t| {
                    let (dev, run, ts) = (&dev, &run, rng.next_u64());
                    s.spawn(move || worker(&**dev, t as u32 + 1, ts, run))
                })
                .collect();
            let mut log = Log::default();
            for h in hs {
                log.merge(h.join().expect("worker panicked"));
            }
            log
        });
        (log, LIB_THREADS, read_all(&*dev))
    };
    let elapsed = t0.elapsed();
    if let Err(e) = img.close() {
        problems.push(format!("closing: {e}"));
    }
    drop(dev);
    drop(img);
    for e in &log.errors {
        problems.push(e.clone());
    }

    let hist = History::new(initial, log.muts.clone());
    let rv = hist.check_reads(&log.reads);
    if !rv.is_clean() {
        problems.push(format!(
            "{} of {} bytes read during the run hold values the model does not allow:\n    {}",
            rv.bad,
            rv.checked,
            rv.reports.join("\n    ")
        ));
    }
    let p = path.to_str().unwrap();
    let fmt_name = fmt.name();
    if !geo.raw {
        let mut args = vec!["check".to_string()];
        args.extend(qemu_names(geo, "qcow2", p));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let (code, out, err) = support::run("qemu-img", &args);
        if code != 0 {
            problems.push(format!("qemu-img check exit {code}: {out}{err}"));
        }
    }
    let mut views: Vec<(&str, Result<Vec<u8>, String>)> = vec![("oxcow", ours)];
    views.push(("QEMU from the file", qemu_view(d, &qemu_names(geo, fmt_name, p), "qemu")));
    if let Some(v) = nbd_view {
        views.push(("QEMU over NBD", v));
    }
    let mut first_ok: Option<(&str, Vec<u8>)> = None;
    let mut final_views = 0;
    for (who, v) in views {
        let v = match v {
            Ok(v) => v,
            Err(e) => {
                problems.push(format!("reading the final content ({who}): {e}"));
                continue;
            }
        };
        final_views += 1;
        // Identical views need checking once.
        if let Some((w0, v0)) = &first_ok {
            if *v0 == v {
                continue;
            }
            let at = v0.iter().zip(&v).position(|(a, b)| a != b).unwrap_or(v0.len().min(v.len()));
            problems.push(format!("{who} and {w0} read different content (first difference at byte {at})"));
        }
        let fv = hist.check_final(&v);
        if !fv.is_clean() {
            problems.push(format!(
                "final content as {who} reads it: {} of {} bytes hold values the model does not allow:\n    {}",
                fv.bad,
                fv.checked,
                fv.reports.join("\n    ")
            ));
        }
        if first_ok.is_none() {
            first_ok = Some((who, v));
        }
    }
    let summary = Summary { actors, read_bytes_checked: rv.checked, log, elapsed, final_views };
    let line = summary.line(&cfg.name());
    if problems.is_empty() {
        Ok(line)
    } else {
        Err(format!("{line}\n  {}", problems.join("\n  ")))
    }
}

fn config_seed(seed: u64, cfg: &Config) -> u64 {
    let mut r = Rng(seed ^ (cfg.index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    r.next_u64()
}

fn torture(nbd: bool) {
    let seed = base_seed();
    let load = load_time();
    let configs = selection(nbd, seed);
    let path = if nbd { "NBD" } else { "library" };
    println!(
        "concurrency_torture ({path}): seed {seed:#x}, {} configurations, {:.1} s of load each{}",
        configs.len(),
        load.as_secs_f64(),
        if long_mode() { " (long mode)" } else { "" }
    );
    let mut failures = Vec::new();
    for cfg in &configs {
        match run_config(cfg, config_seed(seed, cfg), load) {
            Ok(line) => println!("  ok {line}"),
            Err(msg) => {
                let again = format!(
                    "reproduce: OXCOW_TORTURE_SEED={seed:#x} OXCOW_TORTURE_ONLY='{}' cargo test -p oxcow --test concurrency_torture",
                    cfg.name()
                );
                println!("  FAILED {msg}\n  {again}");
                failures.push(format!("{msg}\n  {again}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} configurations failed:\n{}",
        failures.len(),
        configs.len(),
        failures.join("\n")
    );
}

#[test]
fn torture_through_library() {
    torture(false);
}

#[test]
fn torture_through_nbd() {
    torture(true);
}
