//! The read path against QEMU: images made by qemu-img/qemu-io (every
//! feature the format has) read through oxcow exactly as `qemu-img
//! convert -O raw` reads them.

use crate::support::*;
use oxcow::OpenOptions;
use std::path::{Path, PathBuf};

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// Reads the whole image through oxcow and compares with QEMU's view.
fn assert_reads_like_qemu(p: &Path, fmt: &str) {
    let dir = p.parent().unwrap();
    let qemu_raw = dir.join(format!("{}.qemu.raw", p.file_name().unwrap().to_str().unwrap()));
    ok("qemu-img", &["convert", "-f", fmt, "-O", "raw", s(p), s(&qemu_raw)]);
    let img = oxcow::open(p, &OpenOptions::read_only()).unwrap();
    let dev = img.device();
    let expected = std::fs::File::open(&qemu_raw).unwrap();
    use std::os::unix::fs::FileExt;
    let mut off = 0u64;
    let chunk = 1 << 20;
    let mut a = vec![0u8; chunk];
    let mut b = vec![0u8; chunk];
    while off < dev.len() {
        let n = (dev.len() - off).min(chunk as u64) as usize;
        // Skip unallocated stretches of huge sparse images quickly.
        let st = oxcow::chain_status(dev, off, n as u64).unwrap();
        if !st.data && st.zero && st.length >= n as u64 {
            off += n as u64;
            continue;
        }
        dev.read_at(&mut a[..n], off).unwrap();
        b[..n].fill(0);
        let _ = expected.read_at(&mut b[..n], off);
        if a[..n] != b[..n] {
            let i = (0..n).find(|&i| a[i] != b[i]).unwrap();
            panic!("{p:?}: byte {} reads {:#x}, QEMU reads {:#x}", off + i as u64, a[i], b[i]);
        }
        off += n as u64;
    }
}

fn qcow2(dir: &Path, name: &str, opts: &str, size: &str, cmds: &[&str]) -> PathBuf {
    let p = dir.join(name);
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&p), size]);
    ok("qemu-img", &args);
    for c in cmds {
        ok("qemu-io", &["-f", "qcow2", "-c", c, s(&p)]);
    }
    p
}

const WRITES: &[&str] = &[
    "write -P 0x11 0 100k",
    "write -P 0x22 1M 4k",
    "write -z 1M 1k",
    "write -P 0x33 3M 300k",
    "discard 3M 64k",
    "write -z -u 2M 128k",
];

#[test]
fn every_cluster_size_and_refcount_width() {
    let dir = tempfile::tempdir().unwrap();
    for cs in ["512", "4k", "64k", "2M"] {
        for rb in ["1", "16", "64"] {
            let p = qcow2(
                dir.path(),
                &format!("c{cs}-r{rb}.qcow2"),
                &format!("cluster_size={cs},refcount_bits={rb}"),
                "8M",
                WRITES,
            );
            assert_reads_like_qemu(&p, "qcow2");
        }
    }
    let p = qcow2(dir.path(), "v2.qcow2", "compat=0.10", "8M", WRITES);
    assert_reads_like_qemu(&p, "qcow2");
    let p = qcow2(dir.path(), "lazy.qcow2", "lazy_refcounts=on", "8M", WRITES);
    assert_reads_like_qemu(&p, "qcow2");
}

#[test]
fn extended_l2_subclusters() {
    let dir = tempfile::tempdir().unwrap();
    for cs in ["16k", "64k", "2M"] {
        let cmds =
            ["write -P 0x44 1k 1k", "write -P 0x55 8k 3k", "write -z 9k 1k", "write -P 0x66 2M 70k", "discard 2M 64k"];
        let base = qcow2(dir.path(), &format!("base{cs}.qcow2"), "", "8M", &["write -P 0x77 0 8M"]);
        let p = dir.path().join(format!("ext{cs}.qcow2"));
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("extended_l2=on,cluster_size={cs}"),
                "-b",
                s(&base),
                "-F",
                "qcow2",
                s(&p),
            ],
        );
        for c in cmds {
            ok("qemu-io", &["-c", c, s(&p)]);
        }
        assert_reads_like_qemu(&p, "qcow2");
    }
}

#[test]
fn compressed_zlib_and_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let src = qcow2(dir.path(), "src.qcow2", "", "8M", &["write -P 0x12 0 3M", "write -P 0x34 5M 100k"]);
    for (ct, cs) in [("zlib", "64k"), ("zstd", "64k"), ("zlib", "4k"), ("zstd", "2M"), ("zlib", "512")] {
        let p = dir.path().join(format!("comp-{ct}-{cs}.qcow2"));
        ok(
            "qemu-img",
            &[
                "convert",
                "-c",
                "-O",
                "qcow2",
                "-o",
                &format!("compression_type={ct},cluster_size={cs}"),
                s(&src),
                s(&p),
            ],
        );
        assert_reads_like_qemu(&p, "qcow2");
        // Partly overwritten compressed clusters.
        ok("qemu-io", &["-c", "write -P 0x56 70k 10k", s(&p)]);
        assert_reads_like_qemu(&p, "qcow2");
    }
}

#[test]
fn backing_chain_mixing_raw_and_qcow2_with_shorter_backing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let raw = d.join("base.raw");
    ok("qemu-img", &["create", "-q", "-f", "raw", s(&raw), "4M"]);
    ok("qemu-io", &["-f", "raw", "-c", "write -P 0xa1 0 4M", s(&raw)]);
    let mid = d.join("mid.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", s(&mid), "6M"]);
    ok("qemu-io", &["-c", "write -P 0xb2 1M 512k", "-c", "write -z 2M 64k", s(&mid)]);
    let top = d.join("top.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", s(&top), "10M"]);
    ok("qemu-io", &["-c", "write -P 0xc3 1200k 8k", "-c", "write -P 0xc4 7M 64k", s(&top)]);
    assert_reads_like_qemu(&top, "qcow2");
    let img = oxcow::open(&top, &OpenOptions::read_only()).unwrap();
    let st = oxcow::chain_status(img.device(), 0, 4096).unwrap();
    assert_eq!(st.depth, 2, "first range comes from the raw base");
}

#[test]
fn internal_snapshot_active_state_and_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let p = qcow2(dir.path(), "snap.qcow2", "", "8M", &["write -P 1 0 1M"]);
    ok("qemu-img", &["snapshot", "-c", "one", s(&p)]);
    ok("qemu-io", &["-c", "write -P 2 512k 1M", "-c", "discard 0 64k", s(&p)]);
    ok("qemu-img", &["bitmap", "--add", s(&p), "dirty0"]);
    assert_reads_like_qemu(&p, "qcow2");
}

#[test]
fn external_data_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for raw in ["off", "on"] {
        let p = d.join(format!("df-{raw}.qcow2"));
        let data = d.join(format!("df-{raw}.data"));
        ok(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", &format!("data_file={},data_file_raw={raw}", s(&data)), s(&p), "8M"],
        );
        ok("qemu-io", &["-c", "write -P 0x99 64k 200k", "-c", "write -z 100k 8k", s(&p)]);
        assert_reads_like_qemu(&p, "qcow2");
    }
}

#[test]
fn dirty_image_reads_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let p = qcow2(dir.path(), "dirty.qcow2", "lazy_refcounts=on", "8M", &[]);
    let _ = run("qemu-io", &["-c", "write -P 0x42 0 300k", "-c", "abort", s(&p)]);
    assert_reads_like_qemu(&p, "qcow2");
}

#[test]
fn multi_tib_sparse_image() {
    let dir = tempfile::tempdir().unwrap();
    let p = qcow2(
        dir.path(),
        "huge.qcow2",
        "",
        "4T",
        &["write -P 0x61 0 64k", "write -P 0x62 3T 64k", "write -P 0x63 4095G 1M"],
    );
    let img = oxcow::open(&p, &OpenOptions::read_only()).unwrap();
    let dev = img.device();
    let mut b = vec![0u8; 65536];
    dev.read_at(&mut b, 3 << 40).unwrap();
    assert!(b.iter().all(|&x| x == 0x62));
    dev.read_at(&mut b, (4095u64 << 30) + 65536).unwrap();
    assert!(b.iter().all(|&x| x == 0x63));
    dev.read_at(&mut b, 2 << 40).unwrap();
    assert!(b.iter().all(|&x| x == 0));
    // Block status walks the sparse disk quickly.
    let mut off = 0;
    let mut extents = 0;
    while off < dev.len() {
        let st = oxcow::chain_status(dev, off, dev.len() - off).unwrap();
        off += st.length;
        extents += 1;
    }
    assert!(extents <= 8, "{extents} extents");
}

#[test]
fn encrypted_images_are_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("enc.qcow2");
    let (code, _, _) = run(
        "qemu-img",
        &[
            "create",
            "-q",
            "--object",
            "secret,id=s0,data=pw",
            "-f",
            "qcow2",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=s0",
            s(&p),
            "4M",
        ],
    );
    if code != 0 {
        eprintln!("qemu-img cannot make encrypted images here; skipped");
        return;
    }
    // Without its secret: refused with qemu-img's words.
    let e = oxcow::open(&p, &OpenOptions::read_only()).expect_err("encrypted image must be refused");
    assert!(e.to_string().contains("Parameter 'encrypt.key-secret' is required for cipher"), "{e}");
}
