//! Benchmark (ignored by default; prints numbers, asserts only
//! correctness): a boot-like read pattern on a local qcow2 overlay whose
//! base is served by qemu-nbd through a proxy adding 2 ms to every request.
//! Small reads scattered over the first GiB, in a fixed order, then the same
//! sequence twice more. Compares oxcow with and without copy-on-read to
//! `qemu-io` with and without `-C` on the same base.
//!
//! Run: `cargo test -p oxcow --release --test it remote_bench:: -- --ignored --nocapture`

use crate::support;

use crate::support::remote::*;
use oxcow::qcow2::CreateOptions;
use oxcow::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const READS: usize = 2000;
const LATENCY: Duration = Duration::from_millis(2);

/// The read sequence: 4 KiB-aligned offsets in the first GiB, mostly
/// small reads, with some locality (runs of nearby reads, as a boot
/// reading a few files at a time does).
fn pattern() -> Vec<(u64, u64)> {
    let mut rng = support::Rng(0xb007);
    let mut v = Vec::with_capacity(READS);
    let mut at = 0u64;
    for _ in 0..READS {
        if rng.below(4) == 0 {
            at = rng.below(GIB / 4096) * 4096;
        }
        let len = [4096u64, 4096, 8192, 16384, 32768, 65536][rng.below(6) as usize];
        if at + len > GIB {
            at = 0;
        }
        v.push((at, len));
        at += len + rng.below(8) * 4096;
    }
    v
}

fn make_base(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("base.raw");
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(GIB).unwrap();
    // Data in 1 MiB runs covering about a quarter of the disk, the rest holes.
    let mut rng = support::Rng(42);
    let mut block = vec![0u8; 1 << 20];
    for mb in 0..(GIB >> 20) {
        if rng.below(4) == 0 {
            for b in block.iter_mut() {
                *b = rng.next_u64() as u8;
            }
            f.write_all_at(&block, mb << 20).unwrap();
        }
    }
    p
}

fn make_overlay(path: &Path, backing: &str) {
    let st = oxcow::create_file(path).unwrap();
    let opts = CreateOptions::new(GIB).backing_file(Some(backing.into())).backing_format(Some("raw".into()));
    oxcow::qcow2::create(st, None, &opts).unwrap();
}

struct Pass {
    secs: f64,
    reads: u64,
    bytes: u64,
}

fn oxcow_passes(overlay: &Path, cor: bool, proxy: &Proxy, base: &std::fs::File) -> Vec<Pass> {
    let opts = OpenOptions::default().write(true).allow_network_backing(true).copy_on_read(cor);
    let img = oxcow::open(overlay, &opts).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    let mut want = vec![0u8; 65536];
    for _ in 0..3 {
        let (r0, b0) = (proxy.reads(), proxy.read_bytes());
        let start = Instant::now();
        for (off, len) in pattern() {
            img.device().read_at(&mut buf[..len as usize], off).unwrap();
        }
        let secs = start.elapsed().as_secs_f64();
        out.push(Pass { secs, reads: proxy.reads() - r0, bytes: proxy.read_bytes() - b0 });
    }
    // Correctness, outside the timing.
    for (off, len) in pattern().into_iter().step_by(7) {
        img.device().read_at(&mut buf[..len as usize], off).unwrap();
        base.read_exact_at(&mut want[..len as usize], off).unwrap();
        assert!(buf[..len as usize] == want[..len as usize]);
    }
    img.close().unwrap();
    out
}

fn qemu_io_passes(overlay: &Path, cor: bool, proxy: &Proxy) -> Vec<Pass> {
    let mut args: Vec<String> = vec!["-f".into(), "qcow2".into()];
    if cor {
        args.push("-C".into());
    }
    args.push(overlay.to_str().unwrap().into());
    for (off, len) in pattern() {
        args.push("-c".into());
        args.push(format!("read -q {off} {len}"));
    }
    let mut out = Vec::new();
    for _ in 0..3 {
        let (r0, b0) = (proxy.reads(), proxy.read_bytes());
        let start = Instant::now();
        let o = Command::new("qemu-io").args(&args).output().unwrap();
        assert!(
            o.status.success(),
            "qemu-io: {}{}",
            String::from_utf8_lossy(&o.stdout).lines().take(5).collect::<Vec<_>>().join("\n"),
            String::from_utf8_lossy(&o.stderr)
        );
        let secs = start.elapsed().as_secs_f64();
        out.push(Pass { secs, reads: proxy.reads() - r0, bytes: proxy.read_bytes() - b0 });
    }
    out
}

fn print(name: &str, passes: &[Pass]) {
    let total: f64 = passes.iter().map(|p| p.secs).sum();
    let reads: u64 = passes.iter().map(|p| p.reads).sum();
    let bytes: u64 = passes.iter().map(|p| p.bytes).sum();
    let per: Vec<String> =
        passes.iter().map(|p| format!("{:7.3}s {:5} req {:9} B", p.secs, p.reads, p.bytes)).collect();
    println!(
        "{name:<22} total {total:7.3}s  base: {reads:5} READs {:8.2} MiB | {}",
        bytes as f64 / 1048576.0,
        per.join(" | ")
    );
}

#[test]
#[ignore = "benchmark: run with --ignored --nocapture"]
fn boot_pattern_through_2ms_latency() {
    if !have("qemu-nbd") || !have("qemu-io") {
        eprintln!("note: qemu-nbd/qemu-io not installed; skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let base = make_base(dir.path());
    let basef = std::fs::File::open(&base).unwrap();
    let q = qemu_nbd(dir.path(), &base);
    let proxy = Proxy::start(q.upstream.clone(), LATENCY);
    let total_bytes: u64 = pattern().iter().map(|p| p.1).sum();
    println!(
        "\nboot-like pattern: {READS} reads ({:.1} MiB) over the first GiB, 3 passes, +{LATENCY:?} per request",
        total_bytes as f64 / 1048576.0
    );
    for (name, cor, oxcow) in [
        ("oxcow (plain)", false, true),
        ("oxcow copy-on-read", true, true),
        ("qemu-io (plain)", false, false),
        ("qemu-io -C", true, false),
    ] {
        let ov = dir.path().join(format!("{}.qcow2", name.replace([' ', '(', ')', '-'], "_")));
        make_overlay(&ov, &proxy.url());
        let passes = if oxcow { oxcow_passes(&ov, cor, &proxy, &basef) } else { qemu_io_passes(&ov, cor, &proxy) };
        print(name, &passes);
        if cor {
            assert_eq!(passes[1].reads + passes[2].reads, 0, "{name}: re-reads went to the base");
        }
    }
}
