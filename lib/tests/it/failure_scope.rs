//! Which failures poison the image and which fail one request only
//! (docs/DESIGN.md, "Failures: what poisons and why"), one case each; the
//! fault sweep covers every I/O of a workload.

use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options, Repair};
use oxcow::storage::{Fault, FaultOps, FaultStorage, MemoryStorage, Storage};
use oxcow::{BlockDevice, Error};
use std::sync::Arc;

const DISK: u64 = 8 << 20;

fn image() -> Vec<u8> {
    let base = Arc::new(MemoryStorage::new());
    qcow2::create(base.clone(), None, &CreateOptions::default().size(DISK)).unwrap();
    base.to_bytes()
}

/// Space-consuming operations `f` performs on a fresh image.
fn space_ops(f: impl Fn(&Qcow2)) -> u64 {
    let st = Arc::new(FaultStorage::new(image(), 0, Fault::Enospc, false).only(FaultOps::Space));
    let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
    let before = st.ops();
    f(&q);
    st.ops() - before
}

/// Reopens what the storage holds; checks it clean and returns it.
fn reopen_clean(st: &FaultStorage) -> Qcow2 {
    let q =
        Qcow2::open(Arc::new(MemoryStorage::from_bytes(st.to_bytes())) as Arc<dyn Storage>, Qcow2Options::default())
            .unwrap();
    let r = q.check(Repair::None).unwrap();
    assert_eq!((r.corruptions, r.leaks), (0, 0), "{:?}", r.messages);
    q
}

fn reads(q: &Qcow2, off: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0u8; len];
    q.read_at(&mut b, off).unwrap();
    b
}

#[test]
fn a_failed_fsync_poisons_the_image_with_its_own_errno() {
    let st = Arc::new(FaultStorage::new(image(), 1, Fault::Enospc, false).only(FaultOps::Flushes));
    let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
    q.write_at(&[7; 4096], 0).unwrap();
    let e = q.flush().unwrap_err();
    assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    // The fault is gone, but what reached the disk is not known: every
    // later write and flush answers with the first failure's errno.
    for e in [q.write_at(&[8; 4096], 1 << 20).unwrap_err(), q.flush().unwrap_err(), q.close().unwrap_err()] {
        assert!(matches!(e, Error::Poisoned(_)), "{e}");
        assert_eq!(e.errno(), libc::ENOSPC, "{e}");
    }
    assert_eq!(st.writes_after_failure(), 0, "wrote after the failed fsync");
}

#[test]
fn a_failed_data_write_fails_that_request_only() {
    // Fail the data write of the second write (the first allocates a table too).
    let first = space_ops(|q| q.write_at(&[1; 65536], 0).unwrap());
    let second = space_ops(|q| {
        q.write_at(&[1; 65536], 0).unwrap();
        q.write_at(&[2; 65536], 65536).unwrap();
    }) - first;
    let st = Arc::new(FaultStorage::new(image(), first + second, Fault::Enospc, false).only(FaultOps::Space));
    let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
    q.write_at(&[1; 65536], 0).unwrap();
    let e = q.write_at(&[2; 65536], 65536).unwrap_err();
    assert!(st.failed() && e.errno() == libc::ENOSPC && !matches!(e, Error::Poisoned(_)), "{e}");
    q.write_at(&[3; 65536], 65536).unwrap();
    q.write_at(&[4; 65536], 2 << 20).unwrap();
    q.close().unwrap();
    let q = reopen_clean(&st);
    assert_eq!(reads(&q, 0, 65536), vec![1; 65536]);
    assert_eq!(reads(&q, 65536, 65536), vec![3; 65536]);
    assert_eq!(reads(&q, 2 << 20, 65536), vec![4; 65536]);
}

#[test]
fn a_failed_metadata_write_back_is_retried_by_the_next_flush() {
    let write = |q: &Qcow2| q.write_at(&[5; 65536], 3 << 20).unwrap();
    let n = space_ops(write);
    // Space runs out on the flush's first metadata write and comes back
    // after two more attempts.
    let st = Arc::new(FaultStorage::new(image(), n + 1, Fault::Enospc, true).only(FaultOps::Space).clearing_after(2));
    let q = Qcow2::open(st.clone(), Qcow2Options::default()).unwrap();
    write(&q);
    let mut failures = 0;
    while let Err(e) = q.flush() {
        assert!(e.errno() == libc::ENOSPC && !matches!(e, Error::Poisoned(_)), "{e}");
        failures += 1;
        assert!(failures <= 3, "flush keeps failing after space returned: {e}");
    }
    assert!(failures > 0 && st.cleared(), "the flush never hit the fault");
    // Crash now (no close): the flushed write must be on the disk.
    let q2 = reopen_clean(&st);
    assert_eq!(reads(&q2, 3 << 20, 65536), vec![5; 65536]);
    q.close().unwrap();
}
