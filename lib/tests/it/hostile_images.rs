//! Hostile images, in the style of QEMU's iotest 080: header fields at
//! their limits and past them, tables pointing where they must not, loops.
//! Every case must give a typed error (naming the field where one is at
//! fault), never a panic, a hang or a huge allocation.

use oxcow::format::header::off;
use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options};
use oxcow::storage::{MemoryStorage, Storage};
use oxcow::{BlockDevice, Error, OpenOptions};
use std::sync::Arc;

fn fresh(opts: CreateOptions) -> Vec<u8> {
    let st = Arc::new(MemoryStorage::new());
    qcow2::create(st.clone(), None, &opts).unwrap();
    st.to_bytes()
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
fn get64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}

fn open(bytes: Vec<u8>, write: bool) -> oxcow::Result<Qcow2> {
    Qcow2::open(Arc::new(MemoryStorage::from_bytes(bytes)), Qcow2Options::default().read_only(!write))
}

fn field_error(bytes: Vec<u8>) -> &'static str {
    match open(bytes, false) {
        Err(Error::InvalidField { field, .. }) => field,
        Err(e) => panic!("expected a field error, got {e}"),
        Ok(_) => panic!("expected an error, the image opened"),
    }
}

#[test]
fn header_fields_at_and_past_their_limits() {
    let base = fresh(CreateOptions::new(64 << 20));
    let cases: Vec<(&str, usize, u64, bool)> = vec![
        // (field, offset, value, 64-bit field)
        ("cluster_bits", off::CLUSTER_BITS, 8, false),
        ("cluster_bits", off::CLUSTER_BITS, 22, false),
        ("l1_size", off::L1_SIZE, 0, false),
        ("l1_size", off::L1_SIZE, u32::MAX as u64, false), // a 32 GiB L1 claim
        ("l1_table_offset", off::L1_TABLE_OFFSET, 0x10001, true),
        ("refcount_table_offset", off::REFCOUNT_TABLE_OFFSET, 0x10200, true),
        ("refcount_table_clusters", off::REFCOUNT_TABLE_CLUSTERS, 0, false),
        ("refcount_table_clusters", off::REFCOUNT_TABLE_CLUSTERS, u32::MAX as u64, false),
        ("nb_snapshots", off::NB_SNAPSHOTS, 65537, false),
        ("snapshots_offset", off::SNAPSHOTS_OFFSET, 0x12345, true),
        ("size", off::SIZE, u64::MAX, true),
        ("refcount_order", off::REFCOUNT_ORDER, 7, false),
        ("header_length", off::HEADER_LENGTH, 100, false),
        ("header_length", off::HEADER_LENGTH, 1 << 20, false),
        ("crypt_method", off::CRYPT_METHOD, 3, false),
        ("backing_file_size", off::BACKING_FILE_SIZE, 1024, false),
    ];
    for (field, at, value, wide) in cases {
        let mut b = base.clone();
        if wide {
            put64(&mut b, at, value);
        } else {
            put32(&mut b, at, value as u32);
        }
        if field == "backing_file_size" {
            put64(&mut b, off::BACKING_FILE_OFFSET, 512);
        }
        assert_eq!(field_error(b), field, "case {field} = {value}");
    }
    // At the limit is fine: 2 MiB clusters, refcount order 6.
    let ok = fresh(CreateOptions::new(64 << 20).cluster_size(2 << 20).refcount_bits(64));
    open(ok, false).unwrap();
}

#[test]
fn unknown_incompatible_bit_is_refused_by_name() {
    let mut b = fresh(CreateOptions::new(1 << 20));
    put64(&mut b, off::INCOMPATIBLE_FEATURES, 1 << 20);
    let e = open(b, false).err().unwrap();
    assert!(matches!(e, Error::Unsupported(_)), "{e}");
}

#[test]
fn tables_pointing_where_they_must_not() {
    let base = fresh(CreateOptions::new(16 << 20).cluster_size(4096));
    // Make guest cluster 0 allocated.
    let q = open(base, true).unwrap();
    q.write_at(&[1u8; 4096], 0).unwrap();
    q.close().unwrap();
    let st = q.file().clone();
    drop(q);
    let mut good = vec![0u8; st.len().unwrap() as usize];
    st.read_at(&mut good, 0).unwrap();
    let l1 = get64(&good, off::L1_TABLE_OFFSET) as usize;
    let l2 = (get64(&good, l1) & 0x00ff_ffff_ffff_fe00) as usize;

    // Misaligned L2 table offset: reads fail as corruption.
    let mut b = good.clone();
    put64(&mut b, l1, get64(&good, l1) | 0x200);
    let q = open(b, false).unwrap();
    let e = q.read_at(&mut [0u8; 512], 0).unwrap_err();
    assert!(e.is_corrupt(), "{e}");

    // A data cluster pointing at the L1 table: the overlap check refuses
    // the write and marks the image corrupt.
    let mut b = good.clone();
    put64(&mut b, l2, (l1 as u64) | (1 << 63));
    let q = open(b, true).unwrap();
    let e = q.write_at(&[9u8; 512], 0).unwrap_err();
    assert!(e.is_corrupt(), "{e}");
    assert!(q.is_corrupt());
    assert!(q.write_at(&[9u8; 512], 8192).is_err(), "writes refused after corruption");
    let file = q.file().clone();
    drop(q);
    let mut after = vec![0u8; file.len().unwrap() as usize];
    file.read_at(&mut after, 0).unwrap();
    assert_eq!(&after[l1..l1 + 8], &good[l1..l1 + 8], "L1 table untouched");
    // The corrupt bit is on disk: writable opens are refused.
    assert!(open(after.clone(), true).is_err());
    assert!(open(after, false).is_ok());

    // A compressed descriptor pointing past the end of the file.
    let mut b = good.clone();
    put64(&mut b, l2, (1 << 62) | 0x3fff_ffff_ff00);
    let q = open(b, false).unwrap();
    assert!(q.read_at(&mut [0u8; 4096], 0).is_err());
}

fn create_with_backing(p: &std::path::Path, backing: &str) {
    let f = oxcow::create_file(p).unwrap();
    qcow2::create(
        f,
        None,
        &CreateOptions::default().size(1 << 20).backing_file(Some(backing.into())).backing_format(Some("qcow2".into())),
    )
    .unwrap();
}

fn loop_error(p: &std::path::Path) -> String {
    match oxcow::open(p, &OpenOptions::read_only()) {
        Err(e) => e.to_string(),
        Ok(_) => panic!("{p:?} opened although its backing chain loops"),
    }
}

#[test]
fn backing_loop_through_two_images_is_refused_with_qemus_message() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.qcow2");
    let b = dir.path().join("b.qcow2");
    create_with_backing(&a, "b.qcow2");
    create_with_backing(&b, "a.qcow2");
    // The file that comes back is named as the chain resolves it.
    let want = format!("Backing file '{}' creates an infinite loop.", a.display());
    assert_eq!(loop_error(&a), want);
}

#[test]
fn backing_loop_to_itself_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let s = dir.path().join("self.qcow2");
    create_with_backing(&s, "self.qcow2");
    assert_eq!(loop_error(&s), format!("Backing file '{}' creates an infinite loop.", s.display()));
    // Without the backing chain the image itself opens (qemu-img info).
    oxcow::open(&s, &OpenOptions::read_only().no_backing(true)).unwrap();
}

#[test]
fn backing_loop_through_another_name_for_the_same_file_is_refused() {
    // Files are told apart by identity, not name: a symlink or `./` does
    // not make the chain go round 64 times.
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.qcow2");
    create_with_backing(&real, "./link.qcow2");
    std::os::unix::fs::symlink(&real, dir.path().join("link.qcow2")).unwrap();
    let e = loop_error(&real);
    assert!(e.ends_with("link.qcow2' creates an infinite loop."), "{e}");
}

#[test]
fn protocol_backing_names_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["json:{\"driver\":\"file\"}", "nbd://10.0.0.1/x", "http://example.invalid/x"] {
        let p = dir.path().join("p.qcow2");
        let f = oxcow::create_file(&p).unwrap();
        qcow2::create(
            f,
            None,
            &CreateOptions::new(1 << 20).backing_file(Some(name.into())).backing_format(Some("raw".into())),
        )
        .unwrap();
        let e = oxcow::open(&p, &OpenOptions::read_only()).err().unwrap();
        assert!(e.to_string().contains("refusing"), "{name}: {e}");
    }
}

#[test]
fn probed_raw_refuses_writing_a_qcow2_magic() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("disk.raw");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let img = oxcow::open(&p, &OpenOptions::read_write()).unwrap();
    assert!(img.device().write_at(b"QFI\xfb", 0).is_err());
    img.device().write_at(b"QFI\xfb", 4096).unwrap();
    // The first writer's image lock must go before the second writer opens.
    drop(img);
    let img = oxcow::open(&p, &OpenOptions::default().format(oxcow::Format::Raw).write(true)).unwrap();
    img.device().write_at(b"QFI\xfb", 0).unwrap();
}
