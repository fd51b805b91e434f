//! Compressed cluster writes: QEMU reads them back, `qemu-img check`
//! agrees with the refcounts (dense packing shares host clusters), and
//! overwrites, snapshots and discards of compressed clusters stay clean.

use crate::support::*;
use oxcow::format::CompressionType;
use oxcow::qcow2::{self, CreateOptions};
use oxcow::OpenOptions;

fn cluster_data(i: u64, cs: usize, rng: &mut u64) -> Vec<u8> {
    match i % 4 {
        // Compressible text-like data.
        0 | 1 => (0..cs).map(|k| b"oxcow compresses clusters "[(k + i as usize) % 26]).collect(),
        // Incompressible: stored as a normal cluster.
        2 => (0..cs)
            .map(|_| {
                *rng ^= *rng << 13;
                *rng ^= *rng >> 7;
                *rng ^= *rng << 17;
                (*rng >> 24) as u8
            })
            .collect(),
        _ => vec![0u8; cs],
    }
}

fn case(cs: u64, version: u32, rbits: u32, compression: CompressionType, size: u64, extended_l2: bool) {
    let d = Dir::new();
    let (p, raw) = (d.p("c.qcow2"), d.p("expect.raw"));
    let st = oxcow::create_file(&p).unwrap();
    let opts = CreateOptions::new(size)
        .cluster_size(cs)
        .version(version)
        .refcount_bits(rbits)
        .compression(compression)
        .extended_l2(extended_l2);
    qcow2::create(st, None, &opts).unwrap();
    let mut expect = vec![0u8; size as usize];
    let mut rng = 0x1234_5678_9abc_def1u64;
    {
        let img = oxcow::open(&p, &OpenOptions::read_write()).unwrap();
        let q = img.qcow2().unwrap();
        let clusters = size.div_ceil(cs);
        for gc in 0..clusters {
            let data = cluster_data(gc, cs as usize, &mut rng);
            q.write_compressed(gc * cs, &data).unwrap();
            let n = (size - gc * cs).min(cs) as usize;
            expect[(gc * cs) as usize..(gc * cs) as usize + n].copy_from_slice(&data[..n]);
        }
        // Overwrite some compressed clusters: normally, compressed again,
        // and partially (copy-on-write from compressed data).
        img.device().write_at(&vec![0xabu8; cs as usize], 0).unwrap();
        expect[..cs as usize].fill(0xab);
        let data = cluster_data(5, cs as usize, &mut rng);
        q.write_compressed(cs, &data).unwrap();
        expect[cs as usize..2 * cs as usize].copy_from_slice(&data);
        img.device().write_at(&[0xcdu8; 100], 4 * cs + 10).unwrap();
        expect[(4 * cs + 10) as usize..(4 * cs + 110) as usize].fill(0xcd);
        img.close().unwrap();
    }
    std::fs::write(&raw, &expect).unwrap();
    check_clean(&p);
    same(&p, &raw);
    let chk = ok("qemu-img", &["check", s(&p)]);
    assert!(!chk.contains(" 0.00% compressed"), "nothing compressed: {chk}");
    if rbits >= 2 {
        // Snapshot over compressed clusters, rewrite, go back.
        ok("qemu-img", &["snapshot", "-c", "s", s(&p)]);
        {
            let img = oxcow::open(&p, &OpenOptions::read_write()).unwrap();
            let q = img.qcow2().unwrap();
            let data = cluster_data(8, cs as usize, &mut rng);
            q.write_compressed(8 * cs, &data).unwrap();
            img.device().discard(0, 4 * cs).unwrap();
            img.close().unwrap();
        }
        check_clean(&p);
        ok("qemu-img", &["snapshot", "-a", "s", s(&p)]);
        check_clean(&p);
        same(&p, &raw);
    }
}

#[test]
fn compressed_writes_read_back_in_qemu() {
    case(65536, 3, 16, CompressionType::Zlib, 2 << 20, false);
    case(4096, 2, 16, CompressionType::Zlib, (1 << 20) + 1536, false);
    case(4096, 3, 1, CompressionType::Zlib, 1 << 20, false);
    case(65536, 3, 64, CompressionType::Zstd, 1 << 20, false);
    case(512, 3, 16, CompressionType::Zlib, 64 << 10, false);
    case(32768, 3, 16, CompressionType::Zlib, 1 << 20, true);
}

#[test]
fn packing_is_dense() {
    let d = Dir::new();
    let p = d.p("dense.qcow2");
    let st = oxcow::create_file(&p).unwrap();
    qcow2::create(st, None, &CreateOptions::new(8 << 20)).unwrap();
    {
        let img = oxcow::open(&p, &OpenOptions::read_write()).unwrap();
        let q = img.qcow2().unwrap();
        let data = vec![7u8; 65536];
        for gc in 0..128 {
            q.write_compressed(gc * 65536, &data).unwrap();
        }
        img.close().unwrap();
    }
    check_clean(&p);
    // 128 tiny compressed clusters fit in one or two host clusters.
    let len = std::fs::metadata(&p).unwrap().len();
    assert!(len <= 7 * 65536, "file is {len} bytes");
    let (ox_raw, q_raw) = (d.p("a.raw"), d.p("b.raw"));
    ok("qemu-img", &["convert", "-O", "raw", s(&p), s(&ox_raw)]);
    std::fs::write(&q_raw, vec![7u8; 8 << 20]).unwrap();
    same(&ox_raw, &q_raw);
}

#[test]
fn misuse_is_refused() {
    let d = Dir::new();
    let p = d.p("x.qcow2");
    let st = oxcow::create_file(&p).unwrap();
    qcow2::create(st, None, &CreateOptions::new(1 << 20)).unwrap();
    let img = oxcow::open(&p, &OpenOptions::read_write()).unwrap();
    let q = img.qcow2().unwrap();
    assert!(q.write_compressed(100, &[0u8; 65536]).is_err());
    assert!(q.write_compressed(0, &[0u8; 4096]).is_err());
    assert!(q.write_compressed(1 << 20, &[0u8; 65536]).is_err());
    img.close().unwrap();
    drop(img);
    check_clean(&p);
}

/// Image end offset as `qemu-img check` reports it.
fn end_offset(p: &std::path::Path) -> u64 {
    let out = ok("qemu-img", &["check", s(p)]);
    let line = out.lines().find(|l| l.starts_with("Image end offset:")).unwrap();
    line.rsplit(' ').next().unwrap().parse().unwrap()
}

#[test]
fn packs_as_densely_as_qemu_convert_c() {
    let d = Dir::new();
    let src = d.p("src.raw");
    // Mixed data compressing to a few hundred bytes up to most of a cluster.
    let mut rng = 0x2545_f491u64;
    let mut data = Vec::new();
    for i in 0..96u64 {
        let run = 1 + (i * 37 % 200) as usize;
        for k in 0..65536usize {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            data.push(if k % run == 0 { (rng >> 24) as u8 } else { (i % 7) as u8 });
        }
    }
    std::fs::write(&src, &data).unwrap();
    for cs in [4096u64, 65536] {
        let (ox, qm) = (d.p("ox.qcow2"), d.p("qm.qcow2"));
        let o = format!("cluster_size={cs}");
        ok("qemu-img", &["convert", "-c", "-O", "qcow2", "-o", &o, s(&src), s(&qm)]);
        let st = oxcow::create_file(&ox).unwrap();
        let opts = CreateOptions::new(data.len() as u64).cluster_size(cs);
        qcow2::create(st, None, &opts).unwrap();
        {
            let img = oxcow::open(&ox, &OpenOptions::read_write()).unwrap();
            let q = img.qcow2().unwrap();
            for (i, chunk) in data.chunks(cs as usize).enumerate() {
                q.write_compressed(i as u64 * cs, chunk).unwrap();
            }
            img.close().unwrap();
        }
        check_clean(&ox);
        same(&ox, &qm);
        let (a, b) = (end_offset(&ox), end_offset(&qm));
        assert!(a <= b + 2 * cs, "cluster size {cs}: oxcow ends at {a}, qemu-img at {b}");
    }
}
