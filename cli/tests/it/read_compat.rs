//! Images made by QEMU's tools, read by oxcow: info, map, raw conversion and
//! pattern reads must agree with qemu-img / qemu-io.

use crate::support::*;
use std::path::Path;

/// Patterns spread over clusters, L2 boundaries and unaligned edges of an
/// image of `size` bytes.
fn spread(size: u64, cs: u64) -> Vec<(u8, u64, u64)> {
    let mut v = vec![(1, 0, 4096), (2, cs, cs), (3, cs * 3 + 512, 1536), (4, size / 2 - 1024, 3072)];
    v.push((5, size - cs, cs));
    v.sort_by_key(|p| p.1);
    v.dedup_by(|a, b| a.1 < b.1 + b.2);
    v
}

fn check_all(dir: &Path, file: &str, pats: &[(u8, u64, u64)]) {
    assert_map_matches(dir, file, &[]);
    check_no_map(dir, file, pats);
}

fn check_no_map(dir: &Path, file: &str, pats: &[(u8, u64, u64)]) {
    assert_info_matches(dir, file, &[]);
    assert_convert_matches(dir, file, &[]);
    assert_patterns(dir, file, pats, &[]);
}

fn simple_case(opts: &str, size: u64, cs: u64) {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", opts, "img.qcow2", &size.to_string()]);
    let pats = spread(size, cs);
    qemu_write(dir, "img.qcow2", &pats, &[]);
    check_all(dir, "img.qcow2", &pats);
}

#[test]
fn cluster_512() {
    simple_case("cluster_size=512", 8 << 20, 512);
}

#[test]
fn cluster_4k() {
    simple_case("cluster_size=4k", 8 << 20, 4096);
}

#[test]
fn cluster_64k() {
    simple_case("cluster_size=64k", 8 << 20, 65536);
}

#[test]
fn cluster_2m() {
    simple_case("cluster_size=2M", 16 << 20, 2 << 20);
}

#[test]
fn refcount_bits_1() {
    simple_case("refcount_bits=1,cluster_size=4k", 8 << 20, 4096);
}

#[test]
fn refcount_bits_64() {
    simple_case("refcount_bits=64,cluster_size=512", 4 << 20, 512);
}

#[test]
fn compat_0_10() {
    simple_case("compat=0.10", 8 << 20, 65536);
}

#[test]
fn compat_1_1_lazy_refcounts() {
    simple_case("compat=1.1,lazy_refcounts=on", 8 << 20, 65536);
}

fn extended_l2_image() -> tempfile::TempDir {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "img.qcow2", "8M"]);
    // Subcluster-sized writes (2 KiB subclusters of 64 KiB clusters), and a
    // zeroed subcluster inside an allocated cluster.
    let pats = [(1, 0, 2048), (2, 6144, 2048), (3, 65536 + 4096, 8192), (4, 1 << 20, 65536)];
    qemu_write(dir, "img.qcow2", &pats, &[]);
    ok(dir, "qemu-io", &["-c", "write -q -z 70000 2000", "-c", "write -q -z -u 1114112 2048", "img.qcow2"]);
    d
}

#[test]
fn extended_l2() {
    let d = extended_l2_image();
    check_no_map(d.path(), "img.qcow2", &[(1, 0, 2048), (2, 6144, 2048), (0, 2048, 4096)]);
}

#[test]
fn extended_l2_map() {
    let d = extended_l2_image();
    assert_map_matches(d.path(), "img.qcow2", &[]);
}

#[test]
fn dirty_after_abort() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", "img.qcow2", "8M"]);
    // qemu-io aborts on purpose: the image keeps its dirty bit.
    let r = run_in(dir, "qemu-io", &["-c", "write -P 1 0 64k", "-c", "abort", "img.qcow2"]);
    assert_ne!(r.code, 0);
    let info = json(&ok(dir, OXCOW, &["info", "--output=json", "img.qcow2"]).stdout);
    assert_eq!(info["dirty-flag"], true);
    check_all(dir, "img.qcow2", &[(1, 0, 65536)]);
    // Opening it writable repairs the refcounts first, as qemu-io does.
    ok(dir, OXCOW, &["io", "-c", "write -q -P 2 65536 4096", "img.qcow2"]);
    ok(dir, "qemu-img", &["check", "img.qcow2"]);
    assert_patterns(dir, "img.qcow2", &[(1, 0, 65536), (2, 65536, 4096)], &[]);
}

fn compressed(kind: &str) {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "raw", "src.raw", "4M"]);
    let pats = [(1, 0, 65536), (2, 65536, 131072), (7, 1 << 20, 1000)];
    qemu_write(dir, "src.raw", &pats, &["-f", "raw"]);
    let o = format!("compression_type={kind}");
    ok(dir, "qemu-img", &["convert", "-c", "-f", "raw", "-O", "qcow2", "-o", &o, "src.raw", "img.qcow2"]);
    check_all(dir, "img.qcow2", &pats);
}

#[test]
fn compressed_zlib() {
    compressed("zlib");
}

#[test]
fn compressed_zstd() {
    compressed("zstd");
}

/// raw base (4M) <- qcow2 mid (6M) <- qcow2 top (8M): two shorter backings.
fn chain_image() -> tempfile::TempDir {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "raw", "base.raw", "4M"]);
    qemu_write(dir, "base.raw", &[(1, 0, 1 << 20), (2, 3 << 20, 1 << 20)], &["-f", "raw"]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", "mid.qcow2", "6M"]);
    qemu_write(dir, "mid.qcow2", &[(3, 65536, 65536), (4, 5 << 20, 4096)], &[]);
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", "top.qcow2", "8M"]);
    qemu_write(dir, "top.qcow2", &[(5, 4096, 512), (6, 7 << 20, 65536)], &[]);
    d
}

#[test]
fn backing_chain_three_deep_map() {
    let d = chain_image();
    assert_map_matches(d.path(), "top.qcow2", &[]);
}

#[test]
fn backing_chain_three_deep() {
    let d = chain_image();
    let dir = d.path();
    let pats = [(1, 8192, 57344), (5, 4096, 512), (3, 65536, 65536), (2, 3 << 20, 1 << 20), (4, 5 << 20, 4096)];
    check_no_map(dir, "top.qcow2", &pats);
    assert_info_matches(dir, "top.qcow2", &["--backing-chain"]);
    let ours = json(&ok(dir, OXCOW, &["info", "--backing-chain", "--output=json", "top.qcow2"]).stdout);
    let theirs = json(&ok(dir, "qemu-img", &["info", "--backing-chain", "--output=json", "top.qcow2"]).stdout);
    let files = |v: &serde_json::Value| {
        v.as_array().map(|a| a.iter().map(|i| i["filename"].clone()).collect::<Vec<_>>()).unwrap_or_default()
    };
    assert_eq!(files(&ours), files(&theirs));
    // Human output of a chain matches too (modulo disk sizes, which the
    // host decides).
    let strip = |s: String| s.lines().filter(|l| !l.contains("disk size")).collect::<Vec<_>>().join("\n");
    assert_eq!(
        strip(ok(dir, OXCOW, &["info", "--backing-chain", "top.qcow2"]).stdout),
        strip(ok(dir, "qemu-img", &["info", "--backing-chain", "top.qcow2"]).stdout)
    );
}

#[test]
fn internal_snapshot() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "img.qcow2", "8M"]);
    qemu_write(dir, "img.qcow2", &[(1, 0, 131072)], &[]);
    ok(dir, "qemu-img", &["snapshot", "-c", "snap1", "img.qcow2"]);
    qemu_write(dir, "img.qcow2", &[(2, 65536, 65536), (3, 4 << 20, 4096)], &[]);
    check_all(dir, "img.qcow2", &[(1, 0, 65536), (2, 65536, 65536), (3, 4 << 20, 4096)]);
    // The snapshot's own contents convert like qemu-img's.
    assert_convert_matches(dir, "img.qcow2", &["-l", "snapshot.name=snap1"]);
    assert_convert_matches(dir, "img.qcow2", &["-l", "1"]);
    // io -l reads the snapshot, read-only.
    assert_patterns(dir, "img.qcow2", &[(1, 0, 131072)], &["-l", "snap1"]);
    assert_eq!(oxcow(dir, &["io", "-l", "snap1", "-c", "write 0 1", "img.qcow2"]).code, 1);
    let strip = |s: String| s.lines().filter(|l| !l.contains("disk size")).collect::<Vec<_>>().join("\n");
    assert_eq!(
        strip(ok(dir, OXCOW, &["info", "img.qcow2"]).stdout),
        strip(ok(dir, "qemu-img", &["info", "img.qcow2"]).stdout)
    );
}

fn data_file(raw: bool) {
    let d = tmp();
    let dir = d.path();
    let o = format!("data_file=img.data,data_file_raw={}", if raw { "on" } else { "off" });
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "-o", &o, "img.qcow2", "8M"]);
    let pats = spread(8 << 20, 65536);
    qemu_write(dir, "img.qcow2", &pats, &[]);
    check_all(dir, "img.qcow2", &pats);
}

#[test]
fn external_data_file() {
    data_file(false);
}

#[test]
fn external_data_file_raw() {
    data_file(true);
}

#[test]
fn persistent_bitmaps() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "img.qcow2", "8M"]);
    ok(dir, "qemu-img", &["bitmap", "--add", "img.qcow2", "b0"]);
    ok(dir, "qemu-img", &["bitmap", "--add", "-g", "1M", "--disable", "img.qcow2", "b1"]);
    let pats = spread(8 << 20, 65536);
    qemu_write(dir, "img.qcow2", &pats, &[]);
    check_all(dir, "img.qcow2", &pats);
}

#[test]
fn multi_tib_sparse() {
    let d = tmp();
    let dir = d.path();
    ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "img.qcow2", "4T"]);
    let t = 1u64 << 40;
    let pats = [(1, 0, 4096), (2, 4 << 30, 65536), (3, 3 * t + 12345 * 512, 8192), (4, 4 * t - 65536, 65536)];
    qemu_write(dir, "img.qcow2", &pats, &[]);
    check_all(dir, "img.qcow2", &pats);
}

/// Random qemu-io sequences (writes, zero writes with and without unmap,
/// discards) on QEMU-made images; oxcow must read what qemu-img reads and
/// map it the same way.
fn random_case(opts: &str, back: bool, seed: u64, with_map: bool) {
    let d = tmp();
    let dir = d.path();
    let cs = 65536u64;
    let mut create = vec!["create", "-q", "-f", "qcow2", "-o", opts];
    if back {
        // Same size as the overlay: the shorter-backing map case is pinned
        // by backing_chain_three_deep_map.
        ok(dir, "qemu-img", &["create", "-q", "-f", "qcow2", "base.qcow2", "8M"]);
        qemu_write(dir, "base.qcow2", &[(0x5a, 0, 6 << 20)], &[]);
        create.extend_from_slice(&["-b", "base.qcow2", "-F", "qcow2"]);
    }
    create.extend_from_slice(&["img.qcow2", "8M"]);
    ok(dir, "qemu-img", &create);
    let mut rng = Rng::new(seed);
    let mut cmds = Vec::new();
    for _ in 0..40 {
        let off = rng.below(120) * cs / 2 + if rng.below(2) == 0 { 0 } else { rng.below(cs) };
        let len = (1 + rng.below(3 * cs)).min((8 << 20) - off);
        cmds.push(match rng.below(6) {
            0 => format!("write -q -z {off} {len}"),
            1 => format!("write -q -z -u {off} {len}"),
            2 => format!("discard -q {off} {len}"),
            _ => format!("write -q -P {} {off} {len}", 1 + rng.below(200)),
        });
    }
    ok(dir, "qemu-io", &io_args(&[], &cmds, "img.qcow2"));
    if with_map {
        assert_map_matches(dir, "img.qcow2", &[]);
    }
    assert_info_matches(dir, "img.qcow2", &[]);
    assert_convert_matches(dir, "img.qcow2", &[]);
    let c = oxcow(dir, &["compare", "img.qcow2", "img.qcow2"]);
    assert_eq!(c.code, 0);
}

/// `OXCOW_READ_SEEDS` adds more seeds for longer hunts.
fn read_seeds() -> u64 {
    std::env::var("OXCOW_READ_SEEDS").ok().and_then(|v| v.parse().ok()).unwrap_or(0)
}

#[test]
fn random_qemu_images() {
    for k in 0..=read_seeds() {
        for (i, opts) in ["cluster_size=64k", "compat=0.10", "lazy_refcounts=on", "refcount_bits=1,cluster_size=4k"]
            .iter()
            .enumerate()
        {
            random_case(opts, false, 100 + i as u64 + 1000 * k, true);
            random_case(opts, true, 200 + i as u64 + 1000 * k, true);
        }
    }
}

#[test]
fn random_qemu_images_extended_l2() {
    random_case("extended_l2=on", false, 300, false);
    random_case("extended_l2=on", true, 301, false);
}
