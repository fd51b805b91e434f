//! `check` and repair against qemu-img check, on clean, leaking, corrupt
//! and dirty images made by QEMU's own tools.

use crate::support::*;
use oxcow::qcow2::{CheckReport, Repair};
use oxcow::{Format, OpenOptions};
use std::path::Path;

fn qemu_check_json(p: &Path) -> serde_json::Value {
    let (_, out, err) = run("qemu-img", &["check", "--output=json", p.to_str().unwrap()]);
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("qemu-img check json: {e}: {out}{err}"))
}

fn oxcow_check(p: &Path, repair: Repair) -> CheckReport {
    let opts = OpenOptions::default()
        .format(Format::Qcow2)
        .write(repair != Repair::None)
        .repair(repair != Repair::None)
        .no_backing(true);
    let img = oxcow::open(p, &opts).unwrap();
    let r = img.qcow2().unwrap().check(repair).unwrap();
    img.close().unwrap();
    r
}

fn assert_matches_qemu(p: &Path) {
    let q = qemu_check_json(p);
    let o = oxcow_check(p, Repair::None);
    let get = |k: &str| q.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    assert_eq!(o.corruptions, get("corruptions"), "{p:?} corruptions: {q} vs {o:?}");
    assert_eq!(o.leaks, get("leaks"), "{p:?} leaks: {q} vs {o:?}");
    assert_eq!(o.total_clusters, get("total-clusters"), "{p:?} total");
    assert_eq!(o.allocated_clusters, get("allocated-clusters"), "{p:?} allocated: {q} vs {o:?}");
    assert_eq!(o.fragmented_clusters, get("fragmented-clusters"), "{p:?} fragmented: {q} vs {o:?}");
    assert_eq!(o.compressed_clusters, get("compressed-clusters"), "{p:?} compressed");
    assert_eq!(o.image_end_offset, get("image-end-offset"), "{p:?} image end: {q} vs {o:?}");
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Host offset of the first refcount block (the table's first entry).
fn refblock0(p: &Path) -> u64 {
    let b = std::fs::read(p).unwrap();
    let rt = u64::from_be_bytes(b[48..56].try_into().unwrap());
    u64::from_be_bytes(b[rt as usize..rt as usize + 8].try_into().unwrap())
}

fn patch(p: &Path, off: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.write_all_at(bytes, off).unwrap();
}

#[test]
fn clean_images_report_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mk = |name: &str, opts: &str, cmds: &[&str]| {
        let p = d.join(name);
        ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", opts, s(&p), "16M"]);
        for c in cmds {
            ok("qemu-io", &["-c", c, s(&p)]);
        }
        p
    };
    let images = vec![
        mk("plain.qcow2", "cluster_size=4096", &["write -P 1 0 64k", "write -P 2 1M 4k", "write -z 2M 64k"]),
        mk("v2.qcow2", "compat=0.10", &["write -P 1 0 300k", "discard 64k 64k"]),
        mk("ext.qcow2", "extended_l2=on,cluster_size=64k", &["write -P 1 4k 4k", "write -P 3 1M 100k"]),
        mk("rb1.qcow2", "refcount_bits=1,cluster_size=512", &["write -P 1 0 20k"]),
        mk("rb64.qcow2", "refcount_bits=64", &["write -P 1 0 200k"]),
    ];
    for p in &images {
        assert_matches_qemu(p);
    }
    // Snapshots, compressed clusters and bitmaps.
    let snap = d.join("snap.qcow2");
    std::fs::copy(&images[0], &snap).unwrap();
    ok("qemu-img", &["snapshot", "-c", "s1", s(&snap)]);
    ok("qemu-io", &["-c", "write -P 9 0 8k", s(&snap)]);
    assert_matches_qemu(&snap);
    let comp = d.join("comp.qcow2");
    ok("qemu-img", &["convert", "-c", "-O", "qcow2", s(&images[2]), s(&comp)]);
    assert_matches_qemu(&comp);
    let zstd = d.join("zstd.qcow2");
    ok("qemu-img", &["convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", s(&images[0]), s(&zstd)]);
    assert_matches_qemu(&zstd);
    let bm = d.join("bm.qcow2");
    std::fs::copy(&images[0], &bm).unwrap();
    ok("qemu-img", &["bitmap", "--add", s(&bm), "b0"]);
    assert_matches_qemu(&bm);
}

#[test]
fn leak_is_found_and_repaired() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("leak.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "16M"]);
    ok("qemu-io", &["-c", "write -P 5 0 128k", s(&p)]);
    // Claim cluster 10 (free) is in use: refcount 16-bit entry 10.
    let rb = refblock0(&p);
    patch(&p, rb + 20, &[0, 1]);
    let len = std::fs::metadata(&p).unwrap().len();
    if len < 11 * 65536 {
        std::fs::OpenOptions::new().write(true).open(&p).unwrap().set_len(11 * 65536).unwrap();
    }
    assert_matches_qemu(&p);
    let o = oxcow_check(&p, Repair::None);
    assert_eq!(o.leaks, 1);
    let r = oxcow_check(&p, Repair::Leaks);
    assert_eq!((r.leaks, r.leaks_fixed), (0, 1));
    check_clean(&p);
    ok("qemu-io", &["-c", "read -P 5 0 128k", s(&p)]);
}

#[test]
fn low_refcount_and_copied_flag_are_corruptions_repaired_by_all() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "16M"]);
    ok("qemu-io", &["-c", "write -P 7 0 192k", s(&p)]);
    // Zero the refcount of the last data cluster written (cluster 6).
    let rb = refblock0(&p);
    patch(&p, rb + 12, &[0, 0]);
    assert_matches_qemu(&p);
    let o = oxcow_check(&p, Repair::None);
    assert!(o.corruptions >= 1, "{o:?}");
    // -r leaks leaves corruptions.
    let r = oxcow_check(&p, Repair::Leaks);
    assert!(r.corruptions >= 1);
    let r = oxcow_check(&p, Repair::All);
    assert_eq!(r.corruptions, 0, "{r:?}");
    check_clean(&p);
    ok("qemu-io", &["-c", "read -P 7 0 192k", s(&p)]);

    // A cleared COPIED flag on a data cluster.
    let p2 = dir.path().join("copied.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p2), "16M"]);
    ok("qemu-io", &["-c", "write -P 3 0 64k", s(&p2)]);
    let b = std::fs::read(&p2).unwrap();
    let l1 = u64::from_be_bytes(b[40..48].try_into().unwrap());
    let l2 = u64::from_be_bytes(b[l1 as usize..l1 as usize + 8].try_into().unwrap()) & 0x00ff_ffff_ffff_fe00;
    patch(&p2, l2, &[0x00]);
    assert_matches_qemu(&p2);
    let r = oxcow_check(&p2, Repair::All);
    assert_eq!(r.corruptions, 0, "{r:?}");
    check_clean(&p2);
    ok("qemu-io", &["-c", "read -P 3 0 64k", s(&p2)]);
}

#[test]
fn dirty_image_from_qemu_abort_is_repaired_on_writable_open() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("dirty.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", s(&p), "16M"]);
    let _ = run("qemu-io", &["-c", "write -P 4 0 256k", "-c", "write -P 6 1M 64k", "-c", "abort", s(&p)]);
    let (code, _, _) = run("qemu-img", &["check", s(&p)]);
    assert_ne!(code, 0, "the aborted image should need repair");
    // Read-only open reads the data without touching the image.
    let ro = oxcow::open(&p, &OpenOptions::read_only()).unwrap();
    assert!(ro.qcow2().unwrap().is_dirty());
    drop(ro);
    let img = oxcow::open(&p, &OpenOptions::read_write()).unwrap();
    let rep = img.qcow2().unwrap().repaired_on_open().cloned();
    assert!(rep.is_some());
    assert!(!img.qcow2().unwrap().is_dirty());
    img.close().unwrap();
    drop(img);
    check_clean(&p);
    ok("qemu-io", &["-c", "read -P 4 0 256k", "-c", "read -P 6 1M 64k", s(&p)]);
}
