//! Write-path differential tests: the same random command sequence goes
//! through `oxcow io` on an image made by `oxcow create` and through
//! `qemu-io` on one made by `qemu-img create`; the results must be equal,
//! oxcow's image must pass `qemu-img check`, and qemu-io must read back the
//! patterns from it.

use crate::support::*;
use std::path::Path;

const SIZE: u64 = 5 << 30;

/// The content model: byte ranges whose pattern is known at the end.
struct Model {
    /// (start, end, pattern); `None` after a discard (format-defined).
    spans: Vec<(u64, u64, Option<u8>)>,
}

impl Model {
    fn set(&mut self, start: u64, end: u64, p: Option<u8>) {
        let mut out = Vec::new();
        for &(s, e, q) in &self.spans {
            if e <= start || s >= end {
                out.push((s, e, q));
                continue;
            }
            if s < start {
                out.push((s, start, q));
            }
            if e > end {
                out.push((end, e, q));
            }
        }
        out.push((start, end, p));
        self.spans = out;
    }
}

/// Random commands, some aligned and some not, clustered around region
/// starts so they overlap and cross cluster and L2-table boundaries; one
/// region lies past 4 GiB.
fn commands(seed: u64, cs: u64, n: usize, compress: bool, model: &mut Model) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let l2_span = cs * (cs / 8);
    let regions = [0, l2_span.saturating_sub(cs * 2).min(SIZE - 8 * cs), (4 << 30) - cs, 9 << 20];
    let mut cmds = Vec::new();
    let mut touched = std::collections::HashSet::new();
    for _ in 0..n {
        let base = regions[rng.below(regions.len() as u64) as usize];
        let aligned = rng.below(2) == 0;
        let (off, len) = if aligned {
            (base + rng.below(6) * cs, (1 + rng.below(3)) * cs)
        } else {
            (base + rng.below(6 * cs), 1 + rng.below(3 * cs))
        };
        let len = len.min(SIZE - off);
        let before = cmds.len();
        let kinds = if compress { 12 } else { 10 };
        match rng.below(kinds) {
            10 | 11 => {
                // Compressed writes cover whole clusters that nothing has
                // touched yet (qemu refuses to compress over anything).
                let off = off / cs * cs;
                let len = ((1 + rng.below(2)) * cs).min(SIZE - off);
                let p = 1 + rng.below(250) as u8;
                let fresh = (off / cs..(off + len).div_ceil(cs)).all(|c| !touched.contains(&c));
                let flag = if fresh { "-c " } else { "" };
                cmds.push(format!("write -q {flag}-P {p} {off} {len}"));
                model.set(off, off + len, Some(p));
                touched.extend(off / cs..(off + len).div_ceil(cs));
            }
            0..=4 => {
                let p = 1 + rng.below(250) as u8;
                cmds.push(format!("write -q -P {p} {off} {len}"));
                model.set(off, off + len, Some(p));
            }
            5 => {
                cmds.push(format!("write -q -z {off} {len}"));
                model.set(off, off + len, Some(0));
            }
            6 => {
                cmds.push(format!("write -q -z -u {off} {len}"));
                model.set(off, off + len, Some(0));
            }
            7 | 8 => {
                cmds.push(format!("discard -q {off} {len}"));
                model.set(off, off + len, None);
            }
            _ => cmds.push("flush".into()),
        }
        if cmds.len() > before && !cmds[before].starts_with("flush") {
            touched.extend(off / cs..(off + len).div_ceil(cs));
        }
    }
    cmds
}

fn backing(dir: &Path, kind: &str) -> Vec<String> {
    match kind {
        "qcow2" => {
            ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "4100M"]);
            qemu_write(dir, "base.qcow2", &[(0x11, 0, 3 << 20), (0x22, (4 << 30) - 65536, 131072)], &[]);
            vec!["-b".into(), "base.qcow2".into(), "-F".into(), "qcow2".into()]
        }
        "raw" => {
            ok(dir, "qemu-img", &["create", "-q", "-f", "raw", "base.raw", "10M"]);
            qemu_write(dir, "base.raw", &[(0x33, 0, 10 << 20)], &["-f", "raw"]);
            vec!["-b".into(), "base.raw".into(), "-F".into(), "raw".into()]
        }
        _ => vec![],
    }
}

/// Runs the case for its own seed, plus `OXCOW_DIFF_SEEDS` more seeds when
/// that variable is set (for longer hunts than the default suite allows;
/// `OXCOW_DIFF_OPS` sets the commands per sequence, 24 by default).
fn case(opts: &str, cs: u64, back: &str, seed: u64) {
    case_with(opts, cs, back, seed, false)
}

/// As `case`, with compressed cluster writes (`write -c`) in the mix.
fn case_compressed(opts: &str, cs: u64, back: &str, seed: u64) {
    case_with(opts, cs, back, seed, true)
}

fn case_with(opts: &str, cs: u64, back: &str, seed: u64, compress: bool) {
    let extra: u64 = std::env::var("OXCOW_DIFF_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(0);
    for k in 0..=extra {
        one_case(opts, cs, back, seed + k * 1000, compress);
    }
}

fn one_case(opts: &str, cs: u64, back: &str, seed: u64, compress: bool) {
    let d = tmp();
    let dir = d.path();
    let b = backing(dir, back);
    let size = SIZE.to_string();
    let mk = |prog: &str, file: &str, o: &str| {
        let mut a: Vec<&str> = vec!["create", "-q", "-f", "qcow2"];
        if !o.is_empty() {
            a.push("-o");
            a.push(o);
        }
        a.extend(b.iter().map(String::as_str));
        a.push(file);
        a.push(&size);
        ok(dir, prog, &a);
    };
    let (o_ox, o_q) = if opts.contains("data_file") {
        (opts.replace("data_file=X", "data_file=ox.data"), opts.replace("data_file=X", "data_file=q.data"))
    } else {
        (opts.to_string(), opts.to_string())
    };
    mk(OXCOW, "ox.qcow2", &o_ox);
    mk("qemu-img", "q.qcow2", &o_q);

    let mut model = Model { spans: Vec::new() };
    let ops = std::env::var("OXCOW_DIFF_OPS").ok().and_then(|v| v.parse().ok()).unwrap_or(24);
    let cmds = commands(seed, cs, ops, compress, &mut model);
    let ctx = format!("opts={opts} backing={back} seed={seed}\ncommands: {cmds:#?}");
    let r = oxcow(dir, &io_args(&["io", "-d", "unmap"], &cmds, "ox.qcow2"));
    assert_eq!(r.code, 0, "oxcow io failed: {}{}\n{ctx}", r.stdout, r.stderr);
    // qemu-io gets a fresh process before each compressed write: within one
    // process, qemu 10.0 may append a compressed cluster to a host cluster
    // that was freed and reused for an L2 table since its last compressed
    // write, and then marks its own image corrupt.
    let mut groups: Vec<Vec<String>> = vec![Vec::new()];
    for c in &cmds {
        if c.contains(" -c ") && !groups.last().is_some_and(|g| g.is_empty()) {
            groups.push(Vec::new());
        }
        groups.last_mut().expect("one group").push(c.clone());
    }
    for g in &groups {
        ok(dir, "qemu-io", &io_args(&["-d", "unmap"], g, "q.qcow2"));
    }

    let chk = qemu_img(dir, &["check", "ox.qcow2"]);
    assert_eq!(chk.code, 0, "qemu-img check on oxcow's image: {}{}\n{ctx}", chk.stdout, chk.stderr);
    // And the other way round: oxcow's checker accepts qemu's image.
    let chk = oxcow(dir, &["check", "q.qcow2"]);
    assert_eq!(chk.code, 0, "oxcow check on qemu's image: {}{}\n{ctx}", chk.stdout, chk.stderr);
    let cmp = qemu_img(dir, &["compare", "ox.qcow2", "q.qcow2"]);
    assert_eq!(cmp.code, 0, "images differ: {}{}\n{ctx}", cmp.stdout, cmp.stderr);

    let mut reads: Vec<String> =
        model.spans.iter().filter_map(|&(s, e, p)| p.map(|p| format!("read -q -P {p} {s} {}", e - s))).collect();
    reads.truncate(40);
    if !reads.is_empty() {
        let r = run_in(dir, "qemu-io", &io_args(&["-r"], &reads, "ox.qcow2"));
        assert_eq!(r.code, 0, "qemu-io pattern read on oxcow's image: {}{}\n{ctx}", r.stdout, r.stderr);
    }
}

#[test]
fn cluster_512_refcount_1() {
    case("cluster_size=512,refcount_bits=1", 512, "", 1);
}

#[test]
fn cluster_4k_refcount_2() {
    case("cluster_size=4k,refcount_bits=2", 4096, "", 2);
}

#[test]
fn cluster_64k_default() {
    case("", 65536, "", 3);
}

#[test]
fn cluster_64k_refcount_64() {
    case("refcount_bits=64", 65536, "", 4);
}

#[test]
fn cluster_2m() {
    case("cluster_size=2M", 2 << 20, "", 5);
}

#[test]
fn compat_0_10() {
    case("compat=0.10", 65536, "", 6);
}

#[test]
fn compat_0_10_backing() {
    case("compat=0.10", 65536, "qcow2", 7);
}

#[test]
fn lazy_refcounts() {
    case("lazy_refcounts=on,cluster_size=4k", 4096, "", 8);
}

#[test]
fn extended_l2() {
    case("extended_l2=on", 65536, "", 9);
}

#[test]
fn extended_l2_backing() {
    case("extended_l2=on,cluster_size=32k", 32768, "qcow2", 10);
}

#[test]
fn data_file() {
    case("data_file=X", 65536, "", 11);
}

#[test]
fn data_file_raw() {
    case("data_file=X,data_file_raw=on", 65536, "", 12);
}

#[test]
fn data_file_backing() {
    case("data_file=X", 65536, "raw", 13);
}

#[test]
fn backing_qcow2() {
    case("cluster_size=4k", 4096, "qcow2", 14);
}

#[test]
fn backing_raw_shorter() {
    case("refcount_bits=8", 65536, "raw", 15);
}

#[test]
fn cluster_512_backing() {
    case("cluster_size=512", 512, "qcow2", 16);
}

#[test]
fn compressed_writes() {
    case_compressed("", 65536, "", 17);
}

#[test]
fn compressed_writes_zstd_4k() {
    case_compressed("compression_type=zstd,cluster_size=4k", 4096, "", 18);
}

#[test]
fn compressed_writes_backing() {
    case_compressed("cluster_size=4k", 4096, "qcow2", 19);
}

#[test]
fn compressed_writes_extended_l2() {
    case_compressed("extended_l2=on", 65536, "", 20);
}

#[test]
fn compressed_writes_v2_refcount() {
    case_compressed("compat=0.10", 65536, "", 21);
}
