//! The recovery journal (`qcow2/journal.rs`): QEMU keeps the image
//! correct (its writes clear the autoclear bit, after which oxcow repairs
//! by the full scan), and a damaged journal is never trusted where its
//! damage shows: the repair falls back to the full scan and loses nothing.
//! The crash and fault sweeps cover the journal's ordering.

use crate::crash_sweep::repaired_from_journal;
use crate::support::process::{ok, run, s};
use crate::support::qemu::{check_clean, Dir};
use crate::support::Rng;
use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options, Repair};
use oxcow::storage::{FileStorage, MemoryStorage, OpenFlags, Storage};
use oxcow::BlockDevice;
use std::path::Path;
use std::sync::Arc;

/// The journal's header extension type and autoclear bit (docs/DESIGN.md).
const EXT_MAGIC: u32 = 0x6f78_6a6c;
const AUTOCLEAR_JOURNAL: u64 = 1 << 40;
/// Header field offsets (qcow2 spec).
const INCOMPATIBLE_AT: usize = 72;
const AUTOCLEAR_AT: usize = 88;
const HEADER_LENGTH_AT: usize = 100;
const DIRTY: u64 = 1;

const DISK: u64 = 4 << 20;

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().unwrap())
}
fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_be_bytes());
}
fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}
const CS: u64 = 65536;

fn journal_options() -> CreateOptions {
    CreateOptions::new(DISK).cluster_size(CS).lazy_refcounts(true).journal(true)
}

/// Offset of the journal extension's type field in cluster 0.
fn ext_at(c0: &[u8]) -> Option<usize> {
    let mut pos = u32_at(c0, HEADER_LENGTH_AT) as usize;
    while pos + 8 <= c0.len() {
        let ty = u32_at(c0, pos);
        if ty == 0 {
            return None;
        }
        if ty == EXT_MAGIC {
            return Some(pos);
        }
        pos = (pos + 8 + u32_at(c0, pos + 4) as usize).div_ceil(8) * 8;
    }
    None
}

fn header_bytes(p: &Path) -> Vec<u8> {
    let mut b = std::fs::read(p).unwrap();
    b.truncate(CS as usize);
    b
}

fn open_file(p: &Path) -> Qcow2 {
    let st: Arc<dyn Storage> = Arc::new(FileStorage::open(p, OpenFlags::default().write(true)).unwrap());
    Qcow2::open(st, Qcow2Options::default()).unwrap()
}

fn read_all(q: &Qcow2) -> Vec<u8> {
    let mut got = vec![0u8; DISK as usize];
    q.read_at(&mut got, 0).unwrap();
    got
}

/// QEMU in the middle: a journaled image checks clean with qemu-img;
/// qemu-io writing it clears the autoclear bit (keeping or dropping the
/// extension), so after QEMU's own crash oxcow repairs by the full scan,
/// and then keeps the journal again.
#[test]
fn qemu_clears_the_journal_bit_and_oxcow_then_scans() {
    let d = Dir::new();
    let p = d.p("j.qcow2");
    qcow2::create(oxcow::create_file(&p).unwrap(), None, &journal_options()).unwrap();
    let mut model = vec![0u8; DISK as usize];
    {
        let q = open_file(&p);
        q.write_at(&vec![0x11; 256 << 10], 0).unwrap();
        model[..256 << 10].fill(0x11);
        q.close().unwrap();
    }
    // Clean, and the journal costs QEMU no leaked cluster.
    check_clean(&p);
    // oxcow dies after a flush: dirty, journal vouched for.
    {
        let q = open_file(&p);
        q.write_at(&vec![0x22; 128 << 10], 1 << 20).unwrap();
        model[1 << 20..(1 << 20) + (128 << 10)].fill(0x22);
        q.flush().unwrap();
        std::mem::forget(q);
    }
    let h = header_bytes(&p);
    assert_ne!(u64_at(&h, INCOMPATIBLE_AT) & DIRTY, 0);
    assert_ne!(u64_at(&h, AUTOCLEAR_AT) & AUTOCLEAR_JOURNAL, 0);
    // QEMU repairs it its own way, writes with lazy refcounts and dies.
    // (abort: qemu-io exits by SIGABRT.)
    let _ = run("qemu-io", &["-c", "write -P 0x33 2M 192k", "-c", "abort", s(&p)]);
    model[2 << 20..(2 << 20) + (192 << 10)].fill(0x33);
    let h = header_bytes(&p);
    assert_ne!(u64_at(&h, INCOMPATIBLE_AT) & DIRTY, 0, "qemu-io left the image clean");
    assert_eq!(u64_at(&h, AUTOCLEAR_AT) & AUTOCLEAR_JOURNAL, 0, "QEMU kept the journal's autoclear bit");
    {
        let q = open_file(&p);
        assert_eq!(repaired_from_journal(&q), Some(false), "a journal QEMU did not keep was trusted");
        assert_eq!(q.check(Repair::None).unwrap().corruptions, 0);
        assert!(read_all(&q) == model, "data lost across QEMU's crash");
        // Kept again from here on: a crash now is recovered from it.
        q.write_at(&vec![0x44; 64 << 10], 3 << 20).unwrap();
        model[3 << 20..(3 << 20) + (64 << 10)].fill(0x44);
        q.flush().unwrap();
        std::mem::forget(q);
    }
    let h = header_bytes(&p);
    assert_ne!(u64_at(&h, AUTOCLEAR_AT) & AUTOCLEAR_JOURNAL, 0);
    assert!(ext_at(&h).is_some(), "journal extension lost");
    {
        let q = open_file(&p);
        assert_eq!(repaired_from_journal(&q), Some(true));
        assert!(read_all(&q) == model);
        q.close().unwrap();
    }
    let (code, out, err) = run("qemu-img", &["check", "-r", "all", s(&p)]);
    assert!(code == 0, "qemu-img check: {out}{err}");
    check_clean(&p);
    // And QEMU reads what oxcow wrote.
    let raw = d.p("model.raw");
    std::fs::write(&raw, &model).unwrap();
    ok("qemu-img", &["compare", "-f", "raw", "-F", "qcow2", s(&raw), s(&p)]);
}

/// A dirty image with a journal, and the data its flushed writes hold.
fn dirty_image() -> (Vec<u8>, Vec<u8>) {
    let st = Arc::new(MemoryStorage::new());
    qcow2::create(st.clone(), None, &journal_options()).unwrap();
    let mut model = vec![0u8; DISK as usize];
    let mut rng = Rng(77);
    let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
    for _ in 0..60 {
        let off = rng.below(DISK - 8192);
        let len = 1 + rng.below(8192);
        let b = 1 + rng.below(250) as u8;
        q.write_at(&vec![b; len as usize], off).unwrap();
        model[off as usize..(off + len) as usize].fill(b);
    }
    q.flush().unwrap();
    std::mem::forget(q);
    (st.to_bytes(), model)
}

/// Opens a (possibly damaged) image; when the repair did not come from
/// the journal, it must be exact: no corruption, every flushed byte.
fn open_and_verify(bytes: Vec<u8>, model: &[u8], what: &str) -> Option<bool> {
    let st: Arc<dyn Storage> = Arc::new(MemoryStorage::from_bytes(bytes));
    let q = match Qcow2::open(st, Qcow2Options::default()) {
        Ok(q) => q,
        // A typed refusal of a damaged header is fine; a panic is not.
        Err(_) => return None,
    };
    let from_journal = repaired_from_journal(&q);
    let report = q.check(Repair::None).unwrap();
    if from_journal == Some(false) {
        assert_eq!(report.corruptions, 0, "{what}: {:?}", report.messages);
        assert!(read_all(&q) == model, "{what}: flushed data lost");
    }
    from_journal
}

/// A record with a valid checksum, for placing damage where it counts.
fn record(generation: u64, start: u64, count: u16, floor: u16) -> [u8; 16] {
    let mut r = [0u8; 16];
    put_u64(&mut r, 0, start);
    put_u16(&mut r, 8, count);
    put_u16(&mut r, 10, floor);
    let mut c = [0u8; 20];
    put_u64(&mut c, 0, generation);
    c[8..].copy_from_slice(&r[..12]);
    put_u32(&mut r, 12, oxcow::formats::vhdx::crc32c(&c));
    r
}

#[test]
fn damaged_journal_falls_back_to_the_full_scan() {
    let (bytes, model) = dirty_image();
    let ext = ext_at(&bytes).expect("journal extension");
    let data = ext + 8;
    let generation = u64_at(&bytes, data + 8);
    let used = (0..u32_at(&bytes, data + 4) as usize)
        .take_while(|&i| bytes[data + 16 + i * 16..data + 32 + i * 16] != [0u8; 16])
        .count();
    assert!(used > 0, "the workload logged nothing");
    // Untouched, it is used.
    assert_eq!(open_and_verify(bytes.clone(), &model, "intact"), Some(true));

    type Damage = Box<dyn Fn(&mut Vec<u8>)>;
    let mut cases: Vec<(&str, Damage)> = vec![
        ("bad magic", Box::new(move |b| put_u32(b, ext, 0x1234_5678))),
        ("bad version", Box::new(move |b| put_u32(b, data, 9))),
        ("capacity past the extension", Box::new(move |b| put_u32(b, data + 4, 100_000))),
        ("autoclear bit clear", Box::new(|b| put_u64(b, AUTOCLEAR_AT, 0))),
        (
            "record past the end of the file",
            Box::new(move |b| b[data + 16..data + 32].copy_from_slice(&record(generation, 1 << 40, 1, 1))),
        ),
        (
            "record of cluster 0",
            Box::new(move |b| b[data + 16..data + 32].copy_from_slice(&record(generation, 0, 4, 1))),
        ),
        (
            "record with floor 0",
            Box::new(move |b| b[data + 16..data + 32].copy_from_slice(&record(generation, 10, 4, 0))),
        ),
        (
            "record with an empty range",
            Box::new(move |b| b[data + 16..data + 32].copy_from_slice(&record(generation, 10, 0, 1))),
        ),
        (
            "a record after the end",
            Box::new(move |b| {
                let at = data + 16 + (used + 1) * 16;
                b[at..at + 16].copy_from_slice(&record(generation, 10, 1, 1));
            }),
        ),
    ];
    // (Damage to the last record looks like a shorter log: a known limit.)
    if used >= 2 {
        cases.push(("damaged first record", Box::new(move |b| b[data + 16] ^= 0x40)));
    }
    for (what, damage) in &cases {
        let mut b = bytes.clone();
        damage(&mut b);
        let got = open_and_verify(b, &model, what);
        assert_eq!(got, Some(false), "{what}: the journal was trusted");
    }

    // Random damage to the extension's header and the records in use:
    // never a panic, and whenever the journal is not used the repair is
    // exact.
    let len = 8 + 16 + (used + 1) * 16;
    let mut rng = Rng(4711);
    let mut scanned = 0;
    for i in 0..200 {
        let mut b = bytes.clone();
        for _ in 0..1 + rng.below(4) {
            let at = ext + rng.below(len as u64) as usize;
            b[at] ^= 1 << rng.below(8);
        }
        if open_and_verify(b, &model, &format!("random damage {i}")) == Some(false) {
            scanned += 1;
        }
    }
    assert!(scanned > 0, "no random damage was noticed");
}

/// `amend -o journal=on` gives an image made without it a journal that
/// the next crash is recovered from; `journal=off` takes it away again
/// (the full scan repairs).
#[test]
fn amend_adds_and_removes_the_journal() {
    let crash_once = |st: &Arc<MemoryStorage>, at: u64, byte: u8| -> Option<bool> {
        let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
        q.write_at(&vec![byte; 64 << 10], at).unwrap();
        q.flush().unwrap();
        std::mem::forget(q);
        let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
        let mut got = vec![0u8; 64 << 10];
        q.read_at(&mut got, at).unwrap();
        assert!(got.iter().all(|&b| b == byte));
        assert_eq!(q.check(Repair::None).unwrap().corruptions, 0);
        let r = repaired_from_journal(&q);
        q.close().unwrap();
        r
    };
    let st = Arc::new(MemoryStorage::new());
    qcow2::create(st.clone(), None, &CreateOptions::new(DISK).cluster_size(CS).lazy_refcounts(true)).unwrap();
    assert_eq!(crash_once(&st, 0, 1), Some(false));
    let err = qcow2::amend(
        Arc::new(MemoryStorage::from_bytes(st.to_bytes())),
        None,
        &qcow2::AmendOptions::default().journal(true).lazy_refcounts(false),
    );
    assert!(err.is_err(), "a journal without lazy refcounts was accepted");
    qcow2::amend(st.clone(), None, &qcow2::AmendOptions::default().journal(true)).unwrap();
    assert_eq!(crash_once(&st, 1 << 20, 2), Some(true));
    qcow2::amend(st.clone(), None, &qcow2::AmendOptions::default().journal(false)).unwrap();
    assert!(ext_at(&st.to_bytes()[..CS as usize]).is_none());
    assert_eq!(crash_once(&st, 2 << 20, 3), Some(false));
}
