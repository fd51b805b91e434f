//! Regression test for a race between in-place writes and frees.

use oxcow::qcow2::{self, CreateOptions, Qcow2, Qcow2Options};
use oxcow::storage::{MemoryStorage, Storage};
use oxcow::BlockDevice;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// `write` used to plan an in-place write under the metadata lock, drop
/// it, and only then take the I/O gate; a discard + flush in that window
/// freed the host cluster, the next allocation reused it, and the stale
/// write landed in another guest cluster. The gate is now taken before
/// the metadata lock is released (in `read` too).
#[test]
fn write_racing_discard_and_flush_stays_in_its_cluster() {
    const CS: u64 = 4096;
    let st: Arc<dyn Storage> = Arc::new(MemoryStorage::new());
    qcow2::create(st.clone(), None, &CreateOptions::new(CS * 64).cluster_size(CS)).unwrap();
    let q = Arc::new(Qcow2::open(st.clone(), Qcow2Options::default()).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let (qa, sa) = (q.clone(), stop.clone());
    // A: in-place writes of 0xAA to cluster 0 forever.
    let a = std::thread::spawn(move || {
        let buf = vec![0xAAu8; CS as usize];
        while !sa.load(Ordering::Relaxed) {
            qa.write_at(&buf, 0).unwrap();
        }
    });
    // B: discard cluster 0, flush (frees its host cluster), write other
    // clusters with 0x55 (reusing it), check them.
    let mut bad = 0;
    let buf = vec![0x55u8; CS as usize];
    let mut r = vec![0u8; CS as usize];
    for round in 0..200_000u64 {
        q.discard(0, CS).unwrap();
        q.flush().unwrap();
        let gc = 1 + round % 63;
        q.write_at(&buf, gc * CS).unwrap();
        q.read_at(&mut r, gc * CS).unwrap();
        if r != buf {
            bad += 1;
            eprintln!("round {round}: cluster {gc} holds foreign data {:x}", r[0]);
            break;
        }
        q.discard(gc * CS, CS).unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    a.join().unwrap();
    assert_eq!(bad, 0);
}
