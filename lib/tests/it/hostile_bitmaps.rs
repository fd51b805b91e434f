//! Damaged bitmap directories and tables give errors, never panics or
//! huge allocations: each mutation of one field of QEMU's own image is
//! opened read-write (refused, or written and closed), read-only (bitmaps
//! listed and read) and checked.

use crate::support::{ok, process::s};
use oxcow::qcow2::{Qcow2, Qcow2Options, Repair};
use oxcow::storage::{MemoryStorage, Storage};
use oxcow::BlockDevice;
use std::sync::Arc;

fn put(b: &mut [u8], at: u64, v: &[u8]) {
    b[at as usize..at as usize + v.len()].copy_from_slice(v);
}

fn exercise(bytes: Vec<u8>, what: &str) {
    let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes.clone()));
    if let Ok(q) = Qcow2::open(st.clone(), Qcow2Options::default()) {
        let _ = q.write_at(&[5; 4096], 0);
        let _ = q.bitmap_add("new", None, true);
        let _ = q.close();
    }
    let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes));
    if let Ok(q) = Qcow2::open(st.clone(), Qcow2Options::default().read_only(true)) {
        if let Ok(list) = q.bitmaps() {
            for b in list {
                let _ = q.bitmap_data(&b.name).map(|d| d.dirty_extents());
            }
        }
        let _ = q.bitmap_extents("b0", 0, 1 << 20);
        let _ = q.check(Repair::None);
    }
    if let Ok(q) = Qcow2::open(st, Qcow2Options::default().repair(true)) {
        let _ = q.check(Repair::All);
    }
    eprintln!("survived: {what}");
}

#[test]
fn damaged_bitmap_directories_and_tables_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bm.qcow2");
    ok("qemu-img", &["create", "-q", "-f", "qcow2", s(&p), "64M"]);
    ok("qemu-img", &["bitmap", "--add", s(&p), "b0"]);
    ok("qemu-io", &["-c", "write 1M 64k", s(&p)]);
    let base = std::fs::read(&p).unwrap();
    let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(base.clone()));
    let q = Qcow2::open(st, Qcow2Options::default().read_only(true)).unwrap();
    let d = q.extensions().bitmaps.unwrap().directory_offset;
    let table = u64::from_be_bytes(base[d as usize..d as usize + 8].try_into().unwrap());
    drop(q);
    let huge = u64::MAX.to_be_bytes();
    let cases: Vec<(&str, u64, Vec<u8>)> = vec![
        ("table offset past the end", d, (1u64 << 50).to_be_bytes().to_vec()),
        ("table offset unaligned", d, (table + 8).to_be_bytes().to_vec()),
        ("table offset zero", d, 0u64.to_be_bytes().to_vec()),
        ("table size huge", d + 8, u32::MAX.to_be_bytes().to_vec()),
        ("table size zero", d + 8, 0u32.to_be_bytes().to_vec()),
        ("reserved flags", d + 12, 0xffu32.to_be_bytes().to_vec()),
        ("in use", d + 12, 3u32.to_be_bytes().to_vec()),
        ("unknown type", d + 16, vec![7]),
        ("granularity 0", d + 17, vec![0]),
        ("granularity 63", d + 17, vec![63]),
        ("granularity 9", d + 17, vec![9]),
        ("name size 0", d + 18, vec![0, 0]),
        ("name size huge", d + 18, vec![0xff, 0xff]),
        ("extra data, not compatible", d + 20, 8u32.to_be_bytes().to_vec()),
        ("extra data huge", d + 20, u32::MAX.to_be_bytes().to_vec()),
        ("table entry all bits", table, huge.to_vec()),
        ("table entry past the end", table, (1u64 << 40).to_be_bytes().to_vec()),
        ("table entry all ones", table, 1u64.to_be_bytes().to_vec()),
        ("table entry pointing at the header", table, 0u64.to_be_bytes().to_vec()),
        ("table entry pointing at the directory", table, d.to_be_bytes().to_vec()),
        ("directory zeroed", d, vec![0; 32]),
    ];
    for (what, at, v) in cases {
        let mut b = base.clone();
        put(&mut b, at, &v);
        exercise(b, what);
    }
}

/// Random byte mutations of the seed images of the `bitmaps` fuzz target,
/// concentrated on the header, bitmap directory and tables, through that
/// target: a deterministic slice of what the fuzzer does, in CI.
#[test]
fn random_mutations_of_bitmap_images_survive() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/bitmaps");
    let runs = if std::env::var("OXCOW_LONG").is_ok_and(|v| v == "1") { 20000 } else { 1500 };
    let mut rng = crate::support::Rng(0xb17a);
    // The QEMU-made seeds only (a fuzzing run adds its finds beside them).
    let seeds =
        std::fs::read_dir(&dir).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("qemu-"));
    for e in seeds {
        let seed = std::fs::read(e.path()).unwrap();
        let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(seed.clone()));
        let q = Qcow2::open(st, Qcow2Options::default().read_only(true)).unwrap();
        let d = q.extensions().bitmaps.unwrap().directory_offset as usize;
        drop(q);
        for _ in 0..runs {
            let mut b = seed.clone();
            for _ in 0..1 + rng.below(4) {
                // Half the mutations in the directory, the rest anywhere.
                let at =
                    if rng.below(2) == 0 { d + rng.below(64) as usize } else { rng.below(b.len() as u64) as usize };
                if at < b.len() {
                    b[at] = rng.below(256) as u8;
                }
            }
            oxcow::fuzz_targets::bitmaps(&b);
        }
    }
}
